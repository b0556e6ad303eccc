"""The ledger: append signed observations, read them back, prove them.

Appends go through ``LedgerState.admit`` on a working copy of the state and
are written in one LMDB transaction per group; only a committed group moves
the in-memory state forward, so a failed or interrupted write loses nothing
that was committed and leaves nothing half-written (specs/storage.md).
"""

from __future__ import annotations

import contextlib

import fcntl
import hashlib
import os
import time as _time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import chunks, envelope, merkle, postings, store
from .credentials import Credential, CredentialRegistry
from .envelope import Sealed
from .errors import (
    ChainError,
    GradledgerError,
    CorruptLedgerError,
    LedgerLockedError,
    NotALedgerError,
    ProofError,
    SchemaError,
    UnusableInput,
    VerificationError,
)
from .keys import SigningKey
from .checker import CheckReport, check_records
from .observations import lookup
from .state import Admitted, LedgerState
from .witness import verify_cosignature
from .store import Store, from_u64, name_key, node_key, u64

LOCK_FILE = "writer.lock"
DEFAULT_GROUP = 64


#: A group size no run reaches: inside ``deferred()`` only an explicit commit writes.
_NEVER = 1 << 62


class Ledger:
    """An LMDB-backed, append-only, Merkle-logged ledger of signed observations.

    Open with ``Ledger.create`` / ``Ledger.open(path, writable=True)`` to append
    (one writer at a time, enforced by a lock file), or ``Ledger.open(path)``
    to read while a writer appends.
    """

    def __init__(self, path: Path, store_: Store, state: LedgerState, lock_fd: int | None, group: int) -> None:
        self.path = path
        self._store = store_
        self._state = state
        self._lock_fd = lock_fd
        self.group = group
        self._working: LedgerState | None = None
        self._pending: list[Admitted] = []
        # Background appenders (training's recorder thread): each is stopped before the ledger discards
        # or commits at close, so none appends after a discard (the crash rule holds for them too).
        self._appenders: list[Callable[[bool], None]] = []

    # -- opening -----------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, map_size: int = store.DEFAULT_MAP_SIZE, group: int = DEFAULT_GROUP
    ) -> "Ledger":
        path = Path(path)
        if store.exists(path):
            raise UnusableInput(f"{path}: a ledger already exists there")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UnusableInput(f"{path}: exists and is not an empty directory")
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _take_writer_lock(path)
        try:
            st = Store(path, readonly=False, create=True, map_size=map_size)
            st.write(lambda txn: txn.put(b"format", store.FORMAT, db=st.dbs["meta"]))
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, st, LedgerState(), lock_fd, group)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        group: int = DEFAULT_GROUP,
        map_size: int = store.DEFAULT_MAP_SIZE,
    ) -> "Ledger":
        path = Path(path)
        if not path.is_dir():
            raise NotALedgerError(f"{path}: no such ledger directory")
        # Refuse a non-ledger before the lock file is written there; the lock
        # comes before LMDB, which refuses a second open in one process itself.
        if not store.exists(path):
            raise NotALedgerError(f"{path}: not a gradledger ledger (no {store.DATA_FILE})")
        lock_fd = _take_writer_lock(path) if writable else None
        try:
            st = Store(path, readonly=not writable, create=False, map_size=map_size)
            try:
                state = _load_state(st)
            except BaseException:
                st.close()
                raise
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(path, st, state, lock_fd, group)

    def attach_appender(self, stop: Callable[[bool], None]) -> Callable[[], None]:
        """Register a background appender's ``stop(discard)``, called (joining it) before this ledger discards
        its pending records (``discard=True``: drop what is queued, but for what it must finish to commit
        a state it already holds, such as a checkpoint) or commits them at close (``False``: append what
        is queued first). Returns the function that detaches it."""
        self._appenders.append(stop)
        return lambda: self._appenders.remove(stop) if stop in self._appenders else None

    def _stop_appenders(self, discard: bool) -> None:
        for stop in list(self._appenders):
            stop(discard)

    def close(self) -> None:
        self._stop_appenders(False)
        if self._lock_fd is not None:
            self.commit()
        self._store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self._stop_appenders(True)
            self._discard()
        self.close()

    # -- state -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Committed observations (pending ones are not counted until committed)."""
        return self._state.size

    @property
    def root(self) -> bytes:
        return self._state.tree.root()

    @property
    def head(self) -> bytes:
        return self._state.head

    @property
    def origin(self) -> str:
        return self._state.origin

    @property
    def registry(self) -> CredentialRegistry:
        return self._state.registry

    def credential(self, key_id: bytes) -> Credential:
        return self._state.registry.get(key_id)

    # -- appending ---------------------------------------------------------

    def append(
        self, type_name: str, body: dict[str, Any], key: SigningKey, *, time: int | None = None, commit: bool = False
    ) -> Sealed:
        """Seal, check and queue one observation; commit the group when full (or now if ``commit``).

        The observation is checked exactly as a verifier would check it, so an
        unauthorized signer or a malformed body is refused here, not later.
        """
        self._require_writable()
        working = self._working or self._state.copy()
        now = max(_time.time_ns() if time is None else time, working.last_time)
        sealed = envelope.seal(type_name, working.size, working.head, now, body, key)
        self._queue(working, working.admit(sealed, signed_by=key.public_key), commit)
        return sealed

    def append_record(self, record: bytes, *, commit: bool = False) -> Sealed:
        """Admit and queue a record someone else signed (an import), exactly as ``append`` would.

        Nothing is re-signed: the record's own signature is checked, with the
        chain, schema, signer and credentials, and it is stored byte for byte.
        """
        self._require_writable()
        working = self._working or self._state.copy()
        admitted = working.admit_record(record)
        self._queue(working, admitted, commit)
        return admitted.sealed

    def _queue(self, working: LedgerState, admitted: Admitted, commit: bool) -> None:
        self._working = working
        self._pending.append(admitted)
        if commit or len(self._pending) >= self.group:
            self.commit()

    def _require_writable(self) -> None:
        if self._lock_fd is None:
            raise UnusableInput(f"{self.path}: ledger was opened read-only")

    def commit(self) -> None:
        """Write every pending observation in one durable transaction."""
        if not self._pending:
            return
        pending, working = self._pending, self._working
        assert working is not None
        dbs = self._store.dbs

        # Build every key first, sorted per database: LMDB inserts sorted
        # runs far faster, and the transaction stays short.
        rows: dict[str, list[tuple[bytes, bytes]]] = {
            "obs": [], "nodes": [], "by_type": [], "by_authority": [], "by_source": []
        }
        for item in pending:
            seq = item.sealed.seq
            seq_key = u64(seq)
            rows["obs"].append((seq_key, item.sealed.record))
            rows["nodes"].extend((node_key(level, index), digest) for level, index, digest in item.nodes)
            rows["by_type"].append((name_key(item.sealed.type, seq), b""))
            rows["by_authority"].extend((name_key(path, seq), b"") for path in item.keys.authorities)
            rows["by_source"].extend((name_key(source, seq), b"") for source in item.keys.sources)
        for name in ("nodes", "by_type", "by_authority", "by_source"):
            rows[name].sort()
        run = postings.build_run([(item.sealed.seq, item.keys.examples) for item in pending])

        def fill(txn: Any) -> None:
            first = pending[0].sealed.seq
            if txn.get(u64(first), db=dbs["obs"]) is not None:
                raise CorruptLedgerError(f"observation {first} already stored: is another writer active?")
            # Sequence keys only grow, so the records go in with MDB_APPEND.
            txn.cursor(db=dbs["obs"]).putmulti(rows["obs"], append=True)
            for name in ("nodes", "by_type", "by_authority", "by_source"):
                if rows[name]:
                    txn.cursor(db=dbs[name]).putmulti(rows[name])
            if run is not None:
                postings.write(txn, dbs["by_example"], run)
            meta = dbs["meta"]
            txn.put(b"size", u64(working.size), db=meta)
            txn.put(b"head", working.head, db=meta)
            txn.put(b"last_time", u64(working.last_time), db=meta)
            txn.put(b"origin", working.origin.encode(), db=meta)

        try:
            self._store.write(fill)
        except BaseException:
            self._discard()
            raise
        self._state = working
        self._pending = []
        self._working = None

    def _discard(self) -> None:
        self._pending = []
        self._working = None

    @contextlib.contextmanager
    def deferred(self) -> Iterator["Ledger"]:
        """Commit only when told (``commit()``, ``tree_head()``): what is appended inside stays pending.

        The training commit discipline (specs/training.md §1): a run's records between two
        checkpoints are committed with the next checkpoint's tree head, so a crash leaves the log
        at a checkpoint. On an exception the pending records are discarded, never half-committed;
        on a normal exit they stay pending for the caller's next commit. The group size is
        restored either way.
        """
        saved = self.group
        self.group = _NEVER
        try:
            yield self
        except BaseException:
            self._stop_appenders(True)
            self._discard()
            raise
        finally:
            self.group = saved

    def tree_head(self, key: SigningKey) -> Sealed:
        """Append and commit a signed tree head for the log as it stands now."""
        working = self._working or self._state
        body = {"origin": working.origin, "size": working.size, "root": working.tree.root()}
        return self.append("TreeHead", body, key, commit=True)

    def put_artifact(self, data: bytes) -> bytes:
        """Store bytes by their SHA-256 (durably, at once) and return the digest."""
        self._require_writable()
        digest = hashlib.sha256(data).digest()
        db = self._store.dbs["artifacts"]
        self._store.write(lambda txn: txn.put(digest, data, db=db, overwrite=False))
        return digest

    def put_artifact_pieces(self, pieces: Iterable[Any], *, part_size: int = chunks.PART_SIZE) -> bytes:
        """Store the concatenation of ``pieces`` (buffers: bytes, memoryviews, numpy arrays), read once
        and in order, as one artifact, in parts each durable at once (specs/storage.md §2.1); return
        its digest. At most one part is held in memory: for artifacts produced piece by piece (a
        checkpoint read tensor by tensor from the live state)."""
        self._require_writable()
        return chunks.write_parts(self._store, pieces, part_size=part_size)

    def add_cosignature(self, head_seq: int, witness_key_id: bytes, signature: bytes) -> None:
        """Store a witness's cosignature of the TreeHead at ``head_seq`` after checking it."""
        self._require_writable()
        verify_cosignature(self.observation(head_seq), witness_key_id, signature, self.registry)
        db = self._store.dbs["cosigs"]
        self._store.write(lambda txn: txn.put(u64(head_seq) + witness_key_id, signature, db=db))

    # -- reading -----------------------------------------------------------

    def record(self, seq: int) -> bytes:
        with self._store.read() as txn:
            data = self._store.get(txn, "obs", u64(seq))
        if data is None:
            raise IndexError(f"no observation {seq}")
        return data

    def observation(self, seq: int) -> Sealed:
        return envelope.unseal(self.record(seq))

    def observation_of_type(
        self, seq: int, type_name: str, error: type[GradledgerError] = UnusableInput
    ) -> Sealed:
        """The observation at ``seq``, which must be a ``type_name``; else ``error`` saying which."""
        try:
            sealed = self.observation(seq)
        except IndexError:
            raise error(f"no observation {seq} in the ledger") from None
        if sealed.type != type_name:
            raise error(f"observation {seq} is a {sealed.type}, not a {type_name}")
        return sealed

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Stored records in sequence order, read in one snapshot."""
        with self._store.read() as txn:
            yield from self._records_in(txn, start, stop)

    def _records_in(self, txn: Any, start: int, stop: int | None) -> Iterator[tuple[int, bytes]]:
        cursor = txn.cursor(db=self._store.dbs["obs"])
        if not cursor.set_range(u64(start)):
            return
        for key, value in cursor.iternext():
            seq = from_u64(key)
            if stop is not None and seq >= stop:
                return
            yield seq, value

    def artifact(self, digest: bytes, *, limit: int | None = None) -> bytes | None:
        """The artifact's bytes, stored whole or in parts (a chunked one is checked against its digest).

        ``limit``: the most bytes a caller accepts; a chunked artifact whose index says more is refused
        (CorruptLedgerError) before any part is read."""
        with self._store.read() as txn:
            data = self._store.get(txn, "artifacts", digest)
            if data is not None and limit is not None and len(data) > limit:
                raise CorruptLedgerError(f"artifact {digest.hex()[:16]} holds {len(data)} bytes, above {limit}")
            return data if data is not None else chunks.read_parts(self._store, txn, digest, limit)

    def artifacts(self) -> Iterator[tuple[bytes, bytes]]:
        """Every stored artifact as (digest, bytes), ascending by digest."""
        for digest in self.artifact_digests():
            data = self.artifact(digest)
            assert data is not None
            yield digest, data

    def artifact_digests(self) -> list[bytes]:
        """Every stored artifact's digest, ascending, without reading the artifacts."""
        with self._store.read() as txn:
            whole = list(txn.cursor(db=self._store.dbs["artifacts"]).iternext(keys=True, values=False))
            return sorted(set(whole).union(chunks.chunked_digests(self._store, txn)))

    def cosignatures(self) -> Iterator[tuple[int, bytes, bytes]]:
        with self._store.read() as txn:
            for key, sig in txn.cursor(db=self._store.dbs["cosigs"]).iternext():
                yield from_u64(key[:8]), key[8:], sig

    def by_authority(self, prefix: str) -> list[int]:
        """Every observation filed anywhere under ``prefix`` (exact node or below), in order."""
        raw = prefix.rstrip("/").encode()
        seqs: set[int] = set()
        with self._store.read() as txn:
            for p in (raw + b"\x00", raw + b"/"):
                seqs.update(from_u64(k[-8:]) for k in self._store.prefix_keys(txn, "by_authority", p))
        return sorted(seqs)

    def by_source(self, subject: str) -> list[int]:
        return self._scan("by_source", subject.encode() + b"\x00")

    def by_type(self, type_name: str) -> list[int]:
        return self._scan("by_type", type_name.encode() + b"\x00")

    def by_example(self, index: int) -> list[int]:
        """Every update whose batch held dataset index ``index``, in order."""
        with self._store.read() as txn:
            return postings.lookup(txn, self._store.dbs["by_example"], index)

    def _scan(self, db: str, prefix: bytes) -> list[int]:
        with self._store.read() as txn:
            return [from_u64(k[-8:]) for k in self._store.prefix_keys(txn, db, prefix)]

    def authority_counts(self) -> dict[str, int]:
        """Observations per taxonomy node, counting each under its node and every ancestor."""
        per_node: dict[str, set[int]] = {}
        with self._store.read() as txn:
            for key in self._store.prefix_keys(txn, "by_authority", b""):
                path, seq = key[:-9].decode(), from_u64(key[-8:])
                parts = path.split("/")
                for i in range(1, len(parts) + 1):
                    per_node.setdefault("/".join(parts[:i]), set()).add(seq)
        return {node: len(seqs) for node, seqs in sorted(per_node.items())}

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._store.read() as txn:
            for key in self._store.prefix_keys(txn, "by_type", b""):
                name = key[:-9].decode()
                counts[name] = counts.get(name, 0) + 1
        return counts

    # -- proofs ------------------------------------------------------------

    def _node_getter(self, txn: Any) -> Callable[[int, int], bytes]:
        def get(level: int, index: int) -> bytes:
            value = self._store.get(txn, "nodes", node_key(level, index))
            if value is None:
                raise CorruptLedgerError(f"Merkle node ({level}, {index}) is missing")
            return value

        return get

    def root_at(self, size: int) -> bytes:
        self._check_size(size)
        with self._store.read() as txn:
            return merkle.root_from_store(size, self._node_getter(txn))

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        self._check_size(size)
        with self._store.read() as txn:
            return merkle.inclusion_proof(seq, size, self._node_getter(txn))

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        size2 = self.size if size2 is None else size2
        self._check_size(size2)
        with self._store.read() as txn:
            return merkle.consistency_proof(size1, size2, self._node_getter(txn))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ProofError(f"tree size {size} is beyond the committed log ({self.size})")

    # -- checking ----------------------------------------------------------

    def verify(
        self, trusted_roots: Iterable[bytes] | None = None, progress: Callable[[int], None] | None = None
    ) -> CheckReport:
        """Re-admit every stored record from scratch and compare with what is stored.

        Checks signatures, the chain, schemas, signer authorization, credential
        chains and revocations, every recorded tree head, and that the stored
        Merkle nodes give the recomputed root. Raises a ``VerificationError``
        naming the first failing sequence number.
        """
        # One read snapshot for everything, so a writer appending meanwhile
        # (or a stale read-only handle) cannot make the parts disagree.
        with self._store.read() as txn:
            dbs = self._store.dbs
            raw_size = txn.get(b"size", db=dbs["meta"])
            expected = from_u64(raw_size) if raw_size else 0
            stored_head = txn.get(b"head", db=dbs["meta"]) or envelope.GENESIS_PREV

            def compare_nodes(admitted: Admitted) -> None:
                # Every stored node, not only the peaks: proofs are served from them.
                for level, index, digest in admitted.nodes:
                    if txn.get(node_key(level, index), db=dbs["nodes"]) != digest:
                        raise ProofError(
                            f"stored Merkle node ({level}, {index}) does not match the records",
                            seq=admitted.sealed.seq,
                        )

            state, report = check_records(self._records_in(txn, 0, expected), trusted_roots, progress, on_admit=compare_nodes)
            if state.size != expected:
                raise VerificationError(f"observation {state.size} is missing from storage", seq=state.size)
            beyond = txn.cursor(db=dbs["obs"])
            if beyond.set_range(u64(expected)):
                stray = from_u64(beyond.key())
                raise ChainError(f"a record is stored beyond the committed log (at {stray})", seq=stray)
            if expected and merkle.root_from_store(expected, self._node_getter(txn)) != report.root:
                raise ProofError("stored Merkle nodes do not give the root of the stored records")
            if state.head != stored_head:
                raise VerificationError("stored head does not match the last record", seq=expected - 1)
            # Cosignatures were checked when stored, but against the writer's view
            # of the roots; re-check them against the roots this check trusts.
            for key, signature in txn.cursor(db=dbs["cosigs"]).iternext():
                head_seq, witness_key_id = from_u64(key[:8]), key[8:]
                record = txn.get(key[:8], db=dbs["obs"])
                if head_seq >= expected or record is None:
                    raise ProofError("cosignature of a tree head beyond the committed log", seq=head_seq)
                verify_cosignature(envelope.unseal(record), witness_key_id, signature, state.registry)
        return report


