"""Checkpoints held outside the bundle: fetched from the artifact store only where replay uses them
(specs/replay.md §6.1).

A version-2 bundle names some checkpoints by digest only (specs/bundle.md §5). The replay
workers ask the verifier for artifacts by digest (segments.py); this fetcher answers them from
the bundle where it carries the artifact, and from the store (``--artifacts STORE``) where the
bundle names it as external: lazily, each at most once per request, size-bounded before it is
read and SHA-256-checked before it is served. So a sampled verification fetches the checkpoints
of its sample, not the run.

A fetch that fails (no store given, missing, too large, unreadable, other bytes) is never a
crash: the worker gets "absent", and the verifier fails ``replay`` naming the digest and the
Checkpoint that names it. After replay, each replayed run's head checkpoint (the weights a
release ships, which exact replay compares by digest without reading) is fetched and parsed
against its record, as the ``artifacts`` check does for a checkpoint in the bundle.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from gradledger.ledger.artifact_store import ArtifactStore
from gradledger.ledger.envelope import Sealed
from gradledger.ledger.errors import ArtifactUnavailable

from .checkpoint import CheckpointError, load_checkpoint
from .replay import ReplayError
from .sources import Source


class ExternalFetcher:
    """Serves artifacts to replay: the source's own, and the external ones from ``store``.

    ``external``: the digests the bundle names but does not carry. ``observations``: the log, to
    name the Checkpoint behind a digest in a failure.
    """

    def __init__(self, source: Source, external: Iterable[bytes], store: ArtifactStore | None,
                 observations: Sequence[Sealed]) -> None:
        self.source = source
        self.external = frozenset(external)
        self.store = store
        self.checkpoints: dict[bytes, list[Sealed]] = {}
        for obs in observations:
            if obs.type == "Checkpoint" and obs.body.get("artifact") in self.external:
                self.checkpoints.setdefault(obs.body["artifact"], []).append(obs)
        #: Every external digest served intact, in order (for the report, and for tests).
        self.served: list[bytes] = []
        self.failures: list[ReplayError] = []
        self.parsed: set[bytes] = set()

    def records(self) -> Iterator[tuple[int, bytes]]:
        return self.source.records()

    def close(self) -> None:
        """The source is its opener's to close."""

    def artifact(self, digest: bytes) -> bytes | None:
        """The artifact ``digest``, or None where neither the bundle nor the store can give it intact."""
        if digest not in self.external:
            return self.source.artifact(digest)
        try:
            if self.store is None:
                raise ArtifactUnavailable(digest, "is held outside the bundle, and no artifact store was given "
                                          "(--artifacts STORE)")
            data = self.store.fetch(digest)
        except ArtifactUnavailable as exc:
            self._fail(digest, exc.args[0])
            return None
        self.served.append(digest)
        return data

    def check_heads(self, heads: Iterable[Sealed]) -> None:
        """Fetch each head checkpoint (the last Checkpoint of a replayed run) that is external and parse it
        against its record: the artifact is the state its record states (specs/verification.md §3, 2)."""
        for head in heads:
            digest = head.body.get("artifact")
            if digest not in self.external or digest in self.parsed:
                continue
            data = self.artifact(digest)
            if data is None:
                continue
            self.parsed.add(digest)
            for sealed in self.checkpoints.get(digest, [head]):
                try:
                    tensors, _ = load_checkpoint(data, sealed.body, sealed.seq)
                except CheckpointError as exc:
                    self._fail(digest, f"fetched from the artifact store, it is not the state its record states: "
                               f"{exc.args[0]}", sealed)
                    break
                del tensors

    def _fail(self, digest: bytes, why: str, sealed: Sealed | None = None) -> None:
        named = self.checkpoints.get(digest) or []
        sealed = sealed or (named[0] if named else None)
        step = sealed.body.get("step") if sealed is not None else None
        where = f"Checkpoint for step {step}: " if sealed is not None else ""
        message = why if why.startswith("artifact ") else f"artifact {digest.hex()}: {why}"
        self.failures.append(ReplayError(f"{where}{message}", seq=sealed.seq if sealed is not None else None,
                                         step=step))

    def first_failure(self) -> ReplayError | None:
        return min(self.failures, key=lambda e: (e.seq is None, e.seq or 0)) if self.failures else None

    def describe(self) -> str:
        """What the replay check's detail adds: how much of the run's checkpoints came from the store."""
        if not self.external:
            return ""
        fetched = len(set(self.served))
        return (f"; {fetched} of {len(self.external)} checkpoints held outside the bundle fetched from the artifact "
                f"store ({self.figures()['external_bytes_fetched']} bytes), each hashing to its name")

    def figures(self) -> dict[str, Any]:
        """The report's figures: what this verification read from the store."""
        store = self.store
        return {"external_checkpoints": len(self.external),
                "external_fetched": len(set(self.served)),
                "external_bytes_fetched": store.bytes_fetched if store is not None else 0}
