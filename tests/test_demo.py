"""`gradledger demo` end to end at a reduced size, its degraded paths, and the report page."""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from gradledger.ledger.keys import read_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.training import demo as D
from gradledger.training.cli import main as cli_main
from gradledger.training.report_html import render_report, stacked_area

STEPS, EVERY = 120, 60


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], float]:
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    figures = D.run_demo(D.DemoConfig(out=out, steps=STEPS, checkpoint_every=EVERY, progress=False))
    return out, figures, time.perf_counter() - t0


def test_files_and_key_permissions(run: tuple[Path, dict[str, Any], float]) -> None:
    out, _, _ = run
    for name in ("report.html", "report.json", "run.glb", "roots.pub"):
        assert (out / name).is_file(), name
    assert (out / "ledger").is_dir()
    keys = sorted((out / "keys").iterdir())
    assert {k.name for k in keys} >= {"acme-root.key", "trainer.key", "crowd.key", "worker-4.key"}
    assert stat.S_IMODE((out / "keys").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    # The trust file holds the governance root, and only it.
    with Ledger.open(out / "ledger") as led:
        roots = [c for c in led.registry.by_key_id.values() if c.role == "root"]
    assert len(roots) == 1 and roots[0].path == "acme"
    assert read_public_keys(out / "roots.pub") == [roots[0].public_key]


def test_every_stage_ran_and_the_verifier_verified(run: tuple[Path, dict[str, Any], float]) -> None:
    _, figures, _ = run
    stages = {s["name"]: s for s in figures["stages"]}
    assert list(stages) == ["trace", "feedback", "retire", "unlearn", "export", "verify"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    rep = figures["verifier"]
    assert rep["verified"] is True and rep["first_failure"] is None
    assert rep["checks"] and all(c["status"] in ("pass", "skip") for c in rep["checks"])
    assert "gradledger" in figures["verifier_command"] and "--trust" in figures["verifier_command"]
    unl = figures["unlearning"]
    assert unl["mode"] == "exact" and unl["removed"] > 0 and unl["relabeled"] > 0
    # The verifier checked the certificate the unlearning stage recorded, by replay.
    (cert,) = rep["certificates"]
    assert cert["status"] == "pass" and cert["seq"] == unl["certificate_seq"] and cert["source"] == D.FAULTY


def test_unlearning_undoes_the_swap(run: tuple[Path, dict[str, Any], float]) -> None:
    _, figures, _ = run
    before, after = figures["before"], figures["after"]
    a, b = figures["swap"]
    # The faulty worker's swaps show in the original model and are gone after unlearning.
    assert before["swap_errors"] >= 5
    assert after["swap_errors"] < before["swap_errors"]
    assert before["swap_errors"] == before["swap"][f"{a}->{b}"] + before["swap"][f"{b}->{a}"]
    assert before["confusion"][a][b] == before["swap"][f"{a}->{b}"]
    assert sum(map(sum, before["confusion"])) == figures["labels"]["test"] == 450


def test_policy_kept_crowd_and_heuristics_out_of_the_embedding_band(run: tuple[Path, dict[str, Any], float]) -> None:
    out, figures, _ = run
    bands = figures["bands"]
    assert len(bands["steps"]) == STEPS
    emb = bands["by_class"]["embedding"]
    assert sum(emb["experts"]) > 0 and sum(emb["crowd"]) == 0 and sum(emb["heuristics"]) == 0
    assert sum(bands["by_class"]["mid"]["heuristics"]) == 0 and sum(bands["by_class"]["mid"]["crowd"]) > 0
    # The figures come from the signed records themselves.
    with Ledger.open(out / "ledger") as led:
        ups = [led.observation(s).body for s in D.run_updates(led)]
        assert [u["step"] for u in ups] == list(range(STEPS))
        for u in ups:
            for path, writes in u["authority_writes"].items():
                if not path.startswith("acme/experts"):
                    assert writes[2] == 0.0
        assert len(led.by_type("UnlearningCertificate")) == 1
        assert len(led.by_type("SourceRetired")) == 1
    labels = figures["labels"]
    assert set(labels["by_class"]) == set(D.CLASSES) and all(v > 50 for v in labels["by_class"].values())
    assert labels["faulty_votes_swapped"] > 0 and labels["faulty_labeled"] > labels["faulty_votes_swapped"]


def test_report_html_shows_the_charts_and_the_verdict(run: tuple[Path, dict[str, Any], float]) -> None:
    out, figures, _ = run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("<svg") >= 8  # three bands, two bar charts, two matrices, the policy's profiles
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "Who wrote into which band" in html and "What the verifier checked" in html
    assert ">VERIFIED<" in html
    assert f"<td>{figures['unlearning']['certificate_seq']}</td><td>{D.FAULTY}</td><td>exact</td>" in html
    for check in figures["verifier"]["checks"]:
        assert check["name"] in html
    assert json.loads((out / "report.json").read_text())["before"] == figures["before"]


def test_the_timings_are_reported(run: tuple[Path, dict[str, Any], float]) -> None:
    _, figures, seconds = run
    assert figures["timings"]["total"] <= seconds
    assert {"training", "trace", "unlearn", "verify"} <= set(figures["timings"])


def test_the_investigation_traces_the_confusion_to_the_faulty_worker(run: tuple[Path, dict[str, Any], float]) -> None:
    """Before retirement, `gradledger trace` over the ledger ranks the sources by their influence on
    "3s read as 8 rather than 3, 8s as 3 rather than 8"; the report shows it and query.json reruns it."""
    out, figures, _ = run
    report = figures["trace"]["report"]
    assert report["method"] == "replay" and report["replayed_steps"] == STEPS
    assert report["sources"][0]["source"] == D.FAULTY, report["sources"][:3]
    assert sum(s["share"] for s in report["sources"]) <= 1.0 + 1e-9
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Who taught the model to confuse 3 and 8" in html
    query = json.loads((out / "query.json").read_text())
    assert query["inputs"] == {"file": "query.safetensors"} and len(query["target"]) == len(query["against"])
    # Recorded as a signed ForensicTrace, which the regulator's verification recomputed (--check-traces).
    traces = next(c for c in figures["verifier"]["checks"] if c["name"] == "traces")
    assert report["record"]["seq"] > 0 and traces["status"] == "pass" and "1 recorded trace(s) recomputed" in \
        traces["detail"]


def test_terminal_summary_names_the_figures(run: tuple[Path, dict[str, Any], float]) -> None:
    out, figures, _ = run
    text = D.summary(figures, out)
    assert "worker-4" in text and "3->8" in text and "8->3" in text
    assert "[ok  ]" in text and "NOT COMPLETE" not in text
    for band in D.BANDS:
        assert re.search(rf"{band}\s+mean update norm by class: experts", text)


# -- degraded paths: a stage that fails, bad arguments ------------------------------------------------


def test_a_failing_stage_is_reported_not_raised_and_no_stage_is_optional() -> None:
    """Issue 9: no stage is "not there yet": each stage's module is imported with the demo, and a
    stage that fails is reported as failed (which makes the demo exit 1), never as unavailable."""
    console = D.Console(False)

    def broken() -> tuple[str, dict[str, Any]]:
        raise ImportError("gradledger.training.unlearning is broken")

    stage = D.run_stage(console, "unlearn", broken)
    assert stage.status == "failed" and "ImportError" in stage.detail and "broken" in stage.detail
    assert not hasattr(D, "Unavailable") and not hasattr(D, "_module")
    assert D.retire.__module__ == "gradledger.training.retirement"
    assert D.unlearn.__module__ == "gradledger.training.unlearning"


def test_report_without_unlearning_or_verifier_says_so(run: tuple[Path, dict[str, Any], float]) -> None:
    out, figures, _ = run
    degraded = dict(figures, after=None, unlearning=None, verifier=None)
    degraded["stages"] = [
        {"name": "retire", "status": "ok", "detail": "retired", "seconds": 0.0},
        {"name": "unlearn", "status": "unavailable", "detail": "not available: gradledger.training.unlearning "
         "is not installed", "seconds": 0.0},
        {"name": "export", "status": "ok", "detail": "exported", "seconds": 0.0},
        {"name": "verify", "status": "failed", "detail": "DemoError: no report", "seconds": 0.0},
    ]
    html = render_report(degraded)
    assert "not available: the unlearning stage did not run" in html
    assert "The verifier did not produce a report" in html and "unlearning is not installed" in html
    text = D.summary(degraded, out)
    assert "NOT COMPLETE: stage(s) unlearn, verify" in text
    assert "unlearned  not available" in text


def test_stacked_area_handles_empty_and_zero_series() -> None:
    assert "no updates" in stacked_area("mid", [0, 1, 2], {"crowd": [0.0, 0.0, 0.0]})
    assert stacked_area("mid", [], {"crowd": []}).endswith("</svg>")
    many = stacked_area("head", list(range(5000)), {"experts": [1.0] * 5000, "crowd": [0.5] * 5000})
    assert many.count("<polygon") == 2 and len(many) < 40_000  # binned, not one point per step


def test_cli_refuses_a_non_empty_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "something").write_text("x")
    assert cli_main(["demo", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    assert cli_main(["demo", "--out", str(tmp_path / "new"), "--steps", "0", "--quiet"]) == 2


def test_feedback_and_memorization_answer_from_the_ledger(run: tuple[Path, dict[str, Any], float]) -> None:
    """Issue 16: the run scans itself at each checkpoint (recomputed by the verifier), and the review list
    written for Label Studio ranks the trained examples, with the faulty worker's share among them."""
    out, figures, _ = run
    scans = next(c for c in figures["verifier"]["checks"] if c["name"] == "scans")
    assert scans["status"] == "pass" and "2 required at checkpoints" in scans["detail"]
    fb = figures["feedback"]
    tasks = json.loads((out / fb["file"]).read_text(encoding="utf-8"))
    assert len(tasks) == fb["written"] == -(-fb["trained"] // 20)
    assert [t["data"]["gradledger_index"] for t in tasks[:10]] == [e["index"] for e in fb["examples"]]
    shares = {r["name"]: r["share"] for r in fb["sources"]}
    assert D.FAULTY in shares and sum(r["prioritized"] for r in fb["classes"]) == fb["written"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "What to review next" in html and "MemorizationScan" in html
    # the policy's memorized rule (specs/dynamics.md §2.4): the examples it moved, which the routing check passed
    routed = fb["memorized_routing"]
    assert routed is not None and 0 <= routed["examples"] <= routed["trainings"]
    assert f'{routed["examples"]} flagged examples trained the head only' in html
    # the canary set (specs/dynamics.md §4): ranked at every scan, recomputed by the verifier, never a review task
    assert "rank their dataset's canaries, every rank the same" in scans["detail"]
    c = fb["canaries"]
    assert c["inserted"] == D.CANARY_COUNT and c["references"] <= D.CANARY_REFERENCES
    assert 0.0 <= c["mean_exposure_bits"] <= c["bound_bits"] and f"{c['mean_exposure_bits']:.2f} bits" in html
    n = figures["labels"]["train"]
    assert all(t["data"]["gradledger_index"] < n for t in tasks)


def test_depth_profiles_are_recorded_recomputed_and_drawn(run: tuple[Path, dict[str, Any], float]) -> None:
    """Issue 16: a DepthProfile at every checkpoint over the held-out test digits, recomputed by the
    verifier from the weights, and the report's heat maps of the first and the last."""
    out, figures, _ = run
    check = next(c for c in figures["verifier"]["checks"] if c["name"] == "profiles")
    d = figures["feedback"]["depth"]
    n = len(d["steps"])
    assert check["status"] == "pass" and f"{n} of {n} depth profile(s) recomputed" in check["detail"]
    assert d["steps"][0] == 0 and d["classes"] == list(range(10)) and d["bands"] == ["head", "mid", "embedding"]
    # training separated the classes: every band is surer at the end than at step 0
    assert all(last < first for first, last in zip(d["means"][0], d["last_mean"]))
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Confusion at depth" in html and html.count("bits</title></rect>") == 2 * 3 * 10
