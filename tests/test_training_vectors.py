"""specs/vectors/training-v1.json walked through both twins: the trainer's (training/) and the
verifier's (verify/_internal/).

Why: the verifier re-implements routing, batch limits, aggregation, epoch order, step seeds,
tensor/checkpoint digests, band norms and the per-example loss field on purpose (it must not
import the trainer). Each case
goes through both, and both must give the file's ``want`` or raise with ``wantErr`` in the
message; the file is never regenerated here (only compared with the generator's output).
Twin names differ: ``policy.route`` / ``routing.route_example`` (+ ``first_match``),
``policy.REVIEW_STATES`` / ``routing.REVIEWS``, ``PolicyError``/``ManifestError`` /
``PolicyInvalid``/``Unroutable``/``ManifestInvalid``, ``gate._band_norm(params)`` /
``replay._band_norm(grads)``.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from gradledger.training import checkpoints as TC
from gradledger.training import gate as TG
from gradledger.training import manifests as TM
from gradledger.training import policy as TP
from gradledger.training import trainer as TT
from gradledger.verify._internal import checkpoint as VC
from gradledger.verify._internal import manifests as VM
from gradledger.verify._internal import replay as VP
from gradledger.verify._internal import routing as VR
from gradledger.verify._internal import settings as VS

VECTORS_DIR = Path(__file__).resolve().parents[1] / "specs" / "vectors"
VECTORS: dict[str, Any] = json.loads((VECTORS_DIR / "training-v1.json").read_text(encoding="utf-8"))
SOURCES: dict[str, dict[str, Any]] = VECTORS["sources"]
NP = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4", "uint8": "u1",
      "bool": "?", "int8": "i1"}


def ids(section: str) -> list[str]:
    return [c["desc"] for c in VECTORS[section]]


def cases(section: str) -> list[dict[str, Any]]:
    return VECTORS[section]


def expect(case: dict[str, Any], side: str, call: Callable[[], Any]) -> Any:
    """``call()``'s value, or None after checking it raised with ``wantErr`` when the case wants one."""
    if "wantErr" in case:
        with pytest.raises(Exception) as info:
            call()
        assert case["wantErr"] in str(info.value), f"{side}: {info.value!r}"
        return None
    return call()


def tensor(spec: dict[str, Any]) -> torch.Tensor:
    raw = bytes.fromhex(spec["data"])
    if spec["dtype"] == "bfloat16":
        if not raw:
            return torch.empty(spec["shape"], dtype=torch.bfloat16)
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(spec["shape"])
    return torch.from_numpy(np.frombuffer(raw, dtype=NP[spec["dtype"]]).copy().reshape(spec["shape"]))


def policy_fields(policy: dict[str, Any]) -> dict[str, Any]:
    return {**policy, "signer": bytes.fromhex(policy["signer"])}


def test_format() -> None:
    assert VECTORS["format"] == "gradledger-training-vectors/1"
    assert all(len(VECTORS[s]) >= 5 for s in ("route", "aggregate", "order", "step_seed", "tensor_digest"))


