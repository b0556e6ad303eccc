"""Canaries and their exposure (issue 16; specs/dynamics.md §4, manifests.md §1, policy.md §3):
manifests that say they are canaries, reference canaries routed into no band by both implementations,
each scan's ranks recomputed by the verifier, and the lies a hostile trainer (trainer key only,
everything re-signed) can tell about them caught."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.ledger import Ledger
from gradledger.training import MemorizationScan, scan
from gradledger.training.bands import sequential_bands
from gradledger.training.dataset import commit_dataset
from gradledger.training.dynamics.canaries import (
    CanarySet, canary_exposure, canary_manifests, canary_sets, draw_canaries, exposure_bits)
from gradledger.training.dynamics.memorization import LossTraces
from gradledger.training.errors import GovernanceError, ManifestError
from gradledger.training.manifests import parse_manifest, sign_manifest
from gradledger.training.policy import CANARY_REFERENCE_INDEX, route
from gradledger.training.trainer import Governance
from gradledger.verify._internal import manifests as VM
from gradledger.verify._internal import routing as VR
from helpers import CROWD_KEY
from test_idioms import BATCH, assert_caught, assert_verified, make_model, verify
from test_memorization import _structure
from test_trainer import MANIFESTS, PATHS, POLICY, WORKER_CREDS, WORLD, X, Y, new_ledger

COUNT, REFS = 6, 42
CANARIES = draw_canaries(X, 10, count=COUNT, references=REFS, seed=5, name="noise")
SIGNED = canary_manifests(CANARIES, key=CROWD_KEY, source=WORKER_CREDS[0], ontology="digits-v1", time=1)
N = len(MANIFESTS)
EPOCHS = 30
PARAMS = MemorizationScan(fraction=0.05, min_trace=3)


def test_canaries_are_drawn_like_the_data_and_marked_in_their_manifests() -> None:
    assert CANARIES.inputs.shape == (COUNT + REFS, X.shape[1]) and CANARIES.inputs.dtype == X.dtype
    assert bool((CANARIES.inputs >= X.amin(0)).all()) and bool((CANARIES.inputs <= X.amax(0)).all())
    assert CANARIES.roles == ["inserted"] * COUNT + ["reference"] * REFS
    again = draw_canaries(X, 10, count=COUNT, references=REFS, seed=5, name="noise")
    assert torch.equal(again.inputs, CANARIES.inputs) and again.labels == CANARIES.labels
    for m, role in zip(SIGNED, CANARIES.roles):
        # both parsers read the field back from the signed bytes
        assert parse_manifest(m.signed).manifest["canary"] == {"set": "noise", "role": role}
        assert VM.parse_manifest(m.signed).fields["canary"] == {"set": "noise", "role": role}
    assert canary_sets(MANIFESTS + SIGNED) == [
        CanarySet("noise", tuple(range(N, N + COUNT)), tuple(range(N + COUNT, N + COUNT + REFS)))]


@pytest.mark.parametrize("canary", [{"set": "noise", "role": "member"}, {"set": "", "role": "inserted"},
                                    {"set": "noise"}, {"set": "noise", "role": "reference", "secret": 1}])
def test_a_malformed_canary_field_is_refused_by_both_parsers(canary: dict[str, Any]) -> None:
    fields = dict(SIGNED[0].manifest)
    with pytest.raises(ManifestError):
        sign_manifest(**{k: fields[k] for k in ("example", "label", "sources", "aggregation", "consensus",
                                                 "confidence", "ontology", "review")},
                      key=CROWD_KEY, time=1, canary=canary)
    from gradledger.ledger import encoding
    fields["canary"] = canary
    data = encoding.encode(fields)
    forged = encoding.encode([data, CROWD_KEY.sign("manifest", data)])
    with pytest.raises(VM.ManifestInvalid):
        VM.parse_manifest(forged)


def test_a_reference_canary_writes_into_no_band_whatever_the_rules_say() -> None:
    paths = {"worker-0": PATHS["worker-0"]}
    for m, role in zip(SIGNED, CANARIES.roles):
        got = route(POLICY, m.manifest, paths)
        verifier = VR.first_match(VR.parse_policy(POLICY.signed), m.manifest, [paths["worker-0"]])
        if role == "reference":
            assert got.rule == CANARY_REFERENCE_INDEX == verifier and set(got.profile) == {0.0}
            assert set(got.limits) == {None}
        else:  # an inserted canary is routed like any crowd label
            unmarked = dict(m.manifest)
            del unmarked["canary"]
            assert got == route(POLICY, unmarked, paths) and got.rule == verifier and max(got.profile) > 0.0


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_both_implementations_rank_the_canaries_alike(data: Any) -> None:
    from gradledger.verify._internal.scans import canary_ranks

    count = data.draw(st.integers(2, 12))
    roles = data.draw(st.lists(st.sampled_from([None, "inserted", "reference"]), min_size=count, max_size=count))
    f32 = st.floats(0, 4, width=32, allow_nan=False)
    steps = data.draw(st.lists(st.lists(st.tuples(st.integers(0, count - 1), f32), max_size=6), max_size=6))
    traces = LossTraces(count)
    per: list[list[float]] = [[] for _ in range(count)]
    for step in steps:
        traces.add([i for i, _ in step], [v for _, v in step])
        for i, v in step:
            per[i].append(v)
    fields = [{} if r is None else {"canary": {"set": "s", "role": r}} for r in roles]
    got = canary_exposure(traces.last(), canary_sets(fields))
    assert got == canary_ranks(fields, [t[-1] if t else None for t in per])
    for entry in got:  # a rank is 1 + the measured references at or below the canary's last loss
        refs = [per[i][-1] for i, r in enumerate(roles) if r == "reference" and per[i]]
        assert entry["references"] == len(refs)
        for i, rank in entry["inserted"]:
            assert rank == (None if not per[i] else 1 + sum(v <= per[i][-1] for v in refs))


@pytest.fixture(scope="module")
def canaried(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """The digits and a canary set, trained by the user's loop over ten epochs, scanned at each checkpoint."""
    led, _ = new_ledger(tmp_path_factory.mktemp("canaried") / "ledger")
    x = torch.cat([X, CANARIES.inputs])
    y = torch.cat([Y, torch.tensor(CANARIES.labels)])
    ds = commit_dataset(led, MANIFESTS + SIGNED, "digits-canaried", WORLD.trainer, inputs=x)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    epoch = math.ceil(len(x) / BATCH)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model), run_id="canaries",
                     checkpoint_every=6 * epoch, seed=3, root_key=WORLD.root, order="loader", memorization=PARAMS)
    gm, gopt, gl = run.make_governed(model, opt, loader)
    for _ in range(EPOCHS):
        for xb, yb in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(xb), yb).backward()
            gopt.step()
    run.close()
    return led


