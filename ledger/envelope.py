"""Envelopes: the signed, hash-chained unit of the ledger.

An envelope is the canonical CBOR map ``{v, type, seq, prev, time, body, signer}``;
the ledger stores and Merkle-logs the *record* ``[envelope_bytes, signature]``.
Keeping the envelope as an opaque byte string inside the record means the
signature is checked over exactly the stored bytes, with no re-encoding
(specs/envelope.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from . import encoding, merkle, schema
from .errors import EncodingError, SchemaError
from .keys import SIGNATURE_SIZE, SigningKey

ENVELOPE_VERSION = 1
GENESIS_PREV = bytes(32)
#: An envelope larger than this is refused before decoding (bodies carry
#: digests of artifacts, never the artifacts themselves).
MAX_ENVELOPE_SIZE = 4 * 1024 * 1024
MAX_RECORD_SIZE = MAX_ENVELOPE_SIZE + 128

ENVELOPE_SCHEMA = schema.record(
    "envelope",
    v=schema.one_of(ENVELOPE_VERSION),
    type=schema.nonempty_text,
    seq=schema.uint,
    prev=schema.digest,
    time=schema.uint,
    body=lambda value, where: None if type(value) is dict else schema._fail(where, "map", value),
    signer=schema.digest,
)


@dataclass(frozen=True, slots=True)
class Sealed:
    """One recorded observation: its decoded envelope and the exact stored bytes."""

    type: str
    seq: int
    prev: bytes
    time: int
    body: dict[str, Any]
    signer: bytes
    envelope_bytes: bytes
    signature: bytes
    record: bytes

    @property
    def record_hash(self) -> bytes:
        """What the next envelope's ``prev`` must equal."""
        return hashlib.sha256(self.record).digest()

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.record)


def seal(
    type_name: str, seq: int, prev: bytes, time: int, body: dict[str, Any], key: SigningKey
) -> Sealed:
    """Build, encode and sign an envelope. ``body`` must already be schema-valid."""
    envelope = {
        "v": ENVELOPE_VERSION,
        "type": type_name,
        "seq": seq,
        "prev": prev,
        "time": time,
        "body": body,
        "signer": key.key_id,
    }
    envelope_bytes = encoding.encode(envelope)
    if len(envelope_bytes) > MAX_ENVELOPE_SIZE:
        raise SchemaError(f"{type_name} envelope is {len(envelope_bytes)} bytes, limit {MAX_ENVELOPE_SIZE}")
    signature = key.sign("envelope", envelope_bytes)
    record = encoding.encode([envelope_bytes, signature])
    return Sealed(type_name, seq, prev, time, body, key.key_id, envelope_bytes, signature, record)


_SIGNATURE_HEADER = b"\x58\x40"  # byte string of 64 bytes, shortest form


def _split_record(record: bytes) -> tuple[bytes, bytes]:
    """Parse ``[bstr envelope, bstr .size 64 signature]`` by its fixed canonical shape.

    The record's outer layer has exactly one canonical form per envelope
    length, so it is checked byte for byte instead of decoded and re-encoded.
    """
    if len(record) > MAX_RECORD_SIZE or len(record) < 4 + SIGNATURE_SIZE or record[0] != 0x82:
        raise EncodingError("record is not [envelope bytes, 64-byte signature]")
    initial = record[1]
    extra = {0x58: 1, 0x59: 2, 0x5A: 4, 0x5B: 8}.get(initial, 0)
    if extra:
        length = int.from_bytes(record[2 : 2 + extra], "big")
    elif 0x40 <= initial <= 0x57:
        length = initial & 0x1F
    else:
        raise EncodingError("record does not start with the envelope byte string")
    start = 2 + extra
    end = start + length
    if (
        record[1:start] != encoding.bstr_header(length)
        or len(record) != end + 2 + SIGNATURE_SIZE
        or record[end : end + 2] != _SIGNATURE_HEADER
    ):
        raise EncodingError("record is not [envelope bytes, 64-byte signature] in canonical CBOR")
    return record[start:end], record[end + 2 :]


def unseal(record: bytes) -> Sealed:
    """Strictly decode a stored record. The signature is *not* checked here.

    Raises ``EncodingError`` or ``SchemaError``; the body is left for the type's
    schema, which the caller applies.
    """
    envelope_bytes, signature = _split_record(record)
    # The body's data model is enforced by its type schema right after.
    envelope = encoding.decode(envelope_bytes, max_size=MAX_ENVELOPE_SIZE, check_model=False)
    ENVELOPE_SCHEMA.validate(envelope)
    return Sealed(
        envelope["type"],
        envelope["seq"],
        envelope["prev"],
        envelope["time"],
        envelope["body"],
        envelope["signer"],
        envelope_bytes,
        signature,
        record,
    )
