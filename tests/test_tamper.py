"""Tampering with a ledger's LMDB storage behind its back is caught, at the right place.

Each test builds a ledger with ``helpers.build_ledger``, closes it, edits the raw
LMDB databases directly (never while a ``Ledger`` holds the environment open:
LMDB forbids opening one environment twice in a process), then re-opens it and
runs ``verify()``. A change inside record N must be reported at N: record N's
own encoding, chain fields or signature fail before anything after it is read.

Ledger.open replays the credential records (seqs 0..3 here, written by
``helpers.genesis``) to rebuild the registry, so tampering with *those* may be
refused by ``open`` itself; that is acceptable only as ``CorruptLedgerError``.
"""

from __future__ import annotations

import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lmdb
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradledger.ledger import merkle
from gradledger.ledger.errors import (
    ChainError,
    CorruptLedgerError,
    ProofError,
    SignatureError,
    VerificationError,
)
from gradledger.ledger.ledger import Ledger

from helpers import build_ledger

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CRED_SEQS = (0, 1, 2, 3)  # helpers.genesis: four CredentialIssued records, then RunStarted
FIRST_PLAIN = 4

shapes = st.fixed_dictionaries(
    {
        "updates": st.integers(5, 40),
        "seed": st.integers(0, 255),
        "tree_head_every": st.sampled_from([0, 0, 1, 3, 7]),
    }
)


def seq_key(seq: int) -> bytes:
    return struct.pack(">Q", seq)


