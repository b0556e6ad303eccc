#!/usr/bin/env python3
"""Regenerate specs/vectors/training-v1.json, the vectors of the training rules both twins implement.

    python specs/vectors/generate_training.py            # rewrite the JSON file beside this script
    python specs/vectors/generate_training.py --check    # exit 1 if the file on disk differs

Why: the trainer (training/) and the verifier (verify/_internal/) implement routing, batch
limits, aggregation, epoch order, step seeds, tensor/checkpoint digests, band norms and the
per-example loss field twice, on purpose.
One file of ``{desc, inputs, want | wantErr}`` cases (the transparency-dev/merkle layout) that
both test suites walk (tests/test_training_vectors.py) pins the two to each other and lets a
third implementation prove itself. The expected values are computed here with training/ (the
trainer's side); the test never regenerates, it compares both sides to the file.

Deterministic: every input is written out below; no clocks, no randomness.
``wantErr`` is a substring that the raised error's message must contain.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradledger.training import checkpoints as TC
from gradledger.training import manifests as TM
from gradledger.training import policy as TP
from gradledger.training import trainer as TT

OUT = Path(__file__).resolve().parent / "training-v1.json"
FORMAT = "gradledger-training-vectors/1"
SIGNER = "00" * 32

# -- route ---------------------------------------------------------------------

BANDS = ["head", "mid", "body"]
SOURCES = {  # name -> key id (hex) and credential path; both implementations resolve through this
    "dr-a": {"key_id": "11" * 32, "path": "acme/clinic/radiology"},
    "dr-b": {"key_id": "12" * 32, "path": "acme/clinic/pathology"},
    "crowd-1": {"key_id": "21" * 32, "path": "acme/crowd/mturk"},
    "crowd-2": {"key_id": "22" * 32, "path": "acme/crowd/mturk"},
    "clinicx": {"key_id": "31" * 32, "path": "acme/clinicx"},
    "ghost": {"key_id": "41" * 32, "path": None},  # no credential: unroutable
}


def _policy(rules: list[dict[str, Any]], default: dict[str, Any] | None = None,
            monitors: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {"v": 1, "name": "vectors", "bands": list(BANDS), "rules": rules,
           "default": default or {"profile": [1.0, 0.0, 0.0], "limits": [1.0, None, None]},
           "signer": SIGNER, "time": 0}
    if monitors is not None:
        out["monitors"] = monitors
    return out


#: A rule on the memorization flags (dynamics.md §2.4) and the scans such a policy must require.
MEMORIZED = {"name": "memorized", "match": {"memorized": True}, "profile": [1.0, 0.0, 0.0], "limits": [None, None, None]}
SCANS = {"memorization": {"fraction": 0.01, "min_trace": 4}}


BASE_RULES = [
    {"name": "expert", "match": {"authority": "acme/clinic", "min_confidence": 0.9},
     "profile": [1.0, 1.0, 1.0], "limits": [4.0, 2.0, 1.0]},
    {"name": "crowd-agree", "match": {"authority": "acme/crowd", "min_consensus": 0.75, "aggregation": ["majority"]},
     "profile": [1.0, 0.5, 0.0], "limits": [2.0, 0.5, None]},
    {"name": "reviewed", "match": {"review": ["fixed"], "max_confidence": 0.5},
     "profile": [0.5, 0.25, 0.125], "limits": [None, 3.0, 0.25]},
]


def _manifest(sources: list[str], confidence: float = 0.95, consensus: float = 1.0,
              review: str = "accepted", aggregation: str = "majority") -> dict[str, Any]:
    return {"label": 3, "confidence": confidence, "consensus": consensus, "review": review,
            "aggregation": aggregation,
            "sources": [{"source": s, "key_id": SOURCES[s]["key_id"], "vote": 3, "confidence": 1.0} for s in sources]}


def fields(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy map as the implementations take it: ``signer`` hex in the file, bytes in CBOR."""
    return {**policy, "signer": bytes.fromhex(policy["signer"])}


def _route_want(policy: dict[str, Any], manifest: dict[str, Any], flagged: bool,
                suspended: frozenset[int] = frozenset()) -> dict[str, Any]:
    policy = fields(policy)
    paths = {n: v["path"] for n, v in SOURCES.items() if v["path"] is not None}
    r = TP.route(policy, manifest, paths, flagged, suspended)
    return {"rule": r.rule, "name": r.name, "profile": list(r.profile),
            "limits": list(TP.batch_limits(policy, [r.rule]))}