def test_every_scan_ranks_the_inserted_canaries_and_the_run_verifies(canaried: Ledger, tmp_path: Path) -> None:
    scans = [canaried.observation(s).body for s in canaried.by_type("MemorizationScan")]
    assert len(scans) == EPOCHS // 6 and all(b["format"] == 2 for b in scans)
    last = scans[-1]["canaries"]
    assert [e["set"] for e in last] == ["noise"] and last[0]["references"] == REFS
    ranks = [r for _, r in last[0]["inserted"]]
    # thirty epochs of random labels on noise: the model learned most of its canaries, never its references
    # (a rank drawn at random has a median of (REFS + 2) / 2)
    assert all(r is not None for r in ranks) and sorted(ranks)[COUNT // 2] < (REFS + 1) / 4, ranks
    # the reference canaries trained nothing: every step routed them into no band
    for s in canaried.by_type("GovernedUpdate"):
        u = canaried.observation(s).body
        assert all((r == CANARY_REFERENCE_INDEX) == (i >= N + COUNT) for i, r in zip(u["batch"], u["routing"]["rules"]))
    report = scan(canaried, params=PARAMS)
    entry = report["canaries"][0]
    assert entry["bound_bits"] == pytest.approx(math.log2(REFS + 1))
    assert entry["mean_exposure_bits"] == pytest.approx(sum(exposure_bits(r, REFS) for r in ranks) / COUNT)
    assert entry["mean_exposure_bits"] > 2.0  # a canary never trained: log2(e) = 1.44 bits expected
    from gradledger.training.cli_scan import _render

    assert f"mean exposure {entry['mean_exposure_bits']:.2f} bits of at most {math.log2(REFS + 1):.2f}" in _render(report)
    code, out = verify(canaried, tmp_path)
    assert_verified(code, out)
    assert any(r["name"] == "scans" and r["status"] == "pass" for r in out["checks"])


def test_feedback_never_asks_to_relabel_a_canary(canaried: Ledger) -> None:
    from gradledger.training.dynamics.feedback import priorities

    _, items = priorities(canaried)
    assert items and all(p.index < N for p in items)


def _scan(f: Any) -> int:
    return f.seqs("MemorizationScan")[-1]


def _inserted(f: Any) -> list[list[Any]]:
    return f.body(_scan(f))["canaries"][0]["inserted"]


FORGERIES = {
    # a vendor hiding how much its model memorized: a better rank for every canary
    "ranks flattered": lambda f: f.set(_scan(f), ("canaries", 0, "inserted"), [[i, REFS + 1] for i, _ in _inserted(f)]),
    "references inflated": lambda f: f.set(_scan(f), ("canaries", 0, "references"), REFS * 10),
    "the canaries dropped (format 1)": lambda f: (f.set(_scan(f), ("format",), 1), f.delete(_scan(f), ("canaries",))),
    "a canary left out": lambda f: f.set(_scan(f), ("canaries", 0, "inserted"), _inserted(f)[1:]),
    # the trainer routes a reference canary like any label: it trains, and its loss is no longer a non-member's
    "a reference canary trained": lambda f: _train_a_reference(f),
}


def _train_a_reference(f: Any) -> None:
    k = next(s for s in f.seqs("GovernedUpdate") if any(i >= N + COUNT for i in f.body(s)["batch"]))
    u = f.body(k)
    f.set(k, ("routing", "rules"), [-1 if i >= N + COUNT else r for i, r in zip(u["batch"], u["routing"]["rules"])])


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_lie_about_the_canaries_is_caught(canaried: Ledger, tmp_path: Path, name: str) -> None:
    code, report = _structure(canaried, tmp_path, FORGERIES[name])
    assert_caught(code, report)
    failure = report["first_failure"]
    assert failure["name"] in ("scans", "routing"), failure
    assert "canar" in json.dumps(failure) or "rule" in failure["detail"], failure


def test_bad_canary_draws_are_refused() -> None:
    with pytest.raises(GovernanceError, match="count >= 1"):
        draw_canaries(X, 10, count=0, references=4)
    with pytest.raises(GovernanceError, match="2 classes"):
        draw_canaries(X, 1)
    with pytest.raises(GovernanceError, match="rows of one input tensor"):
        draw_canaries(torch.zeros(()), 10)


# -- gradledger canary -----------------------------------------------------------------------------------


def test_canary_command_commits_a_canaried_dataset_a_run_learns_from(tmp_path: Path, capsys: Any) -> None:
    from sklearn.datasets import load_digits

    from gradledger.training.cli import main as cli_main
    from gradledger.training.dataset import load_inputs
    from gradledger.training.project import Project
    from test_project import EXAMPLE

    d = load_digits()
    x = torch.tensor(d.data[:40] / 16.0, dtype=torch.float32)
    with Project.init(tmp_path / "p", EXAMPLE) as project:
        project.label(x, torch.tensor(d.target[:40]), source="worker-1")
    args = ["canary", "--project", str(tmp_path / "p"), "--dataset", "dataset", "--name", "canaried",
            "--authority", "crowd", "--count", "4", "--references", "12", "--seed", "7"]
    assert cli_main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 56 and out["inserted"] == [40, 41, 42, 43] and out["references"] == list(range(44, 56))
    with Project.open(tmp_path / "p") as project:
        ds = project.dataset("canaried")
        assert [m.manifest for m in ds.manifests[:40]] == [m.manifest for m in project.dataset("dataset").manifests]
        got = load_inputs(project.ledger, ds)  # every stored row is the example its manifest names
        assert torch.equal(got[:40], x) and bool((got[40:] >= 0).all()) and bool((got[40:] <= 1).all())
        assert canary_sets(ds.manifests) == [CanarySet("canaries", (40, 41, 42, 43), tuple(range(44, 56)))]
        registry = project.ledger.registry
        for m in ds.manifests[40:]:
            cred = registry.by_key_id[m.manifest["sources"][0]["key_id"]]
            assert (cred.subject, cred.path) == ("canary", "acme/crowd/canaries")
            paths = {"canary": cred.path}
            assert (route(project.policy, m.manifest, paths).rule == CANARY_REFERENCE_INDEX) == (
                m.manifest["canary"]["role"] == "reference")
        project.ledger.verify(trusted_roots=project.trusted_roots)
    # the same set again, an unknown dataset, an empty draw: one line, exit 2
    for bad in ([*args[:4], "canaried", *args[5:]], [*args[:4], "nope", *args[5:]],
                [*args[:-6], "--set", "other", "--count", "0"]):
        assert cli_main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_more_canary_sets_than_a_scan_ranks_are_refused_by_the_trainer_and_failed_by_the_verifier(
        tmp_path: Path) -> None:
    from gradledger.training.dynamics import ScanError
    from gradledger.training.dynamics.canaries import MAX_SETS
    from gradledger.training.dynamics.memorization import LossTraces
    from gradledger.training.dynamics.record import record_scan, scan_body

    drawn = [draw_canaries(X, 10, count=1, references=1, seed=s, name=f"s{s}") for s in range(MAX_SETS + 1)]
    many = [m for d in drawn for m in canary_manifests(d, key=CROWD_KEY, source=WORKER_CREDS[0], ontology="digits-v1",
                                                       time=1)]
    led, _ = new_ledger(tmp_path / "ledger")
    ds = commit_dataset(led, MANIFESTS + many, "many", WORLD.trainer, inputs=torch.cat([X, *(d.inputs for d in drawn)]))
    with pytest.raises(GovernanceError, match=f"{MAX_SETS + 1} canary sets"):
        Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(make_model()),
                   run_id="many", root_key=WORLD.root, memorization=PARAMS)
    # a run without the monitor trains; a scan of it on demand is refused too
    model = make_model()
    loader = DataLoader(TensorDataset(torch.cat([X, *(d.inputs for d in drawn)]),
                                      torch.tensor([m.label for m in ds.manifests])), batch_size=BATCH)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model), run_id="many",
                     checkpoint_every=4, seed=3, root_key=WORLD.root)
    gm, gopt, gl = run.make_governed(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    for xb, yb in gl:
        gopt.zero_grad()
        F.cross_entropy(gm(xb), yb).backward()
        gopt.step()
        if run.step == 4:
            break
    run.close()
    with pytest.raises(ScanError, match="at most 64"):
        scan(led, params=PARAMS, record=WORLD.trainer)
    # the hostile trainer records one anyway: the verifier fails it
    from gradledger.training.updates import example_loss_values

    traces = LossTraces(ds.count)
    for s in led.by_type("GovernedUpdate"):
        u = led.observation(s).body
        traces.add(u["batch"], example_loss_values(u["example_losses"]))
    record_scan(led, scan_body(led.by_type("RunStarted")[-1], 4, traces, PARAMS, canary_sets(ds.manifests)),
                WORLD.trainer)
    code, report = _structure(led, tmp_path, lambda f: None)
    led.close()
    assert_caught(code, report, "canary sets")
