"""Recorded traces (specs/forensics.md §7; issue 12): ``gradledger trace --record`` appends a signed
ForensicTrace, ``gradledger-verify --check-traces`` recomputes it with the verifier's own twin (in the
replay workers for the replay and checkpoints methods) and compares; a hostile trainer who edits a
trace and re-signs everything is caught, and a trace edited without re-signing fails its signature."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.keys import write_public_keys
from gradledger.training.forensics import trace
from gradledger.training.forensics.record import result_digest
from gradledger.verify._internal.traces import TOLERANCE, _ranked
from gradledger.verify.verifier import VerificationPolicy, Verifier
from forging import Forge
from test_idioms import _keys
from test_trainer import WORLD, X

import test_forensics as F
from helpers import verify_cli

CONTRAST = json.dumps({"description": "3s read as 8", "inputs": {"label": 3, "limit": 12}, "target": 8,
                       "against": 3})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """One governed run with four recorded traces (each method, and a query file), exported with its data."""
    base = tmp_path_factory.mktemp("traces")
    before = torch.are_deterministic_algorithms_enabled()
    led, _, _ = F._run(base / "ledger")
    seqs = {"replay": trace(led, CONTRAST, record=WORLD.trainer, self_influence=True, top=3)["record"]["seq"]}
    seqs["checkpoints"] = trace(led, F.QUERY, method="checkpoints", record=WORLD.trainer, top=4)["record"]["seq"]
    seqs["loss-trace"] = trace(led, None, method="loss-trace", record=WORLD.trainer, top=5)["record"]["seq"]
    save_file({"x": X[20:26].clone()}, base / "q.safetensors")
    query = json.dumps({"inputs": {"file": str(base / "q.safetensors")}, "target": 8, "against": 3})
    seqs["file"] = trace(led, query, record=WORLD.trainer, top=2)["record"]["seq"]
    export_bundle(led, base / "run.glb", with_data=True)
    led.close()
    torch.use_deterministic_algorithms(before)
    return base, seqs


def _bundle(base: Path, out: Path, forge: Callable[[Forge], Any] | None) -> Path:
    """The recorded bundle, or a copy the hostile trainer edited and re-signed with ``forge``."""
    if forge is None:
        return base / "run.glb"
    f = Forge.from_bundle(base / "run.glb", keys_dir=_keys(out))
    forge(f)
    return f.write(out / "forged.glb")


def _check(base: Path, out: Path, forge: Callable[[Forge], Any] | None = None, *, traces: bool = True,
           **policy: Any) -> dict[str, Any]:
    """The verifier's report, in process (its replay still runs in sandboxed workers)."""
    return Verifier([WORLD.root.public_key], VerificationPolicy(check_traces=traces, **policy)).verify(
        _bundle(base, out, forge)).to_json()


def _verify(base: Path, out: Path, forge: Callable[[Forge], Any] | None = None, *args: str) -> tuple[int, dict[str, Any]]:
    """The command line's exit code and JSON report."""
    roots = write_public_keys(out / "roots.pub", [(WORLD.root.public_key, "root")])
    bundle = _bundle(base, out, forge)
    return verify_cli(bundle, roots, *args)


def _traces_check(report: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == "traces")


def test_recorded_traces_are_recomputed_and_verify(recorded: Any, tmp_path: Path) -> None:
    base, seqs = recorded
    code, report = _verify(base, tmp_path, None, "--check-traces")
    assert code == 0, report["first_failure"]
    check = _traces_check(report)
    assert "4 recorded trace(s) recomputed" in check["detail"] and "checkpoints, loss-trace, replay" in check["detail"]
    # Without the flag the form is still checked, and the report says the scores were not recomputed.
    code, report = _verify(base, tmp_path)
    assert code == 0 and "not recomputed" in _traces_check(report)["detail"]


def test_sampled_replay_still_replays_every_traced_segment(recorded: Any, tmp_path: Path) -> None:
    base, _ = recorded
    report = _check(base, tmp_path, replay="sample", sample_fraction=0.01)
    assert report["verified"], report["first_failure"]
    assert report["figures"]["sample_segments"] == "2 of 2"