def route_cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def ok(desc: str, manifest: dict[str, Any], rules: list[dict[str, Any]] = BASE_RULES,
           flagged: bool | None = None, suspended: list[int] | None = None) -> None:
        # ``flagged``: the example is among the memorization flags in force (absent: not flagged);
        # ``suspended``: the rules an entropy budget suspends at the step (dynamics.md §5.5; absent: none)
        p = _policy(rules, monitors=SCANS if any("memorized" in r["match"] for r in rules) else None)
        case = {"desc": desc, "policy": p, "manifest": manifest}
        if flagged is not None:
            case["flagged"] = flagged
        if suspended is not None:
            case["suspended"] = suspended
        out.append({**case, "want": _route_want(p, manifest, bool(flagged), frozenset(suspended or ()))})

    def err(desc: str, manifest: dict[str, Any], want_err: str, policy: dict[str, Any] | None = None) -> None:
        p = policy or _policy(BASE_RULES)
        paths = {n: v["path"] for n, v in SOURCES.items() if v["path"] is not None}
        try:
            TP.route(fields(p), manifest, paths)
        except Exception as exc:  # the generator checks that the trainer's side does raise
            assert want_err in str(exc), (desc, str(exc))
        else:
            raise AssertionError(f"{desc}: trainer did not raise")
        out.append({"desc": desc, "policy": p, "manifest": manifest, "wantErr": want_err})

    ok("one expert, confident: first rule", _manifest(["dr-a"]))
    ok("two experts under the same authority", _manifest(["dr-a", "dr-b"]))
    ok("expert below min_confidence falls through to default", _manifest(["dr-a"], confidence=0.89))
    ok("confidence exactly min_confidence matches (>=)", _manifest(["dr-a"], confidence=0.9))
    ok("mixed expert + crowd is not expert (all sources)", _manifest(["dr-a", "crowd-1"], consensus=0.5))
    ok("path prefix is by component: acme/clinicx is not under acme/clinic", _manifest(["clinicx"]))
    ok("crowd with consensus 0.75 by majority", _manifest(["crowd-1", "crowd-2"], confidence=0.6, consensus=0.75))
    ok("crowd with consensus below 0.75: default", _manifest(["crowd-1", "crowd-2"], confidence=0.6, consensus=0.5))
    ok("crowd by label-model: aggregation not listed, default",
       _manifest(["crowd-1"], confidence=0.6, aggregation="label-model"))
    ok("fixed review with low confidence: third rule", _manifest(["crowd-1"], confidence=0.5, review="fixed",
                                                                  consensus=0.0))
    ok("fixed review above max_confidence: default", _manifest(["crowd-1"], confidence=0.51, review="fixed",
                                                               consensus=0.0))
    ok("no sources prove no authority: falls to a rule without authority",
       _manifest([], confidence=0.1, review="fixed"))
    ok("no sources and no authority-free rule matches: default", _manifest([], confidence=0.99))
    ok("integer confidence is routed as its number", {**_manifest(["dr-a"]), "confidence": 1})
    ok("empty rule list: default", _manifest(["dr-a"]), rules=[])
    ok("rule with empty match matches everything", _manifest(["crowd-1"], confidence=0.0),
       rules=[{"name": "all", "match": {}, "profile": [0.5, 0.5, 0.5], "limits": [None, None, None]}])
    err("source without a credential path", _manifest(["ghost"]), "has no credential")
    err("unknown review state", _manifest(["dr-a"], review="maybe"), "review")
    err("confidence not finite", {**_manifest(["dr-a"]), "confidence": None}, "confidence")
    err("non-increasing profile violated", _manifest(["dr-a"]), "profile",
        _policy([{"name": "grows", "match": {}, "profile": [0.5, 1.0, 0.0], "limits": [None, None, None]}]))
    err("profile length differs from bands", _manifest(["dr-a"]), "one entry per band",
        _policy([{"name": "short", "match": {}, "profile": [1.0, 1.0], "limits": [None, None]}]))
    err("min_confidence above max_confidence", _manifest(["dr-a"]), "min_confidence",
        _policy([{"name": "never", "match": {"min_confidence": 0.8, "max_confidence": 0.2},
                  "profile": [1.0, 0.0, 0.0], "limits": [None, None, None]}]))
    err("duplicate rule names", _manifest(["dr-a"]), "name",
        _policy([{"name": "twice", "match": {}, "profile": [1.0, 0.0, 0.0], "limits": [None, None, None]}] * 2))
    err("multiplier above 1", _manifest(["dr-a"]), "policy",
        _policy([{"name": "big", "match": {}, "profile": [1.5, 0.0, 0.0], "limits": [None, None, None]}]))
    ok("a flagged expert label takes the memorized rule before the expert one", _manifest(["dr-a"]),
       [MEMORIZED, *BASE_RULES], flagged=True)
    ok("the same label unflagged: the expert rule", _manifest(["dr-a"]), [MEMORIZED, *BASE_RULES], flagged=False)
    ok("memorized false matches only unflagged examples: flagged falls through to the default",
       _manifest(["dr-a"]), [{**BASE_RULES[0], "match": {**BASE_RULES[0]["match"], "memorized": False}}], flagged=True)
    ok("a reference canary writes into no band, before every rule (policy.md §3)",
       {**_manifest(["dr-a"]), "canary": {"set": "noise", "role": "reference"}}, [MEMORIZED, *BASE_RULES],
       flagged=True)
    ok("an inserted canary routes like any label", {**_manifest(["dr-a"]), "canary": {"set": "noise", "role": "inserted"}})
    budgeted = [{**BASE_RULES[0], "entropy_budget": {"band": "mid", "max_change": 0.25}}, *BASE_RULES[1:]]
    ok("an expert label under its rule's entropy budget: the expert rule", _manifest(["dr-a"]), budgeted,
       suspended=[])
    ok("the expert rule suspended by its budget (dynamics.md §5.5): the label falls to the default",
       _manifest(["dr-a"]), budgeted, suspended=[0])
    ok("a suspended rule another label does not match changes nothing", _manifest(["crowd-1", "crowd-2"]), budgeted,
       suspended=[0])
    err("a budget on a band the policy lacks", _manifest(["dr-a"]), "entropy_budget",
        _policy([{**BASE_RULES[0], "entropy_budget": {"band": "nowhere", "max_change": 0.25}}]))
    err("a budget of no bits", _manifest(["dr-a"]), "max_change",
        _policy([{**BASE_RULES[0], "entropy_budget": {"band": "mid", "max_change": 0.0}}]))
    err("memorized without the scans that flag (monitors.memorization)", _manifest(["dr-a"]), "memorized",
        _policy([MEMORIZED, *BASE_RULES]))
    err("memorized is a bool, not 1", _manifest(["dr-a"]), "memorized",
        _policy([{**MEMORIZED, "match": {"memorized": 1}}], monitors=SCANS))
    return out


