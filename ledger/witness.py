"""Witness cosignatures of signed tree heads.

A witness that has checked a tree head (typically: that it is consistent with
the last head it cosigned) signs the head's body. Cosignatures live beside the
log, not in it: adding one does not change the tree it vouches for.
"""

from __future__ import annotations

from . import encoding
from .credentials import CredentialRegistry
from .envelope import Sealed
from .errors import CredentialError, ProofError, SignatureError
from .keys import SigningKey, verify_signature


def head_message(head: Sealed) -> bytes:
    if head.type != "TreeHead":
        raise ProofError(f"observation {head.seq} is a {head.type}, not a TreeHead")
    return encoding.encode(head.body)


def cosign(head: Sealed, witness: SigningKey) -> bytes:
    return witness.sign("cosignature", head_message(head))


def verify_cosignature(head: Sealed, witness_key_id: bytes, signature: bytes, registry: CredentialRegistry) -> None:
    """Raise unless a credentialed witness, valid at the head's time, signed this head."""
    cred = registry.check(witness_key_id, head.time, ("witness",), what="cosign tree heads")
    try:
        verify_signature(cred.public_key, "cosignature", head_message(head), signature)
    except SignatureError:
        raise SignatureError(f"cosignature by {cred.subject!r} on the tree head at {head.seq} is forged", seq=head.seq) from None
    if cred.role != "witness":  # pragma: no cover - check() enforces the role
        raise CredentialError("not a witness")