def test_generator_reproduces_the_file() -> None:
    spec = importlib.util.spec_from_file_location("generate_training", VECTORS_DIR / "generate_training.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (VECTORS_DIR / "training-v1.json").read_text(encoding="utf-8")


# -- route and batch limits ------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("route"), ids=ids("route"))
def test_route_trainer(case: dict[str, Any]) -> None:
    paths = {name: s["path"] for name, s in SOURCES.items() if s["path"] is not None}
    fields = policy_fields(case["policy"])

    def run() -> dict[str, Any]:
        r = TP.route(fields, case["manifest"], paths, case.get("flagged", False), frozenset(case.get("suspended", ())))
        return {"rule": r.rule, "name": r.name, "profile": list(r.profile),
                "limits": list(TP.batch_limits(fields, [r.rule]))}

    got = expect(case, "trainer", run)
    if "want" in case:
        assert got == case["want"]


@pytest.mark.parametrize("case", cases("route"), ids=ids("route"))
def test_route_verifier(case: dict[str, Any]) -> None:
    by_key = {bytes.fromhex(s["key_id"]): s["path"] for s in SOURCES.values() if s["path"] is not None}
    manifest = {**case["manifest"],
                "sources": [{**e, "key_id": bytes.fromhex(e["key_id"])} for e in case["manifest"]["sources"]]}

    def run() -> dict[str, Any]:
        policy = VR.policy_from_fields(policy_fields(case["policy"]))
        r = VR.route_example(policy, manifest, by_key.__getitem__, case.get("flagged", False),
                             frozenset(case.get("suspended", ())))
        return {"rule": r.rule, "name": policy.rule_name(r.rule), "profile": list(r.profile),
                "limits": list(VR.batch_limits(policy, [r.rule]))}

    got = expect(case, "verifier", run)
    if "want" in case:
        assert got == case["want"]


@pytest.mark.parametrize("case", cases("budgets"), ids=ids("budgets"))
def test_budgets_both(case: dict[str, Any]) -> None:
    """dynamics.md §5.5: the rules each checkpoint's profile suspends, in both implementations."""
    fields = policy_fields(case["policy"])
    policy = VR.policy_from_fields(fields)
    for name, suspend in (("trainer", lambda b, n: TP.suspended_rules(fields, b, n)), ("verifier", policy.suspended)):
        got, before = [], None
        for now in case["profiles"]:
            got.append(sorted(suspend(before, now)))
            before = now
        assert got == case["want"], name


@pytest.mark.parametrize("case", cases("batch_limits"), ids=ids("batch_limits"))
def test_batch_limits_both(case: dict[str, Any]) -> None:
    fields = policy_fields(case["policy"])
    t = expect(case, "trainer", lambda: list(TP.batch_limits(fields, case["rules"])))
    v = expect(case, "verifier", lambda: list(VR.batch_limits(VR.policy_from_fields(fields), case["rules"])))
    if "want" in case:
        assert t == case["want"] and v == case["want"]


# -- aggregate -------------------------------------------------------------------------------


def _bits(x: float) -> str:
    return struct.pack(">d", x).hex()


# Known disagreement (reported, not fixed here): verify/_internal/manifests.aggregate does not
# range-check votes, confidences or probs, nor refuse probs under another rule; the verifier
# relies on its manifest schema for the first two. Strict: a fix on either side shows up here.
VERIFIER_DIVERGES: set[str] = set()  # none left: both twins refuse the same inputs


def _aggregate_params() -> list[Any]:
    out = []
    for case in cases("aggregate"):
        for side in ("trainer", "verifier"):
            marks = ([pytest.mark.xfail(strict=True, reason="verifier aggregate() does not refuse this")]
                     if side == "verifier" and case["desc"] in VERIFIER_DIVERGES else [])
            out.append(pytest.param(case, side, marks=marks, id=f"{side}-{case['desc']}"))
    return out


@pytest.mark.parametrize(("case", "side"), _aggregate_params())
def test_aggregate(case: dict[str, Any], side: str) -> None:
    fn = TM.aggregate if side == "trainer" else VM.aggregate
    got = expect(case, side, lambda: fn(case["sources"], case["rule"], case["probs"]))
    if "want" in case:
        label, consensus, confidence = got
        want = case["want"]
        assert label == want["label"]
        # Exact bits: aggregation is evidence, a last-bit difference would reroute an example.
        assert _bits(float(consensus)) == _bits(want["consensus"])
        assert _bits(float(confidence)) == _bits(want["confidence"])


# -- order, steps per epoch, step seeds --------------------------------------------------------


@pytest.mark.parametrize("case", cases("order"), ids=ids("order"))
def test_order_both(case: dict[str, Any]) -> None:
    args = (case["seed"], case["epoch"], case["count"])
    assert TT.epoch_order(*args) == case["want"]
    assert VS.epoch_order(*args) == case["want"]
    assert sorted(case["want"]) == list(range(case["count"]))


@pytest.mark.parametrize("case", cases("steps_per_epoch"), ids=ids("steps_per_epoch"))
def test_steps_per_epoch(case: dict[str, Any]) -> None:
    # Neither twin exposes this as a function (Trainer's run state; settings' check); the file pins
    # specs/training.md §2's formula for a third implementation.
    n, b = case["count"], case["batch_size"]
    assert case["want"] == (n // b if case["drop_last"] else (n + b - 1) // b)


@pytest.mark.parametrize("case", cases("step_seed"), ids=ids("step_seed"))
def test_step_seed_both(case: dict[str, Any]) -> None:
    want = int(case["want"])
    assert 0 <= want < 1 << 64
    assert TT.step_seed(case["seed"], case["step"]) == want
    assert VS.step_seed(case["seed"], case["step"]) == want


@pytest.mark.parametrize("case", cases("micro_seed"), ids=ids("micro_seed"))
def test_micro_seed_both(case: dict[str, Any]) -> None:
    want = int(case["want"])
    assert 0 <= want < 1 << 64
    assert TT.micro_seed(case["seed"], case["step"], case["micro"]) == want
    assert VS.micro_seed(case["seed"], case["step"], case["micro"]) == want
    if case["micro"] == 0:
        assert want == TT.step_seed(case["seed"], case["step"])


# -- digests and band norms ------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("tensor_digest"), ids=ids("tensor_digest"))
def test_tensor_digest_both(case: dict[str, Any]) -> None:
    t = tensor(case)
    assert TC.tensor_digest(t).hex() == case["want"]
    assert VC.tensor_digest(t).hex() == case["want"]


@pytest.mark.parametrize("case", cases("checkpoint_digest"), ids=ids("checkpoint_digest"))
def test_checkpoint_digest_both(case: dict[str, Any]) -> None:
    tensors = {name: tensor(spec) for name, spec in case["tensors"].items()}
    trainer = TC.checkpoint_digest({name: TC.tensor_digest(t) for name, t in tensors.items()})
    _, verifier = VC.digest_state(tensors)
    assert trainer.hex() == case["want"]
    assert verifier.hex() == case["want"]


@pytest.mark.parametrize("case", cases("band_norm"), ids=ids("band_norm"))
def test_band_norm_both(case: dict[str, Any]) -> None:
    grads = [tensor(g) for g in case["grads"]]
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    assert struct.pack(">d", float(TG._band_norm(params))).hex() == case["want"]
    assert struct.pack(">d", float(VP._band_norm(grads))).hex() == case["want"]


# -- the per-example loss field (training.md §3.1, format 4) ------------------------------------


@pytest.mark.parametrize("case", cases("example_losses"), ids=ids("example_losses"))
def test_example_losses_both(case: dict[str, Any]) -> None:
    from gradledger.training.updates import example_loss_bytes
    from gradledger.verify._internal.example_losses import check_example_losses, decode_example_losses

    if "wantErr" in case:
        step = {"batch": list(range(case["batch"])), "example_losses": bytes.fromhex(case["data"])}
        expect(case, "verifier", lambda: check_example_losses(step, 4))
        return
    micros = [torch.tensor([struct.unpack("<f", bytes.fromhex(h))[0] for h in m], dtype=torch.float32)
              for m in case["losses"]]
    data = example_loss_bytes(micros)
    assert data.hex() == case["want"]
    step = {"batch": list(range(case["batch"])), "example_losses": bytes.fromhex(case["want"])}
    check_example_losses(step, 4)
    assert decode_example_losses(step["example_losses"]) == [float(v) for m in micros for v in m]


# -- forensics: source shares (§3) and step ranges (§5) -----------------------------------------


@pytest.mark.parametrize("case", cases("source_shares"), ids=ids("source_shares"))
@pytest.mark.parametrize("side", ["trainer", "verifier"])
def test_source_shares(case: dict[str, Any], side: str) -> None:
    from gradledger.training.forensics.shares import example_shares as trainer_shares
    from gradledger.verify._internal.traces import example_shares as verifier_shares

    shares = (trainer_shares if side == "trainer" else verifier_shares)(case["manifest"])
    assert shares == case["want"]  # each share rounded once to binary64: equal bit for bit


@pytest.mark.parametrize("case", cases("step_ranges"), ids=ids("step_ranges"))
def test_step_ranges_both(case: dict[str, Any]) -> None:
    from gradledger.training.forensics.result import _ranges
    from gradledger.verify._internal.traces import step_ranges

    want = [tuple(r) for r in case["want"]]
    assert step_ranges(case["steps"]) == want
    got = _ranges(torch.tensor(case["steps"], dtype=torch.float64))
    assert [(r["from"], r["to"], r["score"]) for r in got] == want


# -- memorization scores (dynamics.md §1) -----------------------------------------------------


@pytest.mark.parametrize("case", cases("memorization"), ids=ids("memorization"))
def test_memorization_both(case: dict[str, Any]) -> None:
    from gradledger.training.dynamics import LossTraces, flag, scores_digest
    from gradledger.verify._internal import scans as VD

    traces = [[struct.unpack("<f", bytes.fromhex(h))[0] for h in x] for x in case["traces"]]
    want = case["want"]
    # the trainer's: appended step by step, as a run does
    t = LossTraces(len(traces))
    for pos in range(max(len(x) for x in traces)):
        rows = [i for i, x in enumerate(traces) if pos < len(x)]
        t.add(rows, torch.tensor([traces[i][pos] for i in rows], dtype=torch.float32))
    method = case.get("method", "lt-iqr")
    got = t.scores(case["min_trace"], method)
    assert [None if v != v else struct.pack("<d", v).hex() for v in got.tolist()] == want["scores"]
    assert [[i, struct.pack("<d", v).hex()] for i, v in flag(got, case["fraction"])] == want["flagged"]
    assert scores_digest(got).hex() == want["digest"]
    # the verifier's
    mine = VD.scores([list(x) for x in traces], case["min_trace"], method)
    assert [None if v is None else struct.pack("<d", v).hex() for v in mine] == want["scores"]
    assert [[i, struct.pack("<d", v).hex()] for i, v in VD.flagged(mine, case["fraction"])] == want["flagged"]
    assert VD.digest(mine).hex() == want["digest"]


@pytest.mark.parametrize("case", cases("canaries"), ids=ids("canaries"))
def test_canary_ranks_both(case: dict[str, Any]) -> None:
    from gradledger.training.dynamics import LossTraces
    from gradledger.training.dynamics.canaries import canary_exposure, canary_sets
    from gradledger.verify._internal import scans as VD

    fields = [{} if c is None else {"canary": c} for c in case["canaries"]]
    steps = [[(i, struct.unpack("<f", bytes.fromhex(h))[0]) for i, h in s] for s in case["steps"]]
    t = LossTraces(len(fields))  # the trainer's: appended step by step
    last: list[float | None] = [None] * len(fields)  # the verifier's: the last value in step and batch order
    for s in steps:
        t.add([i for i, _ in s], torch.tensor([v for _, v in s], dtype=torch.float32))
        for i, v in s:
            last[i] = v
    assert canary_exposure(t.last(), canary_sets(fields)) == case["want"]
    assert VD.canary_ranks(fields, last) == case["want"]


# -- shards over torch.distributed ranks (distributed.md §2) -----------------------------------


@pytest.mark.parametrize("case", cases("shards"), ids=ids("shards"))
def test_shards_both(case: dict[str, Any]) -> None:
    from gradledger.training.distributed import shard_sizes
    from gradledger.verify._internal.recipe import RecipeInvalid, check_recipe
    from gradledger.verify._internal.recipe import shard_sizes as verifier_shard_sizes

    batch, world = case["batch"], case["world"]
    step = {"batch": list(range(batch)),
            "recipe": {"ranks": verifier_shard_sizes(batch, world), "losses": [1.0] * world}}
    if "wantErr" in case:
        with pytest.raises(Exception, match=case["wantErr"]):
            shard_sizes(batch, world)
        with pytest.raises(RecipeInvalid):
            check_recipe(step, 7, world)
        return
    assert shard_sizes(batch, world) == verifier_shard_sizes(batch, world) == case["want"]
    check_recipe(step, 7, world)  # the trainer's cut is the one the verifier accepts
