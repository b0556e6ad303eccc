"""The ``artifacts`` structural check: every byte a source carries is checked, in every replay mode
(specs/verification.md, "Structural checks", §3 ``artifacts``).

- Every artifact a record names is present and hashes to its name; a missing one fails at the
  first record that names it.
- Every Checkpoint's artifact parses as safetensors (no pickle) and its tensor digests and state
  digest are recomputed and compared with the record (structure, not replay: a Checkpoint whose
  artifact is not the state it describes fails with ``--replay none`` too).
- From a bundle: every artifact in it is named by some record, the header agrees with the
  records, and every cosignature is a credentialed witness's signature of a TreeHead in the log.
- A version-2 bundle's external checkpoints (specs/bundle.md §5) are named only by Checkpoint
  records and are not fetched here: fetching every one would make a sampled verification fetch
  the whole run. Replay fetches, hashes and checks the ones it uses (external.py).

Each artifact is hashed once and each checkpoint parsed once, however many records name it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

from gradledger.ledger import encoding
from gradledger.ledger.bundle import Bundle
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.envelope import Sealed
from gradledger.ledger.errors import VerificationError
from gradledger.ledger.state import origin_of
from gradledger.ledger.witness import verify_cosignature

from .checkpoint import CheckpointError, load_checkpoint


class Source(Protocol):
    def records(self) -> Iterator[tuple[int, bytes]]: ...
    def artifact(self, digest: bytes) -> bytes | None: ...


class ArtifactError(VerificationError):
    """An artifact is missing, does not hash to its name, is not named, or does not match its record;
    or a bundle's header or cosignature disagrees with the records."""


def _short(digest: bytes) -> str:
    return digest.hex()[:16]


def _is_digest(value: Any) -> bool:
    return type(value) is bytes and len(value) == 32


def named_artifacts(sealed: Sealed) -> Iterator[tuple[str, Any]]:
    """``(field, value)`` for every field of ``sealed`` that names an artifact by its SHA-256.

    The fields are those of specs/observations.md, specs/manifests.md §5, specs/training.md §4 and
    specs/unlearning.md: RunStarted ``artifacts.*`` and ``settings.branch.removed|relabeled``,
    DatasetCommitted ``manifests`` and ``data``, Checkpoint ``artifact``, UnlearningCertificate
    ``removed`` and ``relabeled``, and (specs/forensics.md §7.1) a ForensicTrace's ``query.file`` when
    it is not empty (a query file's bytes). A value that is not a 32-byte digest is yielded as is, for the
    check to refuse.
    """
    body = sealed.body
    if sealed.type == "RunStarted":
        for name, digest in sorted(body["artifacts"].items()):
            yield f"artifacts.{name}", digest
        settings = body["settings"]
        branch = settings.get("branch") if isinstance(settings, dict) else None
        if isinstance(branch, dict):
            for key in ("removed", "relabeled"):
                if key in branch:
                    yield f"settings.branch.{key}", branch[key]
    elif sealed.type == "DatasetCommitted":
        yield "manifests", body["manifests"]
        if "data" in body:
            yield "data", body["data"]
    elif sealed.type == "Checkpoint":
        yield "artifact", body["artifact"]
    elif sealed.type == "UnlearningCertificate":
        yield "removed", body["removed"]
        yield "relabeled", body["relabeled"]
    elif sealed.type == "ForensicTrace":
        query = body.get("query")
        if isinstance(query, dict) and query.get("file", b"") != b"":
            yield "query.file", query["file"]


@dataclass
class ArtifactSummary:
    named: int = 0
    checkpoints: int = 0
    notes: list[str] = field(default_factory=list)


