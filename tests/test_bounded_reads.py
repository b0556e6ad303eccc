"""Every file the command-line tools read is bounded and type-checked before it is read (issue 9).

``--trust /dev/zero`` used to exhaust memory, a FIFO as trust file hung, ``gradledger retire --key
/dev/zero`` printed a traceback after 5 GB, and a sparse 128 MiB bundle took the reader to 1.25 GB
before its first item was checked. Each case runs the real CLI in a subprocess: exit 2, one line,
no traceback. The subprocess timeout is only a safety net against a regression that hangs; the
assertions are on exit status and output, never on time.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from gradledger.ledger import encoding
from gradledger.ledger.errors import BundleError, KeyFileError
from gradledger.ledger.files import read_regular
from gradledger.ledger.keys import SigningKey, read_public_keys, write_public_keys

SAFETY_NET_S = 600


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=SAFETY_NET_S,
                          stdin=subprocess.DEVNULL)


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def hostile(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB of holes: no disk used, but a naive read allocates it all
    return {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "directory": tmp_path, "sparse 2 GiB": sparse}


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory", "sparse 2 GiB"])
def test_a_hostile_trust_file_exits_2_with_one_line(hostile: dict[str, Path], tmp_path: Path, kind: str) -> None:
    bundle = tmp_path / "none.glb"
    bundle.write_bytes(b"\x00")
    proc = _cli("-m", "gradledger.verify.cli", str(bundle), "--trust", str(hostile[kind]))
    _one_line_exit_2(proc, str(hostile[kind]))


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory", "sparse 2 GiB"])
def test_a_hostile_key_file_exits_2_with_one_line(hostile: dict[str, Path], tmp_path: Path, kind: str) -> None:
    ledger = tmp_path / "no-ledger"
    proc = _cli("-m", "gradledger.training.cli", "retire", str(ledger), "--source", "worker-4",
                "--key", str(hostile[kind]), "--reason", "x")
    _one_line_exit_2(proc, str(hostile[kind]))


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory", "sparse 2 GiB"])
def test_the_readers_refuse_before_reading(hostile: dict[str, Path], kind: str) -> None:
    with pytest.raises(KeyFileError):
        read_public_keys(hostile[kind])
    with pytest.raises(KeyFileError):
        SigningKey.load(hostile[kind])


def test_a_file_at_the_bound_is_read_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    assert read_regular(path, 100, "test") == b"a" * 100
    with pytest.raises(Exception, match="more than"):
        read_regular(path, 99, "test")


def test_honest_key_and_trust_files_still_read(tmp_path: Path) -> None:
    key = SigningKey.from_seed(b"\x01" * 32, "root")
    key.save(tmp_path / "root.key")
    assert SigningKey.load(tmp_path / "root.key").public_key == key.public_key
    write_public_keys(tmp_path / "roots.pub", [(key.public_key, "root")])
    assert read_public_keys(tmp_path / "roots.pub") == [key.public_key]


def _peak_rss_of(code: str) -> int:
    """Peak RSS (bytes) of a fresh interpreter running ``code``, read from inside it."""
    probe = code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    proc = _cli("-c", probe)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1]) * 1024


def test_a_sparse_bundle_promising_millions_of_items_costs_no_memory(tmp_path: Path) -> None:
    """The header promises ~128 M artifacts of one byte each; the file is 128 MiB of holes after it.

    The reader used to size its index from the header (1 GiB of offsets) before checking the first
    item; now it must refuse at the first item with memory near an interpreter's baseline.
    """
    header = {"format": "gradledger-bundle", "version": 1, "origin": "x", "records": 0,
              "artifacts": (128 << 20) - 4096, "cosignatures": 0, "size": 0, "root": b"\x00" * 32,
              "with_data": True}
    head = encoding.encode(header)
    path = tmp_path / "sparse.glb"
    with open(path, "wb") as f:
        f.write(encoding.bstr_header(len(head)) + head)
        f.truncate(128 << 20)
    with pytest.raises(BundleError):
        from gradledger.ledger.bundle import Bundle

        Bundle.open(path)
    base = _peak_rss_of("import gradledger.ledger.bundle")
    hostile = _peak_rss_of(
        "from gradledger.ledger.bundle import Bundle\n"
        "from gradledger.ledger.errors import BundleError\n"
        f"try:\n    Bundle.open({str(path)!r})\nexcept BundleError:\n    pass\n"
    )
    assert hostile - base < 64 << 20, (base, hostile)
