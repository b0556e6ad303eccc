"""Artifacts stored in parts (ledger/chunks.py, specs/storage.md §2.1)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradledger.ledger import chunks, store
from gradledger.ledger.errors import CorruptLedgerError
from gradledger.ledger.ledger import Ledger


@pytest.fixture()
def led(tmp_path: Path):
    ledger = Ledger.create(tmp_path / "l")
    yield ledger
    ledger.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.binary(max_size=70), max_size=12), part_size=st.integers(1, 64))
def test_pieces_read_back_as_their_concatenation(led: Ledger, pieces: list[bytes], part_size: int) -> None:
    data = b"".join(pieces)
    digest = led.put_artifact_pieces([memoryview(p) for p in pieces], part_size=part_size)
    assert digest == hashlib.sha256(data).digest()
    assert led.artifact(digest) == data
    assert digest in led.artifact_digests()
    assert dict(led.artifacts())[digest] == data


def test_an_artifact_stored_twice_keeps_one_copy_and_drops_the_new_parts(led: Ledger) -> None:
    whole = led.put_artifact(b"abcdef" * 10)
    assert led.put_artifact_pieces([b"abcdef" * 5, b"abcdef" * 5], part_size=7) == whole
    again = led.put_artifact_pieces([b"xyz" * 9], part_size=4)
    assert led.put_artifact_pieces([b"xyz" * 3] * 3, part_size=5) == again
    with led._store.read() as txn:  # noqa: SLF001 - the storage layout is what is tested
        parts = list(txn.cursor(db=led._store.dbs["parts"]).iternext(keys=True, values=False))
    assert len(parts) == 7  # the first chunked copy's parts only (27 bytes in parts of 4)
    assert led.artifact_digests() == sorted({whole, again})


def test_a_crash_before_the_index_leaves_no_artifact(led: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    # The parts are durable one by one; the artifact exists only once its index entry is written.
    calls = []

    def die(done: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stopped between two parts

    with pytest.raises(KeyboardInterrupt):
        chunks.write_parts(led._store, [b"q" * 40], part_size=16, on_part=die)  # noqa: SLF001
    assert led.artifact_digests() == [] and led.artifact(hashlib.sha256(b"q" * 40).digest()) is None


@pytest.mark.parametrize("damage", ["flip", "drop", "extend"])
def test_a_damaged_part_is_refused_never_returned(led: Ledger, damage: str) -> None:
    data = bytes(range(256)) * 4
    digest = led.put_artifact_pieces([data], part_size=100)
    with led._store.read() as txn:  # noqa: SLF001
        token = led._store.get(txn, "chunked", digest)[: chunks.TOKEN_SIZE]  # noqa: SLF001
    key = chunks.part_key(token, 3)
    db = led._store.dbs["parts"]  # noqa: SLF001

    def edit(txn: lmdb.Transaction) -> None:
        part = txn.get(key, db=db)
        if damage == "drop":
            txn.delete(key, db=db)
        else:
            txn.put(key, bytes([part[0] ^ 1]) + part[1:] if damage == "flip" else part + b"!", db=db)

    led._store.write(edit)  # noqa: SLF001
    with pytest.raises(CorruptLedgerError, match="chunked artifact"):
        led.artifact(digest)


def test_a_ledger_from_before_parts_opens_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Written by a gradledger whose layout had no chunked/parts databases: still readable read-only
    # (nothing is created in it), and a writable open adds them.
    with monkeypatch.context() as m:
        m.setattr(store, "DATABASES", tuple(n for n in store.DATABASES if n not in store.LATER_DATABASES))
        old = Ledger.create(tmp_path / "old")
        digest = old.put_artifact(b"weights")
        old.close()
    ro = Ledger.open(tmp_path / "old")
    try:
        assert ro.artifact(digest) == b"weights" and ro.artifact_digests() == [digest]
        assert ro.artifact(hashlib.sha256(b"other").digest()) is None
    finally:
        ro.close()
    rw = Ledger.open(tmp_path / "old", writable=True)
    try:
        more = rw.put_artifact_pieces([b"abc", b"def"], part_size=2)
        assert rw.artifact(more) == b"abcdef" and rw.artifact_digests() == sorted({digest, more})
    finally:
        rw.close()


def test_a_size_beyond_the_readers_bound_is_refused_before_any_part_is_read(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A hostile ledger's index may claim any size: the verifier's ledger source passes the bound a
    # bundle puts on an artifact, and nothing is read past it.
    led = Ledger.create(tmp_path / "l")
    digest = led.put_artifact_pieces([b"z" * 50], part_size=10)
    whole = led.put_artifact(b"w" * 50)
    assert led.artifact(digest, limit=50) == b"z" * 50
    reads: list[bytes] = []
    real_get = led._store.get  # noqa: SLF001

    def get(txn: lmdb.Transaction, db: str, key: bytes) -> bytes | None:
        if db == "parts":
            reads.append(key)
        return real_get(txn, db, key)

    monkeypatch.setattr(led._store, "get", get)  # noqa: SLF001
    with pytest.raises(CorruptLedgerError, match="beyond the bound"):
        led.artifact(digest, limit=49)
    assert reads == []
    with pytest.raises(CorruptLedgerError, match="above 49"):
        led.artifact(whole, limit=49)

    from gradledger.ledger import bundle
    from gradledger.verify._internal.sources import LedgerSource

    monkeypatch.undo()
    led.close()
    source = LedgerSource(str(tmp_path / "l"))
    try:
        monkeypatch.setattr(bundle, "MAX_ARTIFACT_SIZE", 49)
        with pytest.raises(CorruptLedgerError):
            source.artifact(digest)
    finally:
        source.close()