@contextmanager
def built(shape: dict) -> Iterator[tuple[Path, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger"
        ledger, _ = build_ledger(path, **shape)
        size = ledger.size
        ledger.close()
        yield path, size


@contextmanager
def raw(path: Path, db: bytes = b"obs") -> Iterator[lmdb.Transaction]:
    """One write transaction on a named database, with the environment closed afterwards."""
    env = lmdb.open(str(path), max_dbs=16, sync=False, metasync=False)  # a test: no fsync needed
    try:
        handle = env.open_db(db, create=False)
        with env.begin(write=True, db=handle) as txn:
            yield txn
    finally:
        env.close()


def read(path: Path, seq: int) -> bytes:
    with raw(path) as txn:
        value = txn.get(seq_key(seq))
    assert value is not None
    return value


def verify_error(path: Path) -> VerificationError:
    """Open (must succeed) and verify (must fail); return the failure."""
    with Ledger.open(path) as ledger:
        with pytest.raises(VerificationError) as info:
            ledger.verify()
    return info.value


def open_or_verify_error(path: Path) -> Exception:
    """For tampered credential records: open may refuse (CorruptLedgerError only), else verify must."""
    try:
        ledger = Ledger.open(path)
    except CorruptLedgerError as exc:
        return exc
    with ledger:
        with pytest.raises(VerificationError) as info:
            ledger.verify()
    return info.value


def test_untampered_ledgers_verify(tmp_path):
    ledger, world = build_ledger(tmp_path / "l", updates=12, seed=3, tree_head_every=4)
    ledger.close()
    with Ledger.open(tmp_path / "l") as reopened:
        report = reopened.verify(trusted_roots=[world.root.public_key])
        assert report.size == reopened.size == 5 + 12 + 3
        assert report.tree_heads == 3


# -- one flipped bit ---------------------------------------------------------


@SETTINGS
@given(shapes, st.integers(0, 1 << 30), st.integers(0, 1 << 30), st.integers(0, 7))
def test_flipped_bit_in_a_record_is_reported_at_that_record(shape, pick, offset, bit):
    with built(shape) as (path, size):
        seq = FIRST_PLAIN + pick % (size - FIRST_PLAIN)
        record = bytearray(read(path, seq))
        record[offset % len(record)] ^= 1 << bit
        with raw(path) as txn:
            txn.put(seq_key(seq), bytes(record))
        err = verify_error(path)
        assert err.seq == seq, err


@SETTINGS
@given(shapes, st.sampled_from(CRED_SEQS), st.integers(0, 1 << 30), st.integers(0, 7))
def test_flipped_bit_in_a_credential_record(shape, seq, offset, bit):
    with built(shape) as (path, size):
        record = bytearray(read(path, seq))
        record[offset % len(record)] ^= 1 << bit
        with raw(path) as txn:
            txn.put(seq_key(seq), bytes(record))
        err = open_or_verify_error(path)
        if isinstance(err, CorruptLedgerError):
            assert type(err) is CorruptLedgerError
        else:
            assert err.seq == seq, err


def _sweep_credential_records(path: Path, bits: tuple[int, ...]) -> None:
    for seq in CRED_SEQS:
        original = read(path, seq)
        for offset in range(len(original)):
            for bit in bits:
                record = bytearray(original)
                record[offset] ^= 1 << bit
                with raw(path) as txn:
                    txn.put(seq_key(seq), bytes(record))
                err = open_or_verify_error(path)
                if not isinstance(err, CorruptLedgerError):
                    assert err.seq == seq, (seq, offset, bit, err)
        with raw(path) as txn:
            txn.put(seq_key(seq), original)


def test_credential_record_tampering_never_escapes_as_a_raw_exception(tmp_path):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    ledger.close()
    _sweep_credential_records(tmp_path / "l", bits=(0, 5))


def test_renamed_type_of_a_credential_record(tmp_path):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    ledger.close()
    path = tmp_path / "l"
    record = read(path, 1)
    at = record.index(b"CredentialIssued") + len("CredentialIssued") - 1
    tampered = record[:at] + b"e" + record[at + 1 :]  # "CredentialIssuee": still valid UTF-8
    with raw(path) as txn:
        txn.put(seq_key(1), tampered)
    err = open_or_verify_error(path)
    assert isinstance(err, CorruptLedgerError) or err.seq == 1


# -- dropped, swapped, duplicated, truncated records -------------------------


@SETTINGS
@given(shapes, st.integers(0, 1 << 30))
def test_dropped_record_is_reported_as_missing(shape, pick):
    with built(shape) as (path, size):
        seq = FIRST_PLAIN + pick % (size - FIRST_PLAIN)
        with raw(path) as txn:
            assert txn.delete(seq_key(seq))
        err = verify_error(path)
        assert err.seq == seq and "missing" in str(err)


@pytest.mark.parametrize("seq", CRED_SEQS)
def test_dropped_credential_record_refused_at_open(tmp_path, seq):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    ledger.close()
    with raw(tmp_path / "l") as txn:
        assert txn.delete(seq_key(seq))
    with pytest.raises(CorruptLedgerError):
        Ledger.open(tmp_path / "l")


@SETTINGS
@given(shapes, st.integers(0, 1 << 30), st.integers(1, 1 << 30))
def test_swapped_records_are_reported_at_the_first(shape, pick, gap):
    with built(shape) as (path, size):
        first = FIRST_PLAIN + pick % (size - FIRST_PLAIN - 1)
        second = first + 1 + gap % (size - first - 1)
        a, b = read(path, first), read(path, second)
        with raw(path) as txn:
            txn.put(seq_key(first), b)
            txn.put(seq_key(second), a)
        err = verify_error(path)
        assert isinstance(err, ChainError) and err.seq == first


@pytest.mark.parametrize("first, second", [(0, 1), (1, 2), (2, 3), (1, 3), (0, 3)])
def test_swapped_credential_records(tmp_path, first, second):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    ledger.close()
    path = tmp_path / "l"
    a, b = read(path, first), read(path, second)
    with raw(path) as txn:
        txn.put(seq_key(first), b)
        txn.put(seq_key(second), a)
    err = open_or_verify_error(path)
    assert isinstance(err, CorruptLedgerError) or err.seq == first


@pytest.mark.parametrize("cred_seq", CRED_SEQS)
def test_credential_record_swapped_with_an_update(tmp_path, cred_seq):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    ledger.close()
    path = tmp_path / "l"
    a, b = read(path, cred_seq), read(path, 6)
    with raw(path) as txn:
        txn.put(seq_key(cred_seq), b)
        txn.put(seq_key(6), a)
    err = open_or_verify_error(path)
    assert isinstance(err, CorruptLedgerError) or err.seq == cred_seq


@SETTINGS
@given(shapes, st.integers(0, 1 << 30), st.booleans())
def test_inserted_duplicate_is_reported_where_it_lands(shape, pick, shift):
    with built(shape) as (path, size):
        seq = FIRST_PLAIN + pick % (size - FIRST_PLAIN - 1)  # the copy lands inside the log
        copy = read(path, seq)
        with raw(path) as txn:
            if shift:  # insert: records after seq move up by one
                for later in range(size - 1, seq, -1):
                    txn.put(seq_key(later + 1), txn.get(seq_key(later)))
            txn.put(seq_key(seq + 1), copy)
        err = verify_error(path)
        assert isinstance(err, ChainError) and err.seq == seq + 1


@SETTINGS
@given(shapes, st.integers(0, 1 << 30), st.integers(0, 1 << 30))
def test_truncated_record_is_reported_at_that_record(shape, pick, cut):
    with built(shape) as (path, size):
        seq = FIRST_PLAIN + pick % (size - FIRST_PLAIN)
        record = read(path, seq)
        with raw(path) as txn:
            txn.put(seq_key(seq), record[: cut % len(record)])
        err = verify_error(path)
        assert isinstance(err, ChainError) and err.seq == seq


@pytest.mark.parametrize("seq", CRED_SEQS)
@pytest.mark.parametrize("keep", [0, 1, 10, -1])
def test_truncated_credential_record_refused_at_open(tmp_path, seq, keep):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    ledger.close()
    record = read(tmp_path / "l", seq)
    with raw(tmp_path / "l") as txn:
        txn.put(seq_key(seq), record[:keep])
    with pytest.raises(CorruptLedgerError):
        Ledger.open(tmp_path / "l")


@SETTINGS
@given(shapes, st.integers(0, 1 << 30))
def test_record_replaced_by_one_from_another_ledger(shape, pick):
    # A validly signed record from a different ledger (other keys, other chain).
    with built(shape) as (path, size), built({**shape, "seed": (shape["seed"] + 1) % 256}) as (other, _):
        seq = FIRST_PLAIN + pick % (size - FIRST_PLAIN)
        foreign = read(other, seq)
        assume(foreign != read(path, seq))
        with raw(path) as txn:
            txn.put(seq_key(seq), foreign)
        err = verify_error(path)
        assert err.seq == seq


def test_flipped_signature_bit_is_a_signature_error(tmp_path):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    ledger.close()
    record = bytearray(read(tmp_path / "l", 7))
    record[-1] ^= 0x01  # the record ends with the 64-byte signature
    with raw(tmp_path / "l") as txn:
        txn.put(seq_key(7), bytes(record))
    err = verify_error(tmp_path / "l")
    assert isinstance(err, SignatureError) and err.seq == 7


def test_tampered_stored_head_is_reported(tmp_path):
    ledger, _ = build_ledger(tmp_path / "l", updates=5)
    size = ledger.size
    ledger.close()
    with raw(tmp_path / "l", b"meta") as txn:
        txn.put(b"head", bytes(32))
    err = verify_error(tmp_path / "l")
    assert err.seq == size - 1


# -- Merkle nodes --------------------------------------------------------------


def node_key(level: int, index: int) -> bytes:
    return bytes((level,)) + struct.pack(">Q", index)


def peak_keys(size: int) -> list[bytes]:
    keys, pos = [], 0
    for level in reversed(range(size.bit_length())):
        if size >> level & 1:
            keys.append(node_key(level, pos >> level))
            pos += 1 << level
    return keys


def all_node_keys(path: Path) -> list[bytes]:
    with raw(path, b"nodes") as txn:
        return [key for key, _ in txn.cursor()]


def flip_node(path: Path, key: bytes, bit: int = 0) -> None:
    with raw(path, b"nodes") as txn:
        value = bytearray(txn.get(key))
        value[bit // 8 % len(value)] ^= 1 << (bit % 8)
        txn.put(key, bytes(value))


@SETTINGS
@given(shapes, st.integers(0, 1 << 30), st.integers(0, 255))
def test_tampered_peak_node_is_a_proof_error(shape, pick, bit):
    with built(shape) as (path, size):
        peaks = peak_keys(size)
        flip_node(path, peaks[pick % len(peaks)], bit)
        err = verify_error(path)
        assert isinstance(err, ProofError)


@pytest.mark.parametrize("updates", [11, 20])
def test_tampered_interior_node_is_a_proof_error(tmp_path, updates):
    ledger, _ = build_ledger(tmp_path / "l", updates=updates)
    size = ledger.size
    ledger.close()
    path = tmp_path / "l"
    peaks = set(peak_keys(size))
    for key in all_node_keys(path):
        if key in peaks:
            continue
        flip_node(path, key)
        try:
            assert isinstance(verify_error(path), ProofError), key
        finally:
            flip_node(path, key)


def test_tampered_interior_node_breaks_inclusion_proofs(tmp_path):
    # Why the interior nodes matter: proofs are served from them.
    ledger, _ = build_ledger(tmp_path / "l", updates=11)  # 16 records: one peak (4, 0)
    size, root = ledger.size, ledger.root
    leaf = merkle.leaf_hash(ledger.record(3))
    ledger.close()
    flip_node(tmp_path / "l", node_key(1, 0))
    with Ledger.open(tmp_path / "l") as reopened:
        proof = reopened.inclusion_proof(3, size)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaf, 3, size, proof, root)


def test_missing_peak_node_refused_at_open(tmp_path):
    ledger, _ = build_ledger(tmp_path / "l", updates=7)
    size = ledger.size
    ledger.close()
    with raw(tmp_path / "l", b"nodes") as txn:
        assert txn.delete(peak_keys(size)[0])
    with pytest.raises(CorruptLedgerError):
        Ledger.open(tmp_path / "l")


def test_short_peak_node_refused_at_open(tmp_path):
    ledger, _ = build_ledger(tmp_path / "l", updates=11)
    size = ledger.size
    ledger.close()
    key = peak_keys(size)[0]
    with raw(tmp_path / "l", b"nodes") as txn:
        txn.put(key, txn.get(key)[:31])
    with pytest.raises(CorruptLedgerError):
        Ledger.open(tmp_path / "l")
