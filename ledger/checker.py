"""Structural checking of a sequence of records: the verifier's first pass.

Re-admits every record through ``LedgerState.admit`` from an empty state.
Ed25519 verification dominates the cost and releases the GIL, so signatures
of a chunk whose signers are already credentialed are checked on a small
thread pool first; admission then runs in order and re-checks any signature
the pool could not vouch for, so the first failure is still named exactly.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from . import envelope, merkle
from .credentials import CredentialRegistry
from .envelope import Sealed
from .credentials import parse as parse_credential
from .errors import ChainError, CredentialError, EncodingError, SchemaError, SignatureError, VerificationError
from .keys import key_id, verify_signature
from .state import Admitted, LedgerState

CHUNK = 256
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        # One worker: this thread is busy admitting the previous chunk.
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gl-verify")
    return _pool


@dataclass
class CheckReport:
    """What a structural check found (failures are raised, not reported)."""

    size: int = 0
    root: bytes = merkle.EMPTY_ROOT
    head: bytes = envelope.GENESIS_PREV
    counts: dict[str, int] = field(default_factory=dict)
    tree_heads: int = 0
    signers: set[bytes] = field(default_factory=set)


def _signatures_ok(jobs: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    results = []
    for public_key, message, signature in jobs:
        try:
            verify_signature(public_key, "envelope", message, signature)
            results.append(True)
        except SignatureError:
            results.append(False)
    return results


def check_records(
    records: Iterable[tuple[int, bytes]],
    trusted_roots: Iterable[bytes] | None = None,
    progress: Callable[[int], None] | None = None,
    parallel: bool = True,
    on_admit: Callable[[Admitted], None] | None = None,
) -> tuple[LedgerState, CheckReport]:
    """Admit ``(seq, record)`` pairs in order; raise the first ``VerificationError``.

    ``on_admit`` sees every admitted record (with the Merkle nodes it
    completed), for checks against a store.

    While chunk k is admitted on this thread, a worker verifies the
    signatures of chunk k+1 (Ed25519 releases the GIL), so the two overlap.
    """
    roots = None if trusted_roots is None else frozenset(trusted_roots)
    state = LedgerState(registry=CredentialRegistry(trusted_roots=roots), indexing=False)
    report = CheckReport()
    # Key ids are hashes of public keys, so any credential record met so far
    # names the one key that can vouch for a signer, before admission.
    pubkeys: dict[bytes, bytes] = {}
    pending: _Chunk | None = None
    chunk: list[tuple[int, bytes]] = []
    for item in records:
        chunk.append(item)
        if len(chunk) == CHUNK:
            ready = _Chunk.start(pubkeys, chunk, parallel)
            if pending is not None:
                pending.admit(state, report, progress, on_admit)
            pending, chunk = ready, []
    if chunk:
        ready = _Chunk.start(pubkeys, chunk, parallel)
        if pending is not None:
            pending.admit(state, report, progress, on_admit)
        pending = ready
    if pending is not None:
        pending.admit(state, report, progress, on_admit)
    report.size, report.root, report.head = state.size, state.tree.root(), state.head
    return state, report


@dataclass
class _Chunk:
    records: list[tuple[int, bytes]]
    sealed: list[Sealed | None]
    jobs: list[tuple[int, bytes]]
    verdicts: Future[list[bool]] | None

    @classmethod
    def start(cls, pubkeys: dict[bytes, bytes], records: list[tuple[int, bytes]], parallel: bool) -> "_Chunk":
        sealed: list[Sealed | None] = []
        for _, record in records:
            try:
                item = envelope.unseal(record)
            except (EncodingError, SchemaError):
                item = None  # admit_record reports it at its position
            sealed.append(item)
            if item is not None and item.type == "CredentialIssued" and parallel:
                try:
                    public_key = parse_credential(item.body["credential"]).public_key
                    pubkeys[key_id(public_key)] = public_key
                except (CredentialError, KeyError, TypeError):
                    pass  # admission reports a bad credential in order
        if not parallel:
            return cls(records, sealed, [], None)
        # A vouched signature is only a hint: admission still requires the
        # signer's credential to carry exactly this public key.
        jobs = [(i, pubkeys[s.signer]) for i, s in enumerate(sealed) if s is not None and s.signer in pubkeys]
        work = [(pk, sealed[i].envelope_bytes, sealed[i].signature) for i, pk in jobs]  # type: ignore[union-attr]
        return cls(records, sealed, jobs, _executor().submit(_signatures_ok, work))

    def admit(
        self,
        state: LedgerState,
        report: CheckReport,
        progress: Callable[[int], None] | None,
        on_admit: Callable[[Admitted], None] | None,
    ) -> None:
        vouched: list[bytes | None] = [None] * len(self.records)
        if self.verdicts is not None:
            for (i, pk), ok in zip(self.jobs, self.verdicts.result()):
                if ok:
                    vouched[i] = pk
        for (seq, record), item, pk in zip(self.records, self.sealed, vouched):
            if seq != state.size:
                raise ChainError(f"observation {state.size} is missing", seq=state.size)
            if item is None:
                state.admit_record(record, seq)  # raises, naming seq
                raise VerificationError("record does not decode", seq=seq)  # pragma: no cover
            admitted = state.admit(item, signed_by=pk)
            if on_admit is not None:
                on_admit(admitted)
            report.counts[item.type] = report.counts.get(item.type, 0) + 1
            report.tree_heads += item.type == "TreeHead"
            report.signers.add(item.signer)
            if progress is not None:
                progress(seq)
