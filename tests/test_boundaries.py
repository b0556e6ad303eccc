"""Dependency direction: training -> ledger, verify -> ledger; verify never touches training or pickle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(folder: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                prefix = "." * node.level
                names.add(prefix + node.module)
    return names


def test_verify_never_imports_training_statically() -> None:
    for name in imported_modules("verify"):
        assert "training" not in name.split("."), f"verify imports {name}"


def test_ledger_imports_neither_training_nor_verify() -> None:
    for name in imported_modules("ledger"):
        parts = name.lstrip(".").split(".")
        assert "training" not in parts and "verify" not in parts, f"ledger imports {name}"


def test_verify_and_ledger_never_unpickle() -> None:
    for folder in ("verify", "ledger"):
        for name in imported_modules(folder):
            assert name.split(".")[0] not in {"pickle", "dill", "cloudpickle", "joblib"}, f"{folder} imports {name}"


def test_importing_verify_loads_no_training_module() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "import gradledger.verify as v\n"
        "for m in pkgutil.walk_packages(v.__path__, 'gradledger.verify.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.startswith('gradledger.training')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_every_subpackage_is_in_the_distribution() -> None:
    # pyproject lists packages explicitly (the folders map onto the gradledger namespace); a
    # subpackage left out works in an editable install and is missing from the wheel.
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for folder in ("ledger", "training", "verify"):
        for init in (REPO / folder).rglob("__init__.py"):
            package = ".".join(("gradledger",) + init.parent.relative_to(REPO).parts)
            assert package in listed, f"{package} is not in pyproject's [tool.setuptools] packages"
