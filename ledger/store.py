"""LMDB layout of a ledger: named databases, key encodings, map growth.

Everything derived from an observation (its Merkle nodes, its index entries,
the head) is written in the same write transaction as the observation, so a
crash at any moment leaves either all of it or none of it (specs/storage.md).
"""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import lmdb

from .errors import CorruptLedgerError, NotALedgerError

FORMAT = b"gradledger-ledger/1"
DATA_FILE = "data.mdb"
DEFAULT_MAP_SIZE = 1 << 30
DATABASES = (
    "meta",          # format, size, head, last_time, origin
    "obs",           # seq -> record bytes
    "nodes",         # level || index -> perfect subtree hash
    "by_authority",  # path || 0x00 || seq -> ""
    "by_source",     # subject || 0x00 || seq -> ""
    "by_example",    # sorted runs of (dataset index, seq): see postings.py
    "by_type",       # type || 0x00 || seq -> ""
    "artifacts",     # sha256 -> bytes
    "cosigs",        # TreeHead seq || witness key id -> cosignature
    "chunked",       # sha256 -> token || u64be(size) || u32be(count): an artifact stored in parts
    "parts",         # token || u32be(index) -> one part of a chunked artifact
)
#: Databases a ledger written before they existed lacks: opened read-only, they read as empty.
LATER_DATABASES = frozenset({"chunked", "parts"})

_U64 = struct.Struct(">Q")
T = TypeVar("T")


def u64(value: int) -> bytes:
    return _U64.pack(value)


def from_u64(data: bytes) -> int:
    return _U64.unpack(data)[0]


def node_key(level: int, index: int) -> bytes:
    return bytes((level,)) + _U64.pack(index)


def name_key(name: str, seq: int) -> bytes:
    return name.encode() + b"\x00" + _U64.pack(seq)


class Store:
    """An open LMDB environment with gradledger's named databases."""

    def __init__(self, path: Path, *, readonly: bool, create: bool, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = path
        self.readonly = readonly
        if not create and not exists(path):
            if not path.exists():
                raise NotALedgerError(f"{path}: no such ledger")
            raise NotALedgerError(f"{path}: not a gradledger ledger (no valid {DATA_FILE})")
        try:
            self.env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=len(DATABASES) + 1,
                readonly=readonly,
                create=create,
                subdir=True,
                sync=True,
                metasync=True,
                readahead=False,
                lock=True,
            )
            if not create:
                _check_file_covers_map(path, self.env)
            self.dbs: dict[str, Any] = {}  # None for a later database an older ledger lacks (read-only)
            for name in DATABASES:
                try:
                    self.dbs[name] = self.env.open_db(name.encode(), create=not readonly)
                except lmdb.NotFoundError:
                    if name not in LATER_DATABASES:
                        raise
                    self.dbs[name] = None  # an older ledger opened read-only: nothing stored there
        except lmdb.Error as exc:
            if create:
                raise
            raise CorruptLedgerError(f"{path}: cannot open ledger storage: {exc}") from None

    def close(self) -> None:
        self.env.close()

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        try:
            txn = self.env.begin()
        except lmdb.MapResizedError:
            # Another process grew the map since we opened it: adopt its size.
            self.env.set_mapsize(0)
            txn = self.env.begin()
        try:
            yield txn
        finally:
            txn.abort()

    def write(self, fill: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fill`` in one write transaction, growing the map and retrying if it is full.

        The transaction is durable when this returns (LMDB syncs at commit).
        """
        while True:
            txn = self.env.begin(write=True)
            try:
                result = fill(txn)
                txn.commit()
                return result
            except lmdb.MapFullError:
                txn.abort()
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except BaseException:
                txn.abort()
                raise

    def get(self, txn: lmdb.Transaction, db: str, key: bytes) -> bytes | None:
        handle = self.dbs[db]
        return None if handle is None else txn.get(key, db=handle)

    def prefix_keys(self, txn: lmdb.Transaction, db: str, prefix: bytes) -> Iterator[bytes]:
        cursor = txn.cursor(db=self.dbs[db])
        if not cursor.set_range(prefix):
            return
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                return
            yield key


def _check_file_covers_map(path: Path, env: lmdb.Environment) -> None:
    """Refuse a truncated data file before LMDB touches a page beyond its end (SIGBUS)."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = (path / DATA_FILE).stat().st_size
    if actual < needed:
        env.close()
        raise CorruptLedgerError(f"{path}: ledger storage is truncated ({actual} of {needed} bytes)")


def exists(path: str | os.PathLike[str]) -> bool:
    """A data file at least as large as LMDB's two meta pages (never write into a smaller one)."""
    data = Path(path) / DATA_FILE
    return data.is_file() and data.stat().st_size >= 2 * 4096
