"""Canonical CBOR: RFC 8949 section 4.2.1 core deterministic encoding, strictly decoded.

Every signed or hashed object in gradledger is these bytes, so the decoder is the
first line of defence against hostile input: it accepts exactly the byte strings
that ``encode`` would have produced for a value of the permitted data model.

Permitted data model (specs/encoding.md): unsigned and negative integers that fit
in 64 bits, byte strings, text strings, arrays, maps with text keys,
``true``/``false``/``null`` and floats. No tags, no other simple values.

Map keys are text strings. Records reach ``encode`` only after their schema
(``schema.py``, ``observations.py``) has checked field types, so ``encode`` itself does not walk the
value; ``decode`` walks it unless the caller validates a schema right after.
"""

from __future__ import annotations

from typing import Any

import cbor2

from .errors import EncodingError

#: Hard ceiling for one encoded object. Envelopes are a few KiB; artifacts
#: (checkpoints, model programs) are stored as raw bytes, never as CBOR items.
MAX_ENCODED_SIZE = 64 * 1024 * 1024
#: RFC 8949 section 5.2: a generic decoder must bound nesting; ours is shallow.
MAX_DEPTH = 32

_U64 = 1 << 64
_SCALARS = (str, bytes, bool, type(None), float)


def encode(value: Any, *, check: bool = False) -> bytes:
    """Encode ``value`` with RFC 8949 core deterministic encoding.

    Map keys sort bytewise by their encoded form (section 4.2.1), integers and
    lengths take their shortest form, floats their shortest exact width
    (section 4.2.2 preferred serialization), and no indefinite lengths appear.
    """
    if check:
        _check_model(value, 0)
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, UnicodeEncodeError, TypeError, ValueError, OverflowError) as exc:
        raise EncodingError(f"cannot encode: {exc}") from None


def bstr_header(length: int) -> bytes:
    """The shortest (canonical) header of a byte string of ``length`` bytes (RFC 8949 §3.1, §4.2.1)."""
    if length < 24:
        return bytes((0x40 | length,))
    for code, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes((0x40 | code,)) + length.to_bytes(size, "big")
    raise EncodingError("byte string too long")


def _reject_tag(decoder: Any, tag: Any = None) -> Any:
    # Tags would let a hostile input smuggle in semantics (dates, bignums,
    # shared references) that the schema does not describe.
    raise EncodingError("CBOR tags are not allowed")


# cbor2 decodes the tags it knows (dates, bignums, sets, shared references...)
# itself and only hands unknown ones to tag_hook, so every known tag number is
# overridden too.
_KNOWN_TAGS = (*range(0, 64), 256, 258, 260, 261, 262, 263, 1004, 1040, 55799, 55800, 55801)
_NO_SEMANTICS = {tag: _reject_tag for tag in _KNOWN_TAGS}


def decode(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_ENCODED_SIZE, check_model: bool = True
) -> Any:
    """Decode canonical CBOR, rejecting anything ``encode`` would not have produced.

    Raises ``EncodingError`` for truncated input, trailing bytes, indefinite
    lengths, duplicate or unsorted map keys, non-minimal integers or lengths,
    wider-than-needed floats, any tag, and input or nesting beyond the bounds.
    """
    data = bytes(data)
    if len(data) > max_size:
        raise EncodingError(f"encoded object is {len(data)} bytes, limit is {max_size}")
    if not data:
        raise EncodingError("empty input is not a CBOR item")
    try:
        value = cbor2.loads(
            data,
            tag_hook=_reject_tag,
            semantic_decoders=_NO_SEMANTICS,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=MAX_DEPTH,
            strict_hashable_types=True,
        )
    except EncodingError:
        raise
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise EncodingError(f"not valid CBOR: {exc}") from None
    if check_model:
        _check_model(value, 0)
    # Re-encoding is the exact definition of canonical: it catches trailing
    # bytes, non-shortest integers/lengths/floats and unsorted keys at once.
    if cbor2.dumps(value, canonical=True) != data:
        raise EncodingError("CBOR is not in core deterministic encoding (or has trailing bytes)")
    return value


def _check_model(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise EncodingError(f"nesting deeper than {MAX_DEPTH}")
    kind = type(value)
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise EncodingError("text is not valid Unicode (lone surrogate)") from None
        return
    if kind in _SCALARS:
        return
    if kind is int:
        # Reached only from encode(check=True): decoded integers always fit.
        if not -_U64 <= value < _U64:
            raise EncodingError("integer outside the 64-bit CBOR range")
        return
    if kind is list:
        for item in value:
            _check_model(item, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise EncodingError(f"map key of type {type(key).__name__} is not allowed")
            _check_model(key, depth + 1)
            _check_model(item, depth + 1)
        return
    raise EncodingError(f"value of type {kind.__name__} is not in the data model")