def _reresult(f: Forge, seq: int, change: Callable[[dict[str, Any]], None], *, digest: bool = True) -> None:
    """The hostile trainer edits a recorded result and (``digest``) recomputes its digest; the forge re-signs."""
    result = f.body(seq)["result"]
    change(result)
    f.set(seq, ("result",), result)
    if digest:
        f.set(seq, ("result_digest",), result_digest(result))


def _swap_top_two(r: dict[str, Any]) -> None:
    (a, sa), (b, sb) = r["sources"][:2]
    r["sources"][:2] = [[b, sa], [a, sb]]


def _bump_band(r: dict[str, Any]) -> None:
    r["bands"][0] *= 1.5


def _drop_first(r: dict[str, Any]) -> None:
    del r["sources"][0]


def _shrink_steps(r: dict[str, Any]) -> None:
    max(r["steps"], key=lambda s: abs(s[2]))[2] = 0.0  # the range that carried the most


def _hide_example(r: dict[str, Any]) -> None:
    r["examples"][0][1] = r["examples"][-1][1]
    r["examples"].append(r["examples"].pop(0))


@pytest.mark.parametrize("method, change, words", [
    ("replay", _swap_top_two, "sources"),
    ("replay", _bump_band, "band 0"),
    ("replay", _drop_first, "sources"),
    ("checkpoints", _shrink_steps, "steps"),
    ("checkpoints", _hide_example, "examples"),
    ("loss-trace", lambda r: r["sources"][0].__setitem__(1, r["sources"][0][1] * (1 + 1e-6)), "sources"),
    ("file", lambda r: r.__setitem__("predicted_change", -r["predicted_change"]), "predicted_change"),
], ids=["swap-sources", "band", "drop-top-source", "steps", "hide-example", "loss-trace-nudge", "file-change"])
def test_a_re_signed_forged_result_is_caught_by_recomputation(recorded: Any, tmp_path: Path, method: str,
                                                              change: Any, words: str) -> None:
    base, seqs = recorded
    seq = seqs[method]
    forge = lambda f: _reresult(f, seq, change)  # noqa: E731
    if method == "replay" and change is _swap_top_two:
        # Digests consistent and every signature good: only recomputation can tell.
        assert _check(base, tmp_path, forge, traces=False)["verified"]
    report = _check(base, tmp_path, forge)
    assert not report["verified"] and report["first_failure"]["name"] == "traces", report["first_failure"]
    assert report["first_failure"]["seq"] == seq and words in report["first_failure"]["detail"]


@pytest.mark.parametrize("edit, words", [
    (lambda b: b["query"].__setitem__("target", 7), "scores"),  # the query changed, its digest recomputed below
    (lambda b: b.__setitem__("method", "checkpoints"), "scores"),
    (lambda b: b["parameters"].__setitem__("top", 2), "entries recorded"),
], ids=["query", "method", "top"])
def test_re_signed_forged_query_method_or_parameters_are_caught(recorded: Any, tmp_path: Path, edit: Any,
                                                                words: str) -> None:
    import hashlib

    from gradledger.ledger import encoding

    base, seqs = recorded
    seq = seqs["replay"]

    def forge(f: Forge) -> None:
        body = f.body(seq)
        edit(body)
        for key in ("query", "method", "parameters"):
            f.set(seq, (key,), body[key])
        f.set(seq, ("query_digest",), hashlib.sha256(encoding.encode(body["query"])).digest())

    report = _check(base, tmp_path, forge)
    assert not report["verified"] and report["first_failure"]["name"] == "traces", report["first_failure"]
    assert words in report["first_failure"]["detail"]


@pytest.mark.parametrize("forge, words", [
    (lambda f, s: _reresult(f, s, _swap_top_two, digest=False), "result_digest"),
    (lambda f, s: f.set(s, ("query_digest",), bytes(32)), "query_digest"),
    (lambda f, s: f.set(s, ("run",), s - 1), "names no governed run"),
    (lambda f, s: f.set(s, ("format",), 2), "format"),
    (lambda f, s: f.delete(s, ("query",)), "query"),
], ids=["result-digest", "query-digest", "run", "format", "no-query"])
def test_a_malformed_trace_fails_without_check_traces(recorded: Any, tmp_path: Path, forge: Any, words: str) -> None:
    base, seqs = recorded
    report = _check(base, tmp_path, lambda f: forge(f, seqs["replay"]), traces=False, replay="none")
    assert not report["verified"] and report["first_failure"]["name"] == "traces", report["first_failure"]
    assert words in report["first_failure"]["detail"]


