"""Old ledgers stay verifiable: a format-1 governed run, exported before training format 2
(tests/data/v1/make.py says how), verifies exact with today's verifier, and a damaged copy fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data" / "v1"


#: The CPU capability the bundle was made on (its RunStarted environment): exact replay needs the same.
RECORDED_CPU = "AVX512"


def _verify(bundle: Path, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "gradledger.verify.cli", str(bundle), "--trust",
                           str(DATA / "roots.pub"), "--json", *extra], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def test_a_format_1_run_verifies_exact() -> None:
    """Exact where this machine's kernels are the recording's; elsewhere exact replay is refused (the
    environment check) and ``--tolerance`` verifies within specs/replay.md §4."""
    import torch

    same = torch.backends.cpu.get_cpu_capability() == RECORDED_CPU
    code, report = _verify(DATA / "run.glb")
    if not same:
        assert code == 1 and report["first_failure"]["name"] == "environment", report.get("first_failure")
        code, report = _verify(DATA / "run.glb", "--tolerance")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == ("exact" if same else "tolerance") and report["weights_verified"] is True
    assert report["figures"]["replayed_steps"] == 6
    assert report["heads"][0]["step"] == 6


def test_a_damaged_format_1_run_fails(tmp_path: Path) -> None:
    data = bytearray((DATA / "run.glb").read_bytes())
    # A byte in the middle of the bundle: inside a record or an artifact, whichever it is, the
    # verifier must refuse it (exit 1) or find the bundle unusable (exit 2), never verify it.
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.glb"
    bad.write_bytes(bytes(data))
    code, report = _verify(bad)
    assert code in (1, 2)
    assert not report.get("verified", False)
