"""Retiring a labeling source, and what depends on it (specs/unlearning.md §1-§2).

A retirement is a SourceRetired observation signed by the governance root above the source or by
the authority that issued its credential. It does not revoke the credential: it says that what the
source taught a model must be unlearned. The dependency rule is the re-aggregation of
specs/manifests.md §6 applied to every manifest of a committed dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from gradledger.ledger import encoding
from gradledger.ledger.credentials import Credential, is_below
from gradledger.ledger.errors import CredentialError, GradledgerError
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .dataset import CommittedDataset
from .errors import GovernanceError
from .manifests import relabel_without


class RetirementError(GovernanceError):
    """A retirement cannot be recorded: unknown or ambiguous source, or a signer without the right."""


@dataclass(frozen=True)
class Retirement:
    """A recorded SourceRetired."""

    seq: int
    source: str
    key_id: bytes
    reason: str
    signer: bytes


def source_credential(ledger: Ledger, source: str) -> Credential:
    """The one source credential whose subject is ``source``; refuse none or several."""
    found = [c for c in ledger.registry.by_key_id.values() if c.role == "source" and c.subject == source]
    if not found:
        raise RetirementError(f"no source credential named {source!r} is recorded in the ledger")
    if len(found) > 1:
        keys = ", ".join(sorted(c.key_id.hex()[:16] for c in found))
        raise RetirementError(f"{len(found)} source credentials are named {source!r} (keys {keys}); the name is ambiguous")
    return found[0]


def may_retire(signer: Credential, source: Credential) -> bool:
    """The issuer of the source's credential, or a root whose path the source's lies strictly below."""
    return source.issuer == signer.key_id or (signer.role == "root" and is_below(source.path, signer.path))


def retirements(ledger: Ledger, source: str) -> list[tuple[int, dict[str, Any]]]:
    """Every SourceRetired for ``source`` (by name), in ledger order."""
    seqs = set(ledger.by_type("SourceRetired"))
    out = []
    for seq in ledger.by_source(source):
        if seq in seqs:
            body = ledger.observation(seq).body
            if body["source"] == source:
                out.append((seq, body))
    return out


def retire(ledger: Ledger, source: str, key: SigningKey, reason: str, *, time: int | None = None) -> Retirement:
    """Append (and commit) a SourceRetired for ``source`` signed by ``key``.

    Every refusal happens before anything is appended: an unknown or ambiguous source name, a
    signer that is neither the source credential's issuer nor a root above it, an empty reason,
    a source already retired.
    """
    if not isinstance(reason, str) or not reason:
        raise RetirementError("a retirement needs a non-empty reason")
    cred = source_credential(ledger, source)
    try:
        signer = ledger.credential(key.key_id)
    except CredentialError:
        raise RetirementError(f"the signing key {key.key_id.hex()[:16]} has no credential in the ledger") from None
    if not may_retire(signer, cred):
        raise RetirementError(
            f"{signer.role} {signer.subject!r} neither issued {source!r}'s credential nor is the root above it, "
            "so may not retire it"
        )
    earlier = [seq for seq, body in retirements(ledger, source) if body["key_id"] == cred.key_id]
    if earlier:
        raise RetirementError(f"source {source!r} was already retired at seq {earlier[0]}")
    body = {"source": source, "key_id": cred.key_id, "reason": reason}
    try:
        sealed = ledger.append("SourceRetired", body, key, time=time, commit=True)
    except GradledgerError as exc:
        # Window or revocation of the signer: the ledger's own admission refused it, nothing was kept.
        raise RetirementError(f"the ledger refused the retirement of {source!r}: {exc}") from None
    return Retirement(sealed.seq, source, cred.key_id, reason, key.key_id)


# -- the dependency rule -------------------------------------------------------------------


@dataclass
class Dependents:
    """What retiring ``source`` does to a committed dataset (specs/unlearning.md §2)."""

    source: str
    removed: list[int] = field(default_factory=list)  # ascending dataset indices
    relabeled: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> re-aggregated manifest fields

    @property
    def affected(self) -> set[int]:
        return set(self.removed) | set(self.relabeled)

    def labels(self) -> dict[int, int]:
        return {i: fields["label"] for i, fields in sorted(self.relabeled.items())}


def dependents(dataset: CommittedDataset | Sequence[Any], source: str) -> Dependents:
    """Per manifest listing ``source``: removed (no vote remains) or relabeled (re-aggregated)."""
    manifests = dataset.manifests if isinstance(dataset, CommittedDataset) else dataset
    out = Dependents(source)
    for i, m in enumerate(manifests):
        fields = m.manifest if hasattr(m, "manifest") else m
        if not any(src["source"] == source for src in fields["sources"]):
            continue
        new = relabel_without(fields, source)
        if new is None:
            out.removed.append(i)
        else:
            out.relabeled[i] = new
    return out


def removed_artifact(removed: Sequence[int]) -> bytes:
    """Canonical CBOR array of the removed dataset indices, ascending, each once."""
    return encoding.encode(sorted(set(int(i) for i in removed)))


def relabeled_artifact(labels: Mapping[int, int]) -> bytes:
    """Canonical CBOR array of ``[index, new label]`` pairs, ascending by index.

    An array of pairs, not a map: the CBOR profile (specs/encoding.md) allows text map keys only.
    """
    return encoding.encode([[int(i), int(labels[i])] for i in sorted(labels)])


__all__ = [
    "Dependents",
    "Retirement",
    "RetirementError",
    "dependents",
    "may_retire",
    "relabeled_artifact",
    "removed_artifact",
    "retire",
    "retirements",
    "source_credential",
]