def test_a_trace_tampered_without_the_key_fails_its_signature(recorded: Any, tmp_path: Path) -> None:
    base, seqs = recorded
    seq = seqs["replay"]

    def tamper(f: Forge) -> None:
        _reresult(f, seq, _swap_top_two)
        f.attacker = {}  # nobody re-signs: the record's bytes change under its old signature

    report = _check(base, tmp_path, tamper, traces=False, replay="none")
    assert not report["verified"] and report["first_failure"]["name"] in ("records", "signatures"), \
        report["first_failure"]


def test_check_traces_with_no_replay_is_unusable(recorded: Any, tmp_path: Path) -> None:
    base, _ = recorded
    code, _ = _verify(base, tmp_path, None, "--check-traces", "--replay", "none")
    assert code == 2


def test_record_needs_a_key(recorded: Any) -> None:
    base, _ = recorded
    proc = subprocess.run([sys.executable, "-m", "gradledger.training.cli", "trace", str(base / "ledger"),
                           "--method", "loss-trace", "--record"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--record and --key" in proc.stderr and "Traceback" not in proc.stderr


def test_a_branch_trace_with_dropout_and_momentum_recomputes(tmp_path: Path) -> None:
    """A trace of an unlearning branch: the original's segments before the rewind, then the branch's; the model
    draws dropout masks (per-example gradients from the step's own forward) and SGD has momentum."""
    import test_unlearning as U
    from gradledger.training.retirement import retire
    from gradledger.training.unlearning import unlearn

    led, ds = U.new_ledger(tmp_path / "ledger", U.MANIFESTS, U.X)
    U.governed_run(led, ds, U.X)
    retire(led, U.FAULTY, U.CROWD_KEY, "swaps 3 and 8")
    branch = unlearn(led, U.FAULTY, U.WORLD.trainer).branch_run_id
    query = json.dumps({"inputs": {"label": 3, "limit": 10}, "target": 8})
    for method in ("replay", "checkpoints"):
        got = trace(led, query, run_id=branch, method=method, record=U.WORLD.trainer, top=50, self_influence=True)
        assert all(s["score"] == 0.0 for s in got["sources"] if s["source"] == U.FAULTY)
    export_bundle(led, tmp_path / "run.glb", with_data=True)
    led.close()
    report = _check(tmp_path, tmp_path)
    assert report["verified"], report["first_failure"]
    assert "2 recorded trace(s) recomputed" in _traces_check(report)["detail"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=2, max_size=12, unique=True),
       st.integers(1, 12), st.sampled_from(["replay", "loss-trace"]), st.integers(0, 11),
       st.floats(-3.0, 3.0, allow_nan=False))
def test_a_recorded_ranking_matches_iff_every_score_is_within_tolerance(values: list[float], top: int, method: str,
                                                                        pick: int, shift: float) -> None:
    """§7.3's comparison, against random rankings: the honest top entries match; a score moved beyond the
    tolerance, or an entry left out that ranks above the last, is named."""
    found = {f"s{i}": v for i, v in enumerate(values)}
    honest = sorted(([k, v] for k, v in found.items()), key=lambda e: -e[1])[:top]
    assert _ranked("sources", honest, found, top, method) is None
    i = pick % len(honest)
    rtol, atol = TOLERANCE[method]
    scale = max(abs(v) for v in values)
    moved = [list(e) for e in honest]
    moved[i][1] = honest[i][1] + shift
    beyond = abs(shift) > rtol * abs(honest[i][1]) + atol * scale
    ordered = all(a[1] >= b[1] for a, b in zip(moved, moved[1:]))
    why = _ranked("sources", moved, found, top, method)
    if beyond:
        assert why is not None and "sources" in why
    elif ordered:
        assert why is None
    if len(honest) < len(values) and len(honest) > 0:
        hidden = sorted(([k, v] for k, v in found.items()), key=lambda e: -e[1])
        skipped = hidden[:i] + hidden[i + 1: top + 1]  # leaves out the i-th, takes the next
        lost = hidden[i][1] - hidden[top][1]
        if lost > rtol * abs(hidden[top][1]) + atol * scale and not math.isclose(lost, 0.0):
            assert _ranked("sources", skipped, found, top, method) is not None
