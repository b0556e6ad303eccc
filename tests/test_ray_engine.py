"""Replay on a Ray cluster (``--engine ray``, specs/replay.md §8): a local cluster started by the test
(``ray.init(num_cpus=2)``) replays an honest bundle bit for bit, a tampered segment fails with the
message local replay gives, a task's answer is checked as a worker's is, and without Ray the
engine is unusable input (exit 2) with an install hint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from gradledger.ledger import encoding
from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.keys import read_public_keys
from gradledger.verify import VerificationPolicy, Verifier
from gradledger.verify._internal.ray_engine import _outcome
from gradledger.verify._internal.replay import Segment, SegmentResult
from test_verify_cli import _train, run_cli, write_bundle
from test_verify_structure import items_of, reseal

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'gradledger[ray]') is part of the test extra")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from gradledger.ledger.keys import write_public_keys
    from test_trainer import WORLD

    base = tmp_path_factory.mktemp("ray")
    recs, arts, origin = _train(base / "a", steps=8, every=3)
    with Ledger.open(base / "a") as led:
        export_bundle(led, base / "run.glb", with_data=True)
    roots = write_public_keys(base / "roots.pub", [(WORLD.root.public_key, "root")])
    return {"base": base, "bundle": base / "run.glb", "roots": roots, "recs": recs, "arts": arts, "origin": origin}


def _verify(run: dict[str, Any], bundle: Path, **policy: Any) -> Any:
    return Verifier(read_public_keys(run["roots"]), VerificationPolicy(**policy)).verify(bundle)


def test_an_honest_bundle_replays_bit_for_bit_through_ray(cluster: str, run: dict[str, Any]) -> None:
    report = _verify(run, run["bundle"], engine="ray", workers=2)
    assert report.verified, report.render()
    replay = next(c for c in report.checks if c.name == "replay")
    assert replay.status == "pass" and "bit for bit" in replay.detail
    assert report.figures["engine"] == "ray" and report.figures["ray_nodes"] >= 1
    local = _verify(run, run["bundle"])
    assert [c.name for c in local.checks] == [c.name for c in report.checks]
    assert local.figures["replayed_steps"] == report.figures["replayed_steps"] == 8


def test_sample_mode_through_ray_replays_the_same_draw_as_locally(cluster: str, run: dict[str, Any]) -> None:
    nonce = bytes(range(32))
    on_ray = _verify(run, run["bundle"], engine="ray", replay="sample", nonce=nonce, sample_fraction=0.4)
    local = _verify(run, run["bundle"], replay="sample", nonce=nonce, sample_fraction=0.4)
    assert on_ray.verified and local.verified
    assert on_ray.figures["sample_chosen"] == local.figures["sample_chosen"]
    assert on_ray.figures["replayed_steps"] == local.figures["replayed_steps"]


def test_a_tampered_segment_fails_through_ray_with_the_local_message(cluster: str, run: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    # A hostile trainer changes one recorded loss and re-signs everything with its own key.
    items = items_of(run["recs"])
    seq = [i for i, it in enumerate(items) if it.type == "GovernedUpdate"][5]
    items[seq].body = {**items[seq].body, "loss": items[seq].body["loss"] * (1 + 1e-6)}
    bundle = write_bundle(tmp_path / "bad.glb", reseal(items), run["arts"], run["origin"])
    on_ray = _verify(run, bundle, engine="ray", workers=2)
    local = _verify(run, bundle)
    assert not on_ray.verified and not local.verified
    a, b = on_ray.first_failure, local.first_failure
    assert (a.name, a.seq, a.step, a.detail) == (b.name, b.seq, b.step, b.detail) == ("replay", seq, 5, b.detail)


def test_the_cli_joins_a_running_cluster(cluster: str, run: dict[str, Any]) -> None:
    code, out = run_cli(run["bundle"], run["roots"], "--engine", "ray", "--address", cluster, "--workers", "2")
    assert code == 0 and out["verified"], out
    assert out["figures"]["engine"] == "ray"


def test_an_answer_from_a_node_is_checked_as_a_workers_is() -> None:
    seg = Segment(3, 10, {"step": 3}, 20, {"step": 6}, [(11, {"step": 3})])

    class Fake:
        def __init__(self, value: Any) -> None:
            self.value = value

        def get(self, ref: Any) -> Any:
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

    good = SegmentResult(3, True, 3, 0.1).to_obj()
    assert isinstance(_outcome(Fake(encoding.encode({"result": good})), None, seg), SegmentResult)
    for hostile in (encoding.encode({"result": {**good, "index": 4}}),  # an answer for another segment
                    encoding.encode({"result": {**good, "ok": 1}}),
                    encoding.encode({"result": good, "extra": 1}),
                    encoding.encode({"failed": [3, None, None]}),
                    b"\xff", "not bytes", RuntimeError("node lost")):
        kind, why = _outcome(Fake(hostile), None, seg)
        assert kind == "failed" and why.startswith("segment 3 (from the checkpoint at observation 10)"), why


def test_without_ray_the_engine_exits_2_with_an_install_hint(run: dict[str, Any], tmp_path: Path) -> None:
    # A `ray` that cannot be imported, ahead of the installed one on the path.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    proc = subprocess.run([sys.executable, "-m", "gradledger.verify.cli", str(run["bundle"]), "--trust",
                           str(run["roots"]), "--engine", "ray"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "pip install 'gradledger[ray]'" in proc.stderr


def test_address_without_the_ray_engine_is_unusable_input(run: dict[str, Any]) -> None:
    code, _ = run_cli(run["bundle"], run["roots"], "--address", "auto")
    assert code == 2
