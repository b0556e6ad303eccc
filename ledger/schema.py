"""A small, strict schema language for decoded CBOR records.

Each record type in specs/ has a CDDL definition; the ``Schema`` objects here
are its executable twin. Unknown fields are errors: a verifier that skipped
fields it did not understand would sign off on content nobody checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import SchemaError

Check = Callable[[Any, str], None]

#: Authority taxonomy paths: lowercase segments joined by '/'. The segment
#: alphabet excludes NUL and '/' so index keys can use them as separators.
PATH_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,62}(/[a-z0-9][a-z0-9_.\-]{0,62}){0,15}$")
#: Paths and names become LMDB index keys (name || 0x00 || seq, at most 511
#: bytes), so both are bounded well below that.
MAX_PATH = 255
MAX_NAME = 255
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
MAX_TEXT = 4096
MAX_ITEMS = 1 << 20
U64_MAX = (1 << 64) - 1


def _fail(where: str, expected: str, value: Any) -> None:
    raise SchemaError(f"{where}: expected {expected}, got {type(value).__name__}")


def uint(value: Any, where: str) -> None:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        _fail(where, "unsigned integer", value)


def integer(value: Any, where: str) -> None:
    # The CBOR data model stops at 64 bits; a larger int would encode as a tag.
    if type(value) is not int or not -(1 << 64) <= value <= U64_MAX:
        _fail(where, "64-bit integer", value)


def boolean(value: Any, where: str) -> None:
    if type(value) is not bool:
        _fail(where, "bool", value)


def number(value: Any, where: str) -> None:
    """A finite float or integer: NaN would make recorded norms incomparable."""
    if type(value) is int:
        if not -(1 << 64) <= value <= U64_MAX:
            _fail(where, "64-bit integer", value)
        return
    if type(value) is not float or not math.isfinite(value):
        _fail(where, "finite number", value)


def text(value: Any, where: str) -> None:
    if type(value) is not str or len(value) > MAX_TEXT:
        _fail(where, f"text of at most {MAX_TEXT} characters", value)


def nonempty_text(value: Any, where: str) -> None:
    text(value, where)
    if not value:
        raise SchemaError(f"{where}: must not be empty")


def name(value: Any, where: str) -> None:
    """A subject or source name: 1..255 UTF-8 bytes, no control characters."""
    if type(value) is not str or not value or len(value.encode("utf-8", "replace")) > MAX_NAME:
        _fail(where, f"name of 1..{MAX_NAME} bytes", value)
    if _NAME_FORBIDDEN.search(value):
        raise SchemaError(f"{where}: names may not contain control characters")


def path(value: Any, where: str) -> None:
    if type(value) is not str or len(value) > MAX_PATH or not PATH_RE.match(value):
        raise SchemaError(f"{where}: not an authority path like 'acme/radiology': {value!r}")


def bstr(size: int | None = None, max_size: int = 1 << 26) -> Check:
    def check(value: Any, where: str) -> None:
        if type(value) is not bytes:
            _fail(where, "byte string", value)
        if size is not None and len(value) != size:
            raise SchemaError(f"{where}: expected {size} bytes, got {len(value)}")
        if len(value) > max_size:
            raise SchemaError(f"{where}: more than {max_size} bytes")

    return check


digest = bstr(32)


def one_of(*choices: Any) -> Check:
    allowed = frozenset(choices)

    def check(value: Any, where: str) -> None:
        if type(value) not in (str, int) or value not in allowed:
            raise SchemaError(f"{where}: expected one of {sorted(map(str, allowed))}, got {value!r}")

    return check


def array(item: Check, max_items: int = MAX_ITEMS, min_items: int = 0) -> Check:
    def check(value: Any, where: str) -> None:
        if type(value) is not list:
            _fail(where, "array", value)
        if not min_items <= len(value) <= max_items:
            raise SchemaError(f"{where}: expected {min_items}..{max_items} items, got {len(value)}")
        for i, element in enumerate(value):
            item(element, f"{where}[{i}]")

    return check


def uint_array(max_items: int = MAX_ITEMS) -> Check:
    """A fast path for long index lists (batch indices)."""

    def check(value: Any, where: str) -> None:
        if type(value) is not list or len(value) > max_items:
            _fail(where, f"array of at most {max_items} unsigned integers", value)
        for element in value:
            if type(element) is not int or not 0 <= element <= U64_MAX:
                raise SchemaError(f"{where}: expected unsigned 64-bit integers")

    return check


def number_array(max_items: int = MAX_ITEMS) -> Check:
    """Finite numbers (per-band norms): a fast path, checked on every update."""

    def check(value: Any, where: str) -> None:
        if type(value) is not list or len(value) > max_items:
            _fail(where, f"array of at most {max_items} numbers", value)
        for element in value:
            kind = type(element)
            # x - x is 0.0 exactly for finite floats, NaN for NaN and inf.
            if kind is float:
                if element - element != 0.0:
                    raise SchemaError(f"{where}: expected finite numbers")
            elif kind is not int or not -(1 << 64) <= element <= U64_MAX:
                raise SchemaError(f"{where}: expected finite numbers")

    return check


def text_map(item: Check, max_items: int = 4096, key: Check = text) -> Check:
    """A map from text keys to ``item`` values (open key set, checked keys and values)."""

    def check(value: Any, where: str) -> None:
        if type(value) is not dict or len(value) > max_items:
            _fail(where, f"map of at most {max_items} entries", value)
        for k, element in value.items():
            key(k, f"{where} key")
            item(element, f"{where}.{k}")

    return check


def optional(check: Check) -> Check:
    def wrapped(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return wrapped


@dataclass(frozen=True)
class Field:
    name: str
    check: Check
    required: bool = True


class Schema:
    """A closed record: named fields, each with a check; no extra fields."""

    def __init__(self, name: str, fields: Iterable[Field]) -> None:
        self.name = name
        self.fields = {f.name: f for f in fields}
        self.required = frozenset(f.name for f in self.fields.values() if f.required)

    def __call__(self, value: Any, where: str) -> None:
        self.validate(value, where)

    def validate(self, value: Any, where: str | None = None) -> None:
        where = where or self.name
        if type(value) is not dict:
            _fail(where, f"{self.name} map", value)
        if not self.required <= value.keys():
            missing = self.required - value.keys()
            raise SchemaError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        fields = self.fields
        for key, element in value.items():
            spec = fields.get(key)
            if spec is None:
                raise SchemaError(f"{where}: unknown field {key!r}")
            spec.check(element, where + "." + key)


def record(record_name: str, /, **fields: Check | tuple[Check, bool]) -> Schema:
    """``record("X", a=uint, b=(text, False))``: a tuple marks an optional field."""
    built = []
    for key, spec in fields.items():
        check, required = spec if isinstance(spec, tuple) else (spec, True)
        built.append(Field(key, check, required))
    return Schema(record_name, built)