def check_artifacts(
    source: Source, observations: Sequence[Sealed], registry: CredentialRegistry, root: bytes
) -> tuple[str, str]:
    """Run the ``artifacts`` check; (status, detail), or raise ``ArtifactError`` naming the record."""
    summary = ArtifactSummary()
    # The source's own index names bundle artifacts by the SHA-256 it computed while reading
    # them; anything else (a ledger, a test's list) is hashed here.
    trusted_names = isinstance(source, Bundle)
    external = frozenset(source.external_digests()) if isinstance(source, Bundle) else frozenset()
    seen: set[bytes] = set()
    parsed: set[bytes] = set()
    outside = 0
    for sealed in observations:
        for name, digest in named_artifacts(sealed):
            where = f"{sealed.type} {sealed.seq} {name}"
            if not _is_digest(digest):
                raise ArtifactError(f"{where} is not a 32-byte artifact digest", seq=sealed.seq)
            if digest in external:
                # specs/bundle.md §5: only a checkpoint may be held outside; its digest is committed by
                # the signed record, and replay checks the bytes where it fetches them.
                if sealed.type != "Checkpoint":
                    raise ArtifactError(f"{where}: artifact {digest.hex()} is held outside the bundle, and only "
                                        "checkpoint artifacts may be", seq=sealed.seq)
                if digest not in seen:
                    seen.add(digest)
                    outside += 1
                continue
            if digest not in seen:
                _check_present(source, digest, where, sealed.seq, trusted_names)
                seen.add(digest)
            if sealed.type == "Checkpoint":
                # Two records naming one artifact with different digests are two claims: both checked.
                key = hashlib.sha256(encoding.encode([digest, sealed.body["digest"], sealed.body["tensors"]])).digest()
                if key not in parsed:
                    _check_checkpoint(source, sealed)
                    parsed.add(key)
                    summary.checkpoints += 1
    summary.named = len(seen)
    detail = (f"{len(seen) - outside} artifacts named by the records, each present and hashing to its name; "
              f"{summary.checkpoints} checkpoint artifacts parsed as safetensors, every tensor digest and state "
              "digest recomputed and equal to its record")
    if external:
        detail += (f"; {outside} checkpoint artifacts held outside the bundle (named by digest, none fetched by this "
                   "check: replay fetches, hashes and checks those it uses, specs/bundle.md §5)")
    if isinstance(source, Bundle):
        detail += "; " + _check_bundle(source, observations, registry, root, seen)
    return "pass", detail


def _check_present(source: Source, digest: bytes, where: str, seq: int, trusted_names: bool) -> None:
    data = source.artifact(digest)
    if data is None:
        raise ArtifactError(f"{where}: artifact {digest.hex()} is not in the bundle", seq=seq)
    if not trusted_names and hashlib.sha256(data).digest() != digest:
        raise ArtifactError(f"{where}: artifact {_short(digest)} in the bundle does not hash to its name", seq=seq)


def _check_checkpoint(source: Source, sealed: Sealed) -> None:
    """specs/training.md §4: the artifact is the state the record describes, tensor by tensor."""
    try:
        tensors, _ = load_checkpoint(source.artifact(sealed.body["artifact"]), sealed.body, sealed.seq)
    except CheckpointError as exc:
        raise ArtifactError(f"Checkpoint {sealed.seq} (step {sealed.body['step']}): {exc.args[0]}",
                            seq=sealed.seq) from None
    del tensors


def _check_bundle(
    bundle: Bundle, observations: Sequence[Sealed], registry: CredentialRegistry, root: bytes, named: set[bytes]
) -> str:
    """specs/bundle.md §1–2 as the verifier holds the exporter to it: nothing unnamed, a true header,
    cosignatures over this log's tree heads."""
    extra = sorted(bundle.artifact_digests() - named)
    if extra:
        raise ArtifactError(f"the bundle carries {len(extra)} artifacts no record names, first {extra[0].hex()}")
    external = set(bundle.external_digests())
    stray = sorted(external - named)
    if stray:
        raise ArtifactError(f"the bundle names {len(stray)} external artifacts no record names, first {stray[0].hex()}")
    header, size = bundle.header, len(observations)
    origin = origin_of(observations[0].record) if observations else ""
    claims = (("records", header["records"], size), ("size", header["size"], size),
              ("root", header["root"], root), ("origin", header["origin"], origin),
              ("artifacts", header["artifacts"], len(named - external)),
              ("cosignatures", header["cosignatures"], len(bundle.cosignatures())))
    for key, said, derived in claims:
        if type(said) is not type(derived) or said != derived:
            shown = (lambda v: v.hex() if isinstance(v, bytes) else repr(v))
            raise ArtifactError(f"the bundle header says {key} {shown(said)}, the records give {shown(derived)}")
    inputs = [o.seq for o in observations if o.type == "DatasetCommitted" and "data" in o.body]
    if inputs and header["with_data"] is not True:
        raise ArtifactError(f"the bundle header says with_data false, but DatasetCommitted {inputs[0]} names inputs "
                            "that the bundle carries", seq=inputs[0])
    for i, (head_seq, witness, signature) in enumerate(bundle.cosignatures()):
        if head_seq >= size:
            raise ArtifactError(f"cosignature {i} names tree head {head_seq}, beyond the log of {size} records")
        head = observations[head_seq]
        try:
            verify_cosignature(head, witness, signature, registry)
        except VerificationError as exc:
            raise ArtifactError(f"cosignature {i} on observation {head_seq}: {exc.args[0] if exc.args else exc}",
                                seq=head_seq) from None
    cosigs = len(bundle.cosignatures())
    return (f"bundle: no unnamed artifact, header agrees with the records (size {size}, root {_short(root)}, "
            f"origin, counts, with_data), {cosigs} cosignatures by credentialed witnesses on tree heads of this log")