def batch_limits_cases() -> list[dict[str, Any]]:
    p = _policy(BASE_RULES)
    f = fields(p)
    out = []
    for desc, rules in [("default alone", [-1]), ("expert alone", [0]), ("expert and crowd: least per band", [0, 1]),
                        ("crowd does not write band 2: no limit from it", [1]), ("all rules and default", [0, 1, 2, -1]),
                        ("repeated rules count once", [1, 1, 1]), ("empty batch: unconstrained", [])]:
        out.append({"desc": desc, "policy": p, "rules": rules, "want": list(TP.batch_limits(f, rules))})
    try:
        TP.batch_limits(f, [7])
    except Exception as exc:
        assert "no rule 7" in str(exc)
    out.append({"desc": "rule index out of range", "policy": p, "rules": [7], "wantErr": "no rule 7"})
    return out


# -- aggregate -----------------------------------------------------------------


def _votes(*pairs: tuple[int, float]) -> list[dict[str, Any]]:
    return [{"vote": v, "confidence": c} for v, c in pairs]


def aggregate_cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def ok(desc: str, sources: list[dict[str, Any]], rule: str, probs: list[float] | None = None) -> None:
        label, consensus, confidence = TM.aggregate(sources, rule, probs)
        out.append({"desc": desc, "sources": sources, "rule": rule, "probs": probs,
                    "want": {"label": label, "consensus": consensus, "confidence": confidence}})

    def err(desc: str, sources: list[dict[str, Any]], rule: str, want_err: str, probs: list[float] | None = None) -> None:
        try:
            TM.aggregate(sources, rule, probs)
        except Exception as exc:
            assert want_err in str(exc), (desc, str(exc))
        else:
            raise AssertionError(f"{desc}: trainer did not raise")
        out.append({"desc": desc, "sources": sources, "rule": rule, "probs": probs, "wantErr": want_err})

    ok("single voter", _votes((4, 0.8)), "single")
    ok("single voter with abstainers", _votes((-1, 1.0), (2, 0.3), (-1, 0.0)), "single")
    ok("majority by confidence, not count", _votes((1, 0.9), (2, 0.4), (2, 0.4)), "majority")
    ok("majority tie goes to the smaller class", _votes((5, 0.5), (3, 0.5)), "majority")
    ok("majority confidence is exact sum ratio (0.1+0.2 of 0.1+0.2+0.3)", _votes((0, 0.1), (0, 0.2), (1, 0.3)),
       "majority")
    ok("majority with all confidences 0: count decides, confidence 0", _votes((7, 0.0), (7, 0.0), (1, 0.0)),
       "majority")
    ok("majority of one", _votes((9, 0.25)), "majority")
    ok("majority with abstainers excluded from consensus", _votes((2, 1.0), (-1, 1.0), (3, 0.5), (2, 0.5)),
       "majority")
    ok("majority with tiny confidences (subnormal exactness)", _votes((0, 5e-324), (1, 5e-324), (1, 5e-324)),
       "majority")
    ok("majority consensus 1/3 rounds correctly", _votes((0, 1.0), (1, 0.1), (2, 0.1)), "majority")
    ok("label-model: argmax of probs", _votes((0, 1.0), (1, 1.0)), "label-model", [0.1, 0.7, 0.2])
    ok("label-model: tie goes to the first index", _votes((2, 1.0)), "label-model", [0.4, 0.2, 0.4])
    err("every source abstains", _votes((-1, 1.0), (-1, 0.5)), "majority", "abstain")
    err("no sources at all", [], "single", "abstain")
    err("single with two voters", _votes((1, 1.0), (2, 1.0)), "single", "single")
    err("unknown rule", _votes((1, 1.0)), "plurality", "plurality")
    err("label-model without probs", _votes((1, 1.0)), "label-model", "label-model")
    err("label-model with no probabilities", _votes((1, 1.0)), "label-model", "label-model", [])
    # The trainer refuses these at aggregate(); the verifier's aggregate() does not (its manifest
    # schema refuses the first three on parsed manifests; probs are not range-checked).
    err("probs given to a rule other than label-model", _votes((1, 1.0)), "majority", "label-model", [0.2, 0.8])
    err("confidence above 1", _votes((1, 1.5)), "majority", "confidence")
    err("vote below -1", _votes((-2, 1.0)), "majority", "vote")
    err("label-model probability above 1", _votes((1, 1.0)), "label-model", "label-model", [2.0, 0.1])
    return out