def _take_writer_lock(path: Path) -> int:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise LedgerLockedError(f"{path}: ledger is open for writing by {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return fd


def _load_state(st: Store) -> LedgerState:
    """Rebuild the admit state from storage: O(log n) nodes plus the credential records."""
    with st.read() as txn:
        meta = st.dbs["meta"]
        if txn.get(b"format", db=meta) != store.FORMAT:
            raise NotALedgerError(f"{st.path}: not a gradledger ledger (format marker missing)")
        raw_size = txn.get(b"size", db=meta)
        size = from_u64(raw_size) if raw_size else 0
        if size == 0:
            return LedgerState()
        try:
            head = txn.get(b"head", db=meta)
            last_time = from_u64(txn.get(b"last_time", db=meta))
            origin = txn.get(b"origin", db=meta).decode()

            def get(level: int, index: int) -> bytes:
                value = txn.get(node_key(level, index), db=st.dbs["nodes"])
                if value is None or len(value) != merkle.HASH_SIZE:
                    raise CorruptLedgerError(f"{st.path}: Merkle node ({level}, {index}) is missing or damaged")
                return value

            tree = merkle.CompactRange.from_store(size, get)
            registry = CredentialRegistry()
            cred_seqs = sorted(
                from_u64(k[-8:])
                for name in ("CredentialIssued", "CredentialRevoked")
                for k in st.prefix_keys(txn, "by_type", name.encode() + b"\x00")
            )
            for seq in cred_seqs:
                sealed = envelope.unseal(txn.get(u64(seq), db=st.dbs["obs"]))
                if sealed.seq != seq or sealed.type not in ("CredentialIssued", "CredentialRevoked"):
                    raise CorruptLedgerError(f"{st.path}: credential index points at a {sealed.type} record at {seq}")
                lookup(sealed.type).schema.validate(sealed.body, sealed.type)
                if sealed.type == "CredentialIssued":
                    registry.add(sealed.body["credential"], sealed.time)
                else:
                    registry.revoke(sealed.body["key_id"], sealed.time, sealed.signer)
        except (
            TypeError, AttributeError, LookupError, ValueError, SchemaError, VerificationError, UnusableInput
        ) as exc:
            if isinstance(exc, CorruptLedgerError):
                raise
            raise CorruptLedgerError(f"{st.path}: ledger metadata is damaged: {exc}") from None
    return LedgerState(size=size, head=head, last_time=last_time, tree=tree, registry=registry, origin=origin)
