"""Old ledgers stay verifiable: governed runs exported before a later training format (format 1
before format 2, tests/data/v1/make.py; format 2 before format 4, tests/data/v2/make.py) verify
with today's verifier, and a damaged copy fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import verify_cli

DATA = Path(__file__).parent / "data"
#: Each stored run: its folder and the training format it was written in.
RUNS = [("v1", 1), ("v2", 2)]


def _verify(bundle: Path, roots: Path, *extra: str) -> tuple[int, dict]:
    return verify_cli(bundle, roots, *extra)


def _started(bundle: Path) -> dict:
    from gradledger.ledger.bundle import Bundle
    from gradledger.ledger.envelope import unseal

    with Bundle.open(bundle) as b:
        started = [s.body for s in (unseal(d) for _, d in b.records()) if s.type == "RunStarted"]
    return started[-1]  # the governed run (the genesis helper starts an ungoverned one first)


@pytest.mark.parametrize("folder, fmt", RUNS)
def test_an_old_format_run_verifies_exact(folder: str, fmt: int) -> None:
    """Exact where this machine's kernels are the recording's; elsewhere exact replay is refused (the
    environment check) and ``--tolerance`` verifies within specs/replay.md §4."""
    import torch

    run, roots = DATA / folder / "run.glb", DATA / folder / "roots.pub"
    started = _started(run)
    assert started["settings"].get("format", 1) == fmt
    # Exact replay needs the CPU capability the run was recorded on (its RunStarted environment).
    same = torch.backends.cpu.get_cpu_capability() == started["environment"]["cpu_capability"]
    code, report = _verify(run, roots)
    if not same:
        assert code == 1 and report["first_failure"]["name"] == "environment", report.get("first_failure")
        code, report = _verify(run, roots, "--tolerance")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == ("exact" if same else "tolerance") and report["weights_verified"] is True
    assert report["figures"]["replayed_steps"] == 6
    assert report["heads"][0]["step"] == 6


@pytest.mark.parametrize("folder, fmt", RUNS)
def test_a_damaged_old_format_run_fails(folder: str, fmt: int, tmp_path: Path) -> None:
    data = bytearray((DATA / folder / "run.glb").read_bytes())
    # A byte in the middle of the bundle: inside a record or an artifact, whichever it is, the
    # verifier must refuse it (exit 1) or find the bundle unusable (exit 2), never verify it.
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.glb"
    bad.write_bytes(bytes(data))
    code, report = _verify(bad, DATA / folder / "roots.pub")
    assert code in (1, 2)
    assert not report.get("verified", False)