# -- order, steps_per_epoch, step_seed -----------------------------------------


def order_cases() -> list[dict[str, Any]]:
    out = []
    for desc, seed, epoch, count in [("empty dataset", 0, 0, 0), ("one example", 0, 0, 1), ("seed 0 epoch 0", 0, 0, 10),
                                     ("seed 0 epoch 1 differs", 0, 1, 10), ("seed 1 epoch 0", 1, 0, 10),
                                     ("large seed (uint64 max)", 2**64 - 1, 3, 12),
                                     ("count crosses the 1-byte CBOR uint boundary (24)", 42, 0, 30),
                                     ("epoch 1000", 7, 1000, 16)]:
        out.append({"desc": desc, "seed": seed, "epoch": epoch, "count": count,
                    "want": TT.epoch_order(seed, epoch, count)})
    return out


def steps_per_epoch_cases() -> list[dict[str, Any]]:
    # specs/training.md §2: N // B with drop_last, else ceil(N / B); 0 steps is refused by both sides.
    out = []
    for n, b, drop in [(10, 3, False), (10, 3, True), (9, 3, False), (9, 3, True), (1, 4, False), (4, 4, True),
                       (1000, 7, False), (1000, 7, True)]:
        out.append({"desc": f"N={n} B={b} drop_last={drop}", "count": n, "batch_size": b, "drop_last": drop,
                    "want": n // b if drop else -(-n // b)})
    return out


def step_seed_cases() -> list[dict[str, Any]]:
    out = []
    for desc, seed, step in [("seed 0 step 0", 0, 0), ("seed 0 step 1", 0, 1), ("seed 1 step 0", 1, 0),
                             ("step 23/24 CBOR boundary", 5, 23), ("step 24", 5, 24), ("step 65536", 5, 65536),
                             ("seed 2^32", 2**32, 9), ("seed uint64 max", 2**64 - 1, 2**64 - 1)]:
        out.append({"desc": desc, "seed": seed, "step": step, "want": str(TT.step_seed(seed, step))})
    return out


def micro_seed_cases() -> list[dict[str, Any]]:
    """Format 2 (specs/training.md §2): micro-batch 0 takes step_seed; j >= 1 the micro-seed rule."""
    out = []
    for desc, seed, step, micro in [("micro 0 is the step seed", 7, 3, 0), ("micro 1", 7, 3, 1), ("micro 2", 7, 3, 2),
                                    ("micro 23/24 CBOR boundary", 7, 3, 23), ("micro 24", 7, 3, 24),
                                    ("seed uint64 max", 2**64 - 1, 0, 1)]:
        out.append({"desc": desc, "seed": seed, "step": step, "micro": micro,
                    "want": str(TT.micro_seed(seed, step, micro))})
    return out


# -- tensor_digest, checkpoint_digest --------------------------------------------

_NP = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4", "uint8": "u1",
       "bool": "?", "int8": "i1"}


def _tensor(dtype: str, shape: list[int], data_hex: str) -> torch.Tensor:
    raw = bytearray(bytes.fromhex(data_hex))
    if dtype == "bfloat16":
        return torch.frombuffer(raw, dtype=torch.bfloat16).reshape(shape) if raw else torch.empty(shape, dtype=torch.bfloat16)
    return torch.from_numpy(np.frombuffer(bytes(raw), dtype=_NP[dtype]).copy().reshape(shape))


TENSORS = [
    ("float32 scalar 1.0", "float32", [], np.array(1.0, "<f4").tobytes().hex()),
    ("float32 vector", "float32", [3], np.array([0.5, -2.0, 3.25], "<f4").tobytes().hex()),
    ("float32 2x2", "float32", [2, 2], np.array([[1, 2], [3, 4]], "<f4").tobytes().hex()),
    ("float32 -0.0 differs from 0.0 by bits", "float32", [1], "00000080"),
    ("float32 NaN payload kept", "float32", [1], "0100c07f"),
    ("float64 vector", "float64", [2], np.array([1e-300, 2.5], "<f8").tobytes().hex()),
    ("float16", "float16", [2], np.array([1.5, -0.25], "<f2").tobytes().hex()),
    ("bfloat16", "bfloat16", [2], "803f00c0"),
    ("int64", "int64", [2], np.array([-1, 2**40], "<i8").tobytes().hex()),
    ("int32 3x1", "int32", [3, 1], np.array([7, 8, 9], "<i4").tobytes().hex()),
    ("uint8", "uint8", [4], "00017fff"),
    ("bool", "bool", [3], "010001"),
    ("empty float32 (0,)", "float32", [0], ""),
    ("empty float32 (2,0): shape matters", "float32", [2, 0], ""),
    ("same bytes, other shape", "float32", [1, 3], np.array([0.5, -2.0, 3.25], "<f4").tobytes().hex()),
]


def tensor_cases() -> list[dict[str, Any]]:
    return [{"desc": d, "dtype": dt, "shape": sh, "data": h, "want": TC.tensor_digest(_tensor(dt, sh, h)).hex()}
            for d, dt, sh, h in TENSORS]


def checkpoint_cases() -> list[dict[str, Any]]:
    t = {d: (dt, sh, h) for d, dt, sh, h in TENSORS}
    groups = [
        ("empty state", {}),
        ("one tensor", {"w": t["float32 vector"]}),
        ("two tensors", {"layer.weight": t["float32 2x2"], "layer.bias": t["float32 vector"]}),
        ("names sort by canonical CBOR (length first)", {"bb": t["int64"], "a": t["bool"], "c": t["uint8"]}),
        ("optimizer and scalars", {"model.w": t["float32 scalar 1.0"], "optim.state.0.step": t["int64"],
                                   "gradledger.x": t["bfloat16"]}),
    ]
    out = []
    for desc, tensors in groups:
        spec = {name: {"dtype": dt, "shape": sh, "data": h} for name, (dt, sh, h) in tensors.items()}
        digests = {name: TC.tensor_digest(_tensor(dt, sh, h)) for name, (dt, sh, h) in tensors.items()}
        out.append({"desc": desc, "tensors": spec, "want": TC.checkpoint_digest(digests).hex()})
    return out


# -- band_norm -------------------------------------------------------------------


def band_norm_cases() -> list[dict[str, Any]]:
    from gradledger.training import gate as TG

    out = []
    groups = [
        ("no gradients: 0", []),
        ("one float32 parameter 3-4-5", [("float32", [2], np.array([3, 4], "<f4").tobytes().hex())]),
        ("two float32 parameters", [("float32", [2], np.array([3, 4], "<f4").tobytes().hex()),
                                    ("float32", [1], np.array([12], "<f4").tobytes().hex())]),
        ("float32 norm rounded before float64 L2", [("float32", [3], np.array([0.1, 0.2, 0.3], "<f4").tobytes().hex()),
                                                    ("float32", [2, 2], np.array([1e-3, 1, 2, 3], "<f4").tobytes().hex())]),
        ("mixed float64 and float32", [("float64", [2], np.array([1e-200, 1.0], "<f8").tobytes().hex()),
                                       ("float32", [1], np.array([2.0], "<f4").tobytes().hex())]),
        ("zeros", [("float32", [4], "00" * 16)]),
    ]
    for desc, grads in groups:
        params = []
        for dt, sh, h in grads:
            g = _tensor(dt, sh, h)
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            params.append(p)
        value = float(TG._band_norm(params))
        out.append({"desc": desc, "grads": [{"dtype": dt, "shape": sh, "data": h} for dt, sh, h in grads],
                    "want": np.array(value, ">f8").tobytes().hex()})
    return out


# -- example_losses (training.md §3.1, format 4) -------------------------------


def example_losses_cases() -> list[dict[str, Any]]:
    """Micro-batches of binary32 losses (each value's bits in hex) -> the field's bytes; and malformed fields."""
    from gradledger.training.updates import example_loss_bytes

    def bits(v: float) -> str:
        return struct.pack("<f", v).hex()

    out: list[dict[str, Any]] = []
    for desc, micros in [
        ("one batch", [[2.302585, 0.0, 1e-45]]),
        ("two micro-batches, concatenated in order", [[0.5, 3.0], [7.25]]),
        ("largest finite binary32 and the smallest normal", [[3.4028234663852886e38, 1.1754943508222875e-38]]),
    ]:
        tensors = [torch.tensor(m, dtype=torch.float32) for m in micros]
        want = example_loss_bytes(tensors)
        out.append({"desc": desc, "losses": [[bits(float(v)) for v in t] for t in tensors],
                    "batch": sum(len(m) for m in micros), "want": want.hex()})
    for desc, data, batch, err in [
        ("three bytes short", "0000803f" * 2 + "000080", 3, "4 for each"),
        ("one loss too many", "0000803f" * 3, 2, "4 for each"),
        ("not finite", "0000803f" + "0000c07f", 2, "not finite"),
        ("infinite", "0000807f", 1, "not finite"),
    ]:
        out.append({"desc": desc, "data": data, "batch": batch, "wantErr": err})
    return out


# -- forensics (forensics.md §3 source shares, §5 step ranges) ---------------------------------


def source_shares_cases() -> list[dict[str, Any]]:
    """A manifest's label and votes -> each source's share of the example (forensics.md §3)."""
    from gradledger.training.forensics.shares import example_shares

    def vote(source: str, v: int, confidence: float) -> dict[str, Any]:
        return {"source": source, "vote": v, "confidence": confidence}

    out: list[dict[str, Any]] = []
    for desc, label, votes in [
        ("one voter carries it all", 3, [vote("a", 3, 0.9)]),
        ("shares by confidence among the votes for the label", 8, [vote("a", 8, 0.9), vote("b", 8, 0.3),
                                                                  vote("c", 3, 1.0)]),
        ("an abstention and a dissent share nothing", 1, [vote("a", 1, 0.5), vote("b", -1, 0.0), vote("c", 2, 0.7)]),
        ("confidences adding to 0: each vote counts 1", 2, [vote("a", 2, 0.0), vote("b", 2, 0.0), vote("c", 2, 0.0)]),
        ("no vote for the label: unattributed", 5, [vote("a", 4, 0.8), vote("b", 6, 0.9)]),
        ("thirds, each rounded once", 0, [vote("a", 0, 0.1), vote("b", 0, 0.1), vote("c", 0, 0.1)]),
        ("one source voting twice adds up", 7, [vote("a", 7, 0.25), vote("a", 7, 0.5), vote("b", 7, 0.25)]),
    ]:
        manifest = {"label": label, "sources": votes}
        out.append({"desc": desc, "manifest": manifest, "want": example_shares(manifest)})
    return out


def step_ranges_cases() -> list[dict[str, Any]]:
    """Per-step totals -> the report's step ranges [from, to, score] (forensics.md §5: at most 20 equal ranges)."""
    out: list[dict[str, Any]] = []
    for desc, steps in [
        ("fewer steps than ranges: one range per step", [0.5, -0.25, 1.0]),
        ("exactly twenty", [float(i) / 4 for i in range(20)]),
        ("forty-one steps: ranges of three, the last short", [0.125 * (i % 5) for i in range(41)]),
    ]:
        n, width = len(steps), max(1, -(-len(steps) // 20))
        want = [[lo, min(n, lo + width) - 1, sum(steps[lo: lo + width])] for lo in range(0, n, width)]
        out.append({"desc": desc, "steps": steps, "want": want})
    return out


def shards_cases() -> list[dict[str, Any]]:
    """A batch cut into one shard per rank, rank 0 first (distributed.md §2)."""
    out: list[dict[str, Any]] = []
    for desc, batch, world in [
        ("even: 64 examples over 2 ranks", 64, 2),
        ("uneven: the first 64 mod 3 ranks one larger", 64, 3),
        ("a short last batch of an epoch: 16 over 4", 16, 4),
        ("one example per rank", 4, 4),
        ("uneven at 7 ranks", 100, 7),
    ]:
        q, r = divmod(batch, world)
        out.append({"desc": desc, "batch": batch, "world": world, "want": [q + 1] * r + [q] * (world - r)})
    out.append({"desc": "fewer examples than ranks: a shard would be empty", "batch": 3, "world": 4,
                "wantErr": "non-empty"})
    return out


def memorization_cases() -> list[dict[str, Any]]:
    """Per-index loss traces (binary32) -> the method's scores (LT-IQR where ``method`` is absent), the flagged top
    fraction and the scores digest (dynamics.md §1)."""
    from gradledger.training.dynamics import LossTraces, flag, scores_digest

    def f32(v: float) -> str:
        return struct.pack("<f", v).hex()

    out: list[dict[str, Any]] = []
    lt, mean = "lt-iqr", "mean-loss"
    for desc, traces, min_trace, fraction, method in [
        ("four losses: the type-7 quartiles interpolate", [[0.5, 0.25, 2.0, 1.0]], 4, 1.0, lt),
        ("too short a trace has no score", [[1.0, 2.0, 3.0], [0.125]], 2, 1.0, lt),
        ("ties flag the lower index first", [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], 2, 0.5, lt),
        ("binary32 values that are not dyadic", [[0.1, 0.7, 0.3, 2.3, 1.9], [3.3, 0.01, 0.02, 0.03, 5.5]], 3, 0.5, lt),
        ("a fraction rounds up", [[float(i), float(i) * 0.5, 0.0, 1.0] for i in range(7)], 4, 0.2, lt),
        ("no example scored: nothing flagged, every score the NaN", [[1.0], [], [2.0]], 2, 1.0, lt),
        ("mean-loss: the mean of the trace", [[0.5, 0.25, 2.0, 1.0], [0.1, 0.7, 0.3]], 3, 1.0, mean),
        ("mean-loss: the sum exactly rounded (1 + 2^-53 + 2^-53 left to right in binary64 loses both halves)",
         [[1.0, 2.0**-53, 2.0**-53], [2.0**-53, 2.0**-53, 1.0]], 3, 1.0, mean),
        ("mean-loss: too short a trace has no score; ties to the lower index", [[2.0, 0.0], [1.0, 1.0], [5.0]], 2,
         0.5, mean),
    ]:
        t = LossTraces(len(traces))
        for pos in range(max(len(x) for x in traces)):
            rows = [i for i, x in enumerate(traces) if pos < len(x)]
            t.add(rows, torch.tensor([traces[i][pos] for i in rows], dtype=torch.float32))
        scores = t.scores(min_trace, method)
        out.append({
            "desc": desc, "traces": [[f32(v) for v in x] for x in traces], "min_trace": min_trace,
            "fraction": fraction, **({"method": method} if method != lt else {}),
            "want": {"scores": [None if v != v else struct.pack("<d", v).hex() for v in scores.tolist()],
                     "flagged": [[i, struct.pack("<d", v).hex()] for i, v in flag(scores, fraction)],
                     "digest": scores_digest(scores).hex()},
        })
    return out


def canary_cases() -> list[dict[str, Any]]:
    """Steps of (index, binary32 loss) and each index's canary field -> each set's reference count and its
    inserted canaries' ranks (dynamics.md §4.2)."""
    from gradledger.training.dynamics import LossTraces
    from gradledger.training.dynamics.canaries import canary_exposure, canary_sets

    ins, ref = ({"set": s, "role": r} for s, r in (("a", "inserted"), ("a", "reference")))
    out: list[dict[str, Any]] = []
    for desc, canaries, steps in [
        ("the lowest loss ranks first; ties count against the canary", [ins, ref, ref, ref],
         [[(0, 0.5), (1, 0.5), (2, 2.0), (3, 0.25)]]),
        ("the last recorded loss counts: a later step, then a later batch position", [ins, ref, None],
         [[(0, 3.0), (1, 1.0)], [(0, 0.125), (2, 9.0), (0, 2.0)]]),
        ("a reference never drawn is not counted; a canary never drawn has no rank", [ins, ins, ref, ref],
         [[(0, 1.0), (2, 4.0)]]),
        ("two sets, by name", [{"set": "b", "role": "inserted"}, ins, {"set": "b", "role": "reference"}, ref],
         [[(0, 0.1), (1, 0.3), (2, 0.2), (3, 0.2)]]),
    ]:
        t = LossTraces(len(canaries))
        for step in steps:
            t.add([i for i, _ in step], torch.tensor([v for _, v in step], dtype=torch.float32))
        fields = [{} if c is None else {"canary": c} for c in canaries]
        out.append({"desc": desc, "canaries": canaries,
                    "steps": [[[i, struct.pack("<f", v).hex()] for i, v in s] for s in steps],
                    "want": canary_exposure(t.last(), canary_sets(fields))})
    return out


def budget_cases() -> list[dict[str, Any]]:
    """dynamics.md §5.5: per checkpoint in order, the profile's mean per band -> the rules it suspends."""
    rules = [{**BASE_RULES[0], "entropy_budget": {"band": "mid", "max_change": 0.25}},
             {**BASE_RULES[1], "entropy_budget": {"band": "body", "max_change": 0.5}}, *BASE_RULES[2:]]
    policy = _policy(rules)
    sliced = _policy([{**BASE_RULES[0], "entropy_budget": {"band": "mid", "max_change": 0.25, "slice": "acme/crowd"}},
                      *BASE_RULES[1:]])

    def sl(crowd: float, expert: float) -> dict[str, Any]:
        return {"names": ["acme/clinic", "acme/crowd"], "counts": [5, 5],
                "entropy": [[1.0, 1.0], [expert, crowd], [3.0, 3.0]]}
    out = []
    for desc, p, profiles in [
        ("the first checkpoint suspends nothing", policy, [[1.0, 2.0, 3.0]]),
        ("changes within the budgets", policy, [[1.0, 2.0, 3.0], [0.5, 1.75, 2.5]]),
        ("exactly the budget is within it (the change must exceed it)", policy, [[1.0, 2.0, 3.0], [1.0, 1.75, 3.5]]),
        ("the mid band falls past its budget: the expert rule", policy, [[1.0, 2.0, 3.0], [1.0, 1.5, 3.0]]),
        ("a rise counts as a fall does; both bands past: both rules", policy, [[1.0, 2.0, 3.0], [1.0, 2.5, 3.75]]),
        ("each checkpoint against the previous one, not the first", policy,
         [[3.0, 3.0, 3.0], [3.0, 2.0, 3.0], [3.0, 1.9, 3.0]]),
        ("a budget on a slice reads that slice, not the band's mean", sliced,
         [{"mean": [1.0, 2.0, 3.0], "slices": sl(2.0, 2.0)}, {"mean": [1.0, 2.0, 3.0], "slices": sl(1.5, 2.0)},
          {"mean": [1.0, 1.0, 3.0], "slices": sl(1.5, 1.0)}]),
        ("a profile without the slice suspends the rule (a budget that cannot be read is not kept)", sliced,
         [{"mean": [1.0, 2.0, 3.0], "slices": sl(2.0, 2.0)}, {"mean": [1.0, 2.0, 3.0]}]),
    ]:
        profiles = [x if isinstance(x, dict) else {"mean": x} for x in profiles]
        want, before = [], None
        for now in profiles:
            want.append(sorted(TP.suspended_rules(fields(p), before, now)))
            before = now
        out.append({"desc": desc, "policy": p, "profiles": profiles, "want": want})
    return out


def document() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "notes": [
            "Generated by specs/vectors/generate_training.py; walked by tests/test_training_vectors.py "
            "through training/ and verify/_internal/.",
            "route: sources resolve by name (trainer) or key_id (verifier) to the path in 'sources'; "
            "path null means no credential. want.limits is batch_limits of that one rule. 'flagged' (absent: "
            "false) is whether the example is among the memorization flags in force (dynamics.md §2.4); "
            "'suspended' (absent: none) the rules an entropy budget suspends at the step (dynamics.md §5.5).",
            "budgets: per checkpoint in order its DepthProfile's mean (and slices); want the rules each suspends (§5.5).",
            "canaries: steps are lists of [index, binary32 loss hex] in batch order; canaries gives each index's "
            "manifest canary field (null: not a canary); want is the MemorizationScan's canaries (dynamics.md §4.2).",
            "step_seed and micro_seed want is a decimal string (uint64). band_norm want is the big-endian float64 hex.",
            "tensor data is the little-endian C-order bytes in hex; wantErr is a substring of the message.",
            "example_losses: losses are each micro-batch's binary32 values as little-endian hex; want is the "
            "GovernedUpdate field (format 4) in hex; wantErr cases give the field (data) and the batch's length.",
            "source_shares: a manifest's label and votes, and each source's share of the example (forensics.md §3; "
            "the unattributed name when no vote is for the label). step_ranges: per-step totals (dyadic, so any "
            "summation order is exact) and the §5 ranges [from, to, score].",
            "memorization: each dataset index's loss trace as binary32 little-endian hex; 'method' (absent: lt-iqr) the "
            "score; want.scores the method's score "
            "as binary64 little-endian hex (null: no score), flagged [[index, score hex]] and digest (dynamics.md §1).",
            "shards: a step's batch cut into one shard per torch.distributed rank, rank 0 first (distributed.md §2); "
            "wantErr where a shard would be empty (the trainer refuses; the verifier refuses such recipe.ranks).",
        ],
        "bands": BANDS,
        "sources": SOURCES,
        "route": route_cases(),
        "batch_limits": batch_limits_cases(),
        "aggregate": aggregate_cases(),
        "order": order_cases(),
        "steps_per_epoch": steps_per_epoch_cases(),
        "step_seed": step_seed_cases(),
        "micro_seed": micro_seed_cases(),
        "tensor_digest": tensor_cases(),
        "checkpoint_digest": checkpoint_cases(),
        "band_norm": band_norm_cases(),
        "example_losses": example_losses_cases(),
        "source_shares": source_shares_cases(),
        "step_ranges": step_ranges_cases(),
        "memorization": memorization_cases(),
        "canaries": canary_cases(),
        "shards": shards_cases(),
        "budgets": budget_cases(),
        "privacy": privacy_cases(),
    }


def privacy_cases() -> list[dict[str, Any]]:
    """specs/privacy.md §3: the noise seed of (run seed, step, band) and the first draws added into a zero
    gradient of that band's first parameter, ``sigma * C / B`` times standard normals."""
    from gradledger.training import privacy as PR

    out = []
    for desc, seed, step, band, clip, noise, batch in [
            ("run seed 0, step 0, the head", 0, 0, 0, 1.0, 1.0, 16), ("step 1", 0, 1, 0, 1.0, 1.0, 16),
            ("band 2", 0, 0, 2, 1.0, 1.0, 16), ("clip 0.5, sigma 1.3, batch 7", 7, 3, 1, 0.5, 1.3, 7),
            ("seed and step uint64 max", 2**64 - 1, 2**64 - 1, 1, 1.0, 1.0, 1)]:
        plan = PR.PrivacyPlan(tuple([None] * band + [clip]), tuple([None] * band + [noise]), 1e-5, frozenset())
        p = torch.nn.Parameter(torch.zeros(6))
        PR.add_noise([[] for _ in range(band)] + [[p]], plan, seed, step, batch)
        assert p.grad is not None
        out.append({"desc": desc, "run_seed": seed, "step": step, "band": band, "clip": clip, "noise": noise,
                    "batch": batch, "seed": PR.noise_seed(seed, step, band), "first": p.grad.tolist()})
    return out


def render() -> str:
    return json.dumps(document(), indent=1, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
