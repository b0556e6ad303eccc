"""`gradledger inspect` end to end, as a user runs it: output, --json, exit codes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
from helpers import build_ledger

CLI = [sys.executable, "-m", "gradledger.training.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "ledger"
    ledger, _ = build_ledger(path, updates=30, tree_head_every=10)
    ledger.close()
    return path


def test_inspect_human(ledger_path: Path) -> None:
    result = run("inspect", str(ledger_path))
    assert result.returncode == 0, result.stderr
    assert "38 observations" in result.stdout
    assert "GovernedUpdate" in result.stdout and "30" in result.stdout
    assert "attending" in result.stdout


def test_inspect_json_matches_ledger(ledger_path: Path) -> None:
    result = run("inspect", str(ledger_path), "--json", "--verify")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["size"] == 38
    assert summary["types"] == {"CredentialIssued": 4, "RunStarted": 1, "GovernedUpdate": 30, "TreeHead": 3}
    # Every update is filed under the attending path, and so under its ancestors.
    assert summary["authorities"]["acme/radiology/attending"] >= 30
    assert summary["authorities"]["acme"] == 38
    assert summary["last_tree_head"]["size"] == summary["last_tree_head"]["seq"]
    assert summary["verified"]["root"] == summary["root"]


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "garbage", "file"])
def test_unusable_input_exits_2_with_one_line(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "x"
    if kind == "empty-dir":
        target.mkdir()
    elif kind == "garbage":
        target.mkdir()
        (target / "data.mdb").write_bytes(b"\x13" * 70000)
    elif kind == "file":
        target.write_text("not a ledger")
    result = run("inspect", str(target))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_tampered_record_exits_1_naming_the_observation(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger, _ = build_ledger(path, updates=12)
    ledger.close()
    env = lmdb.open(str(path), max_dbs=16)
    obs = env.open_db(b"obs")
    with env.begin(write=True) as txn:
        key = struct.pack(">Q", 9)
        record = bytearray(txn.get(key, db=obs))
        record[-3] ^= 0x01  # inside the signature
        txn.put(key, bytes(record), db=obs)
    env.close()
    assert run("inspect", str(path)).returncode == 0  # reading still works
    result = run("inspect", str(path), "--verify")
    assert result.returncode == 1
    assert "observation 9" in result.stderr
    assert "Traceback" not in result.stderr
