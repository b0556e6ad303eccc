"""Artifacts stored in parts: a large artifact written while it is produced (specs/storage.md §2.1).

Why: an artifact put whole is one LMDB value, so its bytes exist twice in memory at once (the
producer's buffer, then the write transaction's dirty pages until commit). A checkpoint of
ResNet-18 with its AdamW state is 134 MB; a run held that twice at every checkpoint, the largest
part of its memory over plain training. Written in parts, the producer hands over pieces (a
tensor's bytes, read in place) and at most one part is buffered.

Each part is its own durable transaction under a fresh random token; the artifact's index entry
(``chunked``: digest -> token, size, part count) is written last, in its own transaction, once the
digest of all the bytes is known. A crash before it leaves parts that nothing names: they are never
read (a reader finds an artifact through its index entry only) and cost only disk space.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Callable, Iterable, Iterator

import lmdb

from .errors import CorruptLedgerError
from .store import Store

#: The size of each part but the last: large enough that per-transaction costs (one fsync each)
#: stay small, small enough that one part in memory is noise beside the state it carries.
PART_SIZE = 8 << 20
TOKEN_SIZE = 16
_INDEX = struct.Struct(">QI")  # total size, part count (after the token)
#: A bound on the part count of an index entry, checked before any part is read.
MAX_PARTS = 1 << 24


def part_key(token: bytes, index: int) -> bytes:
    return token + struct.pack(">I", index)


def write_parts(store: Store, pieces: Iterable[memoryview | bytes | bytearray], *,
                part_size: int = PART_SIZE, on_part: Callable[[int], None] | None = None) -> bytes:
    """Store the concatenation of ``pieces`` as one chunked artifact; return its SHA-256.

    An artifact already stored (whole or chunked) is kept and the new parts are deleted.
    ``on_part(bytes so far)`` is called after each part is durable (tests use it).
    """
    if part_size <= 0:
        raise ValueError("part_size must be positive")
    token = os.urandom(TOKEN_SIZE)
    parts_db = store.dbs["parts"]
    h = hashlib.sha256()
    buffer = bytearray()
    count = total = 0

    def put(data: memoryview | bytearray) -> None:
        nonlocal count
        key = part_key(token, count)
        store.write(lambda txn: txn.put(key, data, db=parts_db, overwrite=False))
        count += 1
        if on_part is not None:
            on_part(total)

    for piece in pieces:
        view = memoryview(piece).cast("B")
        h.update(view)
        total += view.nbytes
        pos = 0
        while pos < view.nbytes:
            if not buffer and view.nbytes - pos >= part_size:
                put(view[pos : pos + part_size])  # a whole part from the piece itself: LMDB copies it once
                pos += part_size
                continue
            take = min(part_size - len(buffer), view.nbytes - pos)
            buffer += view[pos : pos + take]
            pos += take
            if len(buffer) == part_size:
                put(buffer)
                buffer = bytearray()
    if buffer or count == 0:
        put(buffer)
    digest = h.digest()
    index = token + _INDEX.pack(total, count)

    def publish(txn: lmdb.Transaction) -> bool:
        if store.get(txn, "artifacts", digest) is not None or store.get(txn, "chunked", digest) is not None:
            for i in range(count):
                txn.delete(part_key(token, i), db=parts_db)
            return False
        return txn.put(digest, index, db=store.dbs["chunked"], overwrite=False)

    store.write(publish)
    return digest


def read_parts(store: Store, txn: lmdb.Transaction, digest: bytes, limit: int | None = None) -> bytes | None:
    """The bytes of the chunked artifact ``digest`` (None if there is none), checked against its
    index (sizes, part count) and, as a whole, against its digest. ``limit`` bounds the size read."""
    index = store.get(txn, "chunked", digest)
    if index is None:
        return None
    return b"".join(_parts(store, txn, digest, index, limit))


def _parts(store: Store, txn: lmdb.Transaction, digest: bytes, index: bytes, limit: int | None) -> Iterator[bytes]:
    name = digest.hex()[:16]
    if len(index) != TOKEN_SIZE + _INDEX.size:
        raise CorruptLedgerError(f"chunked artifact {name}: malformed index entry")
    token = index[:TOKEN_SIZE]
    total, count = _INDEX.unpack(index[TOKEN_SIZE:])
    if count > MAX_PARTS or (limit is not None and total > limit):
        raise CorruptLedgerError(f"chunked artifact {name}: {count} parts, {total} bytes: beyond the bound")
    h, got = hashlib.sha256(), 0
    for i in range(count):
        part = store.get(txn, "parts", part_key(token, i))
        if part is None or got + len(part) > total:
            raise CorruptLedgerError(f"chunked artifact {name}: part {i} is missing or too long")
        h.update(part)
        got += len(part)
        yield part
    if got != total or h.digest() != digest:
        raise CorruptLedgerError(f"chunked artifact {name}: its parts do not make its digest")


def chunked_digests(store: Store, txn: lmdb.Transaction) -> list[bytes]:
    db = store.dbs["chunked"]
    return [] if db is None else list(txn.cursor(db=db).iternext(keys=True, values=False))
