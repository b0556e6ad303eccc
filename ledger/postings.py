"""The by-example index: which updates used dataset index i.

A GovernedUpdate names every example of its batch, so a per-pair B-tree entry
would cost one LMDB insert (and a random dirty page) per example per step. The
index is instead a small log-structured merge tree of sorted runs: each
committed group writes one run, and FANOUT runs of a level merge into one run
of the next level in the same transaction (specs/storage.md).

A run's key is ``level (1 byte) || first seq (u64 BE) || last seq (u64 BE)``;
its value is ``examples[n] || seqs[n]``, little-endian u64 arrays sorted by
(example, seq).
"""

from __future__ import annotations

import struct
from typing import Iterable, Sequence

import lmdb
import numpy as np

FANOUT = 16
_KEY = struct.Struct(">BQQ")


def build_run(batches: Sequence[tuple[int, Sequence[int]]]) -> tuple[bytes, bytes] | None:
    """One level-0 run from ``(seq, example indices)`` pairs given in sequence order.

    An index repeated within one batch (sampling with replacement) is posted
    once: the index answers "which updates used it", not how often.
    """
    batches = [(seq, sorted(set(ex))) for seq, ex in batches if ex]
    if not batches:
        return None
    examples = np.fromiter((e for _, ex in batches for e in ex), dtype="<u8")
    seqs = np.repeat(np.fromiter((seq for seq, _ in batches), dtype="<u8"), [len(ex) for _, ex in batches])
    return _encode(0, examples, seqs)


def _encode(level: int, examples: np.ndarray, seqs: np.ndarray) -> tuple[bytes, bytes]:
    # Inputs arrive in sequence order, so a stable sort by example keeps
    # each example's sequence numbers ascending.
    order = np.argsort(examples, kind="stable")
    key = _KEY.pack(level, int(seqs.min()), int(seqs.max()))
    return key, examples[order].tobytes() + seqs[order].tobytes()


def _decode(blob: bytes | memoryview) -> tuple[np.ndarray, np.ndarray]:
    n = len(blob) // 16
    return np.frombuffer(blob, "<u8", n), np.frombuffer(blob, "<u8", n, 8 * n)


def write(txn: lmdb.Transaction, db: lmdb._Database, run: tuple[bytes, bytes]) -> None:
    """Store a level-0 run, then merge any level that has reached FANOUT runs."""
    txn.put(run[0], run[1], db=db)
    level = 0
    while True:
        cursor = txn.cursor(db=db)
        keys = []
        if cursor.set_range(bytes((level,))):
            for key in cursor.iternext(keys=True, values=False):
                if key[0] != level:
                    break
                keys.append(key)
        if len(keys) < FANOUT:
            return
        parts = [_decode(txn.get(key, db=db)) for key in keys]
        for key in keys:
            txn.delete(key, db=db)
        examples = np.concatenate([p[0] for p in parts])
        seqs = np.concatenate([p[1] for p in parts])
        merged = _encode(level + 1, examples, seqs)
        txn.put(merged[0], merged[1], db=db)
        level += 1


def lookup(txn: lmdb.Transaction, db: lmdb._Database, example: int) -> list[int]:
    """Sequence numbers of every update that used ``example``, ascending."""
    found: list[np.ndarray] = []
    for _, blob in txn.cursor(db=db).iternext():
        examples, seqs = _decode(blob)
        lo, hi = np.searchsorted(examples, example, "left"), np.searchsorted(examples, example, "right")
        if hi > lo:
            found.append(seqs[lo:hi])
    if not found:
        return []
    return sorted(int(s) for s in np.concatenate(found))


def runs(txn: lmdb.Transaction, db: lmdb._Database) -> Iterable[tuple[int, int, int, int]]:
    """(level, first seq, last seq, pairs) per run, for inspection and tests."""
    for key, blob in txn.cursor(db=db).iternext():
        level, first, last = _KEY.unpack(key)
        yield level, first, last, len(blob) // 16
