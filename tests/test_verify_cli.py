"""`gradledger-verify` end to end on exported bundles: an honest run verifies (full, sample,
two workers); tampered bundles fail with exit 1 naming the place; unusable input is exit 2."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from gradledger.ledger import encoding
from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.keys import write_public_keys
from gradledger.ledger.merkle import CompactRange
from gradledger.training.dataset import commit_dataset
from gradledger.training.trainer import Trainer
from gradledger.verify.cli import main
from test_trainer import MANIFESTS, WORLD, X, engine_for, new_ledger, parts
from test_verify_structure import items_of, reseal


def _train(path: Path, steps: int, every: int, seed: int = 7) -> tuple[list[bytes], dict[bytes, bytes], str]:
    before = torch.are_deterministic_algorithms_enabled()
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model, checkpoint_every=every, seed=seed)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, steps)
    torch.use_deterministic_algorithms(before)
    out = [r for _, r in led.records()], dict(led.artifacts()), led.origin
    led.close()
    return out


def write_bundle(path: Path, recs: list[bytes], arts: dict[bytes, bytes], origin: str) -> Path:
    """A bundle written by the spec (specs/bundle.md), from records that no ledger would admit."""
    tree = CompactRange()
    for r in recs:
        from gradledger.ledger.merkle import leaf_hash

        tree.append(leaf_hash(r))
    header = {"format": "gradledger-bundle", "version": 1, "origin": origin, "records": len(recs),
              "artifacts": len(arts), "cosignatures": 0, "size": len(recs), "root": tree.root(), "with_data": True}
    with open(path, "wb") as f:
        for item in [encoding.encode(header), *recs, *(arts[d] for d in sorted(arts))]:
            f.write(encoding.bstr_header(len(item)) + item)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("cli")
    recs, arts, origin = _train(base / "a", steps=8, every=3)
    roots = write_public_keys(base / "roots.pub", [(WORLD.root.public_key, "root")])
    return {"base": base, "recs": recs, "arts": arts, "origin": origin, "roots": roots}


def run_cli(bundle: Path, roots: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "gradledger.verify.cli", str(bundle), "--trust", str(roots), "--json",
                           *extra], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def test_an_exported_honest_run_verifies_in_every_mode(world: dict[str, Any], tmp_path: Path) -> None:
    from gradledger.ledger.ledger import Ledger

    with Ledger.open(world["base"] / "a") as led:
        bundle = tmp_path / "run.glb"
        export_bundle(led, bundle, with_data=True)
    for extra in ((), ("--replay", "sample"), ("--workers", "2")):
        code, out = run_cli(bundle, world["roots"], *extra)
        assert code == 0 and out["verified"] and out["first_failure"] is None, out
        assert out["replay_mode"] == "exact"
        assert {c["name"] for c in out["checks"]} >= {"records", "tree heads", "dataset", "routing", "replay"}
    code, out = run_cli(bundle, world["roots"], "--replay", "sample")
    assert 0 < out["figures"]["sample_detect_prob"] <= 1


def test_honest_runs_over_several_seeds_are_never_rejected(tmp_path: Path) -> None:
    roots = write_public_keys(tmp_path / "roots.pub", [(WORLD.root.public_key, "root")])
    for seed in (1, 2, 3):
        recs, arts, origin = _train(tmp_path / f"s{seed}", steps=4, every=2, seed=seed)
        assert main([str(write_bundle(tmp_path / f"{seed}.glb", recs, arts, origin)), "--trust", str(roots),
                     "--json"]) == 0


def _failure(world: dict[str, Any], tmp_path: Path, recs: list[bytes], arts: dict[bytes, bytes] | None = None) -> dict[str, Any]:
    bundle = write_bundle(tmp_path / "bad.glb", recs, world["arts"] if arts is None else arts, world["origin"])
    code, out = run_cli(bundle, world["roots"])
    assert code == 1 and not out["verified"], out
    return out["first_failure"]


def test_a_flipped_envelope_byte_names_its_observation(world: dict[str, Any], tmp_path: Path) -> None:
    recs = list(world["recs"])
    seq = next(i for i, it in enumerate(items_of(recs)) if it.type == "GovernedUpdate")
    r = bytearray(recs[seq])
    r[len(r) // 2] ^= 0x01
    recs[seq] = bytes(r)
    failure = _failure(world, tmp_path, recs)
    assert failure["name"] == "records" and failure["seq"] == seq


def test_a_checkpoint_trained_one_step_further_fails_replay_at_it(world: dict[str, Any], tmp_path: Path) -> None:
    # The same run checkpointed every step supplies the honest state one step further.
    further, further_arts, _ = _train(tmp_path / "b", steps=4, every=1)
    items = items_of(world["recs"])
    step4 = next(it.body for it in items_of(further) if it.type == "Checkpoint" and it.body["step"] == 4)
    seq = next(i for i, it in enumerate(items) if it.type == "Checkpoint" and it.body["step"] == 3)
    old = items[seq].body["artifact"]
    items[seq].body = {**items[seq].body, **{k: step4[k] for k in ("digest", "tensors", "artifact")}}
    # The replaced artifact leaves the bundle (one no record names fails the artifacts check).
    arts = {**{d: a for d, a in world["arts"].items() if d != old}, step4["artifact"]: further_arts[step4["artifact"]]}
    failure = _failure(world, tmp_path, reseal(items), arts)
    assert failure["name"] == "replay" and failure["seq"] == seq and "checkpoint" in failure["detail"]


def test_a_changed_loss_is_named_as_the_first_divergent_step(world: dict[str, Any], tmp_path: Path) -> None:
    items = items_of(world["recs"])
    seq = [i for i, it in enumerate(items) if it.type == "GovernedUpdate"][5]
    items[seq].body = {**items[seq].body, "loss": items[seq].body["loss"] * (1 + 1e-6)}
    failure = _failure(world, tmp_path, reseal(items))
    assert failure["name"] == "replay" and failure["seq"] == seq and failure["step"] == 5


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_a_pickle_payload_in_the_program_is_rejected_without_running(world: dict[str, Any], tmp_path: Path) -> None:
    import hashlib

    items = items_of(world["recs"])
    run = next(i for i, it in enumerate(items) if it.type == "RunStarted" and it.body["artifacts"])
    program = world["arts"][items[run].body["artifacts"]["program"]]
    marker = tmp_path / "pwned"
    src, out = zipfile.ZipFile(io.BytesIO(program)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("archive/data/constants/opaque_obj_0", pickle.dumps(_Payload(str(marker))))
    evil = out.getvalue()
    digest = hashlib.sha256(evil).digest()
    old = items[run].body["artifacts"]["program"]
    items[run].body = {**items[run].body, "artifacts": {"program": digest}}
    arts = {d: a for d, a in world["arts"].items() if d != old}
    failure = _failure(world, tmp_path, reseal(items), {**arts, digest: evil})
    assert failure["name"] == "replay" and "pickle" in failure["detail"]
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_unusable_bundles_exit_2_with_one_line(world: dict[str, Any], tmp_path: Path, damage: str) -> None:
    bundle = write_bundle(tmp_path / "ok.glb", world["recs"], world["arts"], world["origin"])
    data = bundle.read_bytes()
    target = tmp_path / "damaged.glb"
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        target.write_bytes(b"\x89PNG\r\n" + bytes(range(256)) * 4)
    elif damage == "empty":
        target.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "gradledger.verify.cli", str(target), "--trust", str(world["roots"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_untrusted_root_fails(world: dict[str, Any], tmp_path: Path) -> None:
    from gradledger.ledger.keys import SigningKey

    other = write_public_keys(tmp_path / "other.pub", [(SigningKey.generate("x").public_key, "someone else")])
    bundle = write_bundle(tmp_path / "ok.glb", world["recs"], world["arts"], world["origin"])
    code, out = run_cli(bundle, other, "--replay", "none")
    assert code == 1 and out["first_failure"]["name"] == "records" and out["first_failure"]["seq"] == 0
