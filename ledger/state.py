"""The ledger's state machine: the one place an observation is admitted.

Both the writer (before it stores an observation) and every checker (when it
re-reads a ledger or a bundle) run the same ``admit``: sequence and chain,
time order, schema, signer authorization, signature, the type's own rules,
and the Merkle append. A ledger is valid iff every record admits in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from . import credentials, envelope, merkle
from .credentials import Credential, CredentialRegistry
from .envelope import Sealed
from .errors import (
    AuthorizationError,
    ChainError,
    CredentialError,
    EncodingError,
    ProofError,
    SchemaError,
    SignatureError,
    VerificationError,
)
from .keys import verify_signature
from .observations import NO_KEYS, IndexKeys, ObservationType, lookup


def origin_of(genesis_record: bytes) -> str:
    """A log's origin string, bound to its first record so two logs never share one."""
    return "gradledger:" + hashlib.sha256(genesis_record).hexdigest()[:32]


@dataclass
class Admitted:
    sealed: Sealed
    signer: Credential
    keys: IndexKeys
    nodes: list[tuple[int, int, bytes]]


class LedgerState:
    """Everything needed to admit the next observation, and nothing more (O(log n) memory)."""

    def __init__(
        self,
        *,
        size: int = 0,
        head: bytes = envelope.GENESIS_PREV,
        last_time: int = 0,
        tree: merkle.CompactRange | None = None,
        registry: CredentialRegistry | None = None,
        origin: str = "",
        indexing: bool = True,
    ) -> None:
        self.size = size
        self.head = head
        self.last_time = last_time
        self.tree = tree or merkle.CompactRange()
        self.registry = registry or CredentialRegistry()
        self.origin = origin
        #: Checkers only verify: they need no index keys.
        self.indexing = indexing

    def copy(self) -> "LedgerState":
        return LedgerState(
            size=self.size,
            head=self.head,
            last_time=self.last_time,
            tree=self.tree.copy(),
            registry=self.registry.copy(),
            origin=self.origin,
            indexing=self.indexing,
        )

    def admit_record(self, record: bytes, seq_hint: int | None = None) -> Admitted:
        """Decode then admit; decoding failures are reported against the record's position."""
        try:
            sealed = envelope.unseal(record)
        except (EncodingError, SchemaError) as exc:
            raise ChainError(f"record does not decode: {exc}", seq=self.size if seq_hint is None else seq_hint) from None
        return self.admit(sealed)

    def admit(self, sealed: Sealed, signed_by: bytes | None = None) -> Admitted:
        """Admit the next observation or raise, naming its sequence number.

        ``signed_by`` is for the writer that has just made the signature with
        this public key: it need not spend a verification on its own signature.
        """
        seq = self.size
        try:
            return self._admit(sealed, seq, signed_by)
        except VerificationError as exc:
            if exc.seq is None:
                exc.seq = seq
            raise
        except SchemaError as exc:
            raise ChainError(f"{sealed.type} body invalid: {exc}", seq=seq) from None

    def _admit(self, sealed: Sealed, seq: int, signed_by: bytes | None) -> Admitted:
        if sealed.seq != seq:
            raise ChainError(f"sequence number {sealed.seq} where {seq} was expected")
        if sealed.prev != self.head:
            raise ChainError("prev does not match the hash of the previous record")
        if sealed.time < self.last_time:
            raise ChainError("time runs backwards")
        kind = lookup(sealed.type)
        kind.schema.validate(sealed.body, sealed.type)
        body = sealed.body
        registry = self.registry

        # A root's own credential is the one record signed by a key the
        # registry cannot know yet: admit it first, then check its signature,
        # and take it back if anything below refuses the record.
        preadded: bytes | None = None
        if sealed.type == "CredentialIssued" and sealed.signer not in registry.by_key_id:
            issued = credentials.parse(body["credential"])
            if issued.self_signed and issued.key_id == sealed.signer:
                preadded = registry.add(body["credential"], sealed.time).key_id
        try:
            return self._admit_checked(sealed, seq, signed_by, kind, preadded)
        except BaseException:
            if preadded is not None:
                del registry.by_key_id[preadded]
            raise

    def _admit_checked(
        self, sealed: Sealed, seq: int, signed_by: bytes | None, kind: ObservationType, preadded: bytes | None
    ) -> Admitted:
        body = sealed.body
        registry = self.registry
        signer = registry.check(sealed.signer, sealed.time, kind.signers, what=f"sign {sealed.type}")
        if signed_by is None:
            try:
                verify_signature(signer.public_key, "envelope", sealed.envelope_bytes, sealed.signature)
            except SignatureError:
                raise SignatureError(f"{sealed.type} signature does not verify") from None
        elif signed_by != signer.public_key:
            raise SignatureError("signing key does not match the signer's credential")

        authorities = [signer.path]
        sources: list[str] = []
        if sealed.type == "CredentialIssued":
            issued = registry.get(preadded) if preadded is not None else registry.add(body["credential"], sealed.time)
            authorities.append(issued.path)
            if issued.role == "source":
                sources.append(issued.subject)
        elif sealed.type == "CredentialRevoked":
            revoked = registry.revoke(body["key_id"], sealed.time, sealed.signer)
            authorities.append(revoked.path)
            if revoked.role == "source":
                sources.append(revoked.subject)
        elif sealed.type == "SourceRetired":
            source = registry.get(body["key_id"])
            if source.role != "source" or source.subject != body["source"]:
                raise CredentialError(f"{body['source']!r} does not name the source credential retired")
            if source.issuer != signer.key_id and not (
                signer.role == "root" and credentials.is_below(source.path, signer.path)
            ):
                raise AuthorizationError(
                    f"{signer.subject!r} neither issued {source.subject!r} nor is the root above it, so may not retire it"
                )
            authorities.append(source.path)
        elif sealed.type == "PolicyAdopted":
            if hashlib.sha256(body["policy"]).digest() != body["digest"]:
                raise ChainError("PolicyAdopted digest is not the SHA-256 of the policy it carries")
        elif sealed.type == "TreeHead":
            if body["size"] != seq or body["root"] != self.tree.root() or body["origin"] != self.origin:
                raise ProofError("tree head does not match the log it is recorded in")

        if self.indexing:
            keys = kind.index(body)
            keys = IndexKeys(
                authorities=tuple(dict.fromkeys(authorities + list(keys.authorities))),
                sources=tuple(dict.fromkeys(sources + list(keys.sources))),
                examples=keys.examples,
            )
        else:
            keys = NO_KEYS
        nodes = self.tree.append(sealed.leaf_hash)
        if seq == 0:
            self.origin = origin_of(sealed.record)
        self.size = seq + 1
        self.head = sealed.record_hash
        self.last_time = sealed.time
        return Admitted(sealed, signer, keys, nodes)
