"""Verdicts (specs/verification.md "Verdicts", issues 9 and 10.3, 10.4, 10.5, 10.7): no check is
optional, tolerance is the verifier's choice never the bundle's, the sample is unpredictable, and
a report names what it verified (exact, tolerance, structure only) or fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradledger.ledger.keys import write_public_keys
from test_trainer import WORLD


def _cli_with_broken(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the verifier's command line in a process where ``module`` cannot be imported."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # any import of it now raises ImportError\n"
        "from gradledger.verify.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["gradledger.verify._internal.certificates", "gradledger.verify._internal.replay"])
def test_a_check_module_that_cannot_be_imported_is_exit_2_never_a_skip(tmp_path: Path, module: str) -> None:
    """Issue 9: certificates were imported under try/except ImportError and silently skipped."""
    roots = write_public_keys(tmp_path / "roots.pub", [(WORLD.root.public_key, "root")])
    bundle = tmp_path / "missing.glb"  # never read: the verifier refuses before it opens anything
    proc = _cli_with_broken(module, [str(bundle), "--trust", str(roots), "--json"])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "cannot run every check" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_the_verifier_imports_its_certificate_checks_unconditionally() -> None:
    import gradledger.verify.verifier as V
    from gradledger.verify._internal.certificates import check_certificates

    assert V.check_certificates is check_certificates
    source = Path(V.__file__).read_text(encoding="utf-8")
    assert "except ImportError" not in source and "importlib" not in source
