"""What every importer turns a platform's export into: one ``LabelRecord`` per example, its votes
by named annotators (or models), its review state and the model pre-label it started from
(specs/labels.md §2). The platforms' own field names stop at the parsers; signing starts here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import DatasetError

#: An export larger than this is refused before it is read (specs/labels.md §1).
MAX_EXPORT = 256 << 20
#: Records (tasks, data rows, lines) in one export; votes in one record.
MAX_RECORDS = 1 << 20
MAX_VOTES = 4096


class LabelImportError(DatasetError):
    """A malformed export, naming the record and the field (the command line's exit 2)."""


@dataclass(frozen=True)
class Prelabel:
    """A model pre-label as the platform names its model: ``model`` (a free model version), and the
    ledger ``run`` and ``checkpoint`` digest when the version is a gradledger reference."""

    model: str
    run: str | None = None
    checkpoint: bytes | None = None


@dataclass(frozen=True)
class Vote:
    """One annotator's (or model's) answer: a class name or index, and its confidence when the
    platform gives one (None: the authority's default)."""

    source: str
    label: str | int
    confidence: float | None = None
    model: bool = False


@dataclass
class LabelRecord:
    """One example's labels. ``key`` names the example in the platform (data row key, task id);
    ``where`` is how error messages name the record (``task 17``, ``line 3``)."""

    key: str
    where: str
    votes: list[Vote] = field(default_factory=list)
    review: str = "accepted"
    prelabel: Prelabel | None = None


#: A model version naming the gradledger run and checkpoint that produced a pre-label.
PRELABEL_PREFIX = "gradledger:"


def prelabel_of(model_version: str, where: str) -> Prelabel:
    """``gradledger:<run>@<checkpoint hex>`` names a ledger run and checkpoint; any other version is a
    model outside the ledger, kept by name only."""
    if not model_version.startswith(PRELABEL_PREFIX):
        return Prelabel(model_version)
    run, sep, digest = model_version[len(PRELABEL_PREFIX):].rpartition("@")
    try:
        checkpoint = bytes.fromhex(digest)
    except ValueError:
        checkpoint = b""
    if not sep or not 1 <= len(run) <= 255 or len(checkpoint) != 32:
        raise LabelImportError(f"{where}: model_version {model_version[:80]!r} is not "
                               f"{PRELABEL_PREFIX}<run>@<64 hex digits of a checkpoint digest>")
    return Prelabel(model_version, run, checkpoint)


# -- reading the platforms' JSON, bounded and named -------------------------------------------------


def load_json(data: bytes, what: str) -> Any:
    if len(data) > MAX_EXPORT:
        raise LabelImportError(f"{what}: {len(data)} bytes, more than the {MAX_EXPORT} an export may have")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise LabelImportError(f"{what}: not JSON ({exc})") from None


def ndjson_lines(data: bytes, what: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-empty line."""
    if len(data) > MAX_EXPORT:
        raise LabelImportError(f"{what}: {len(data)} bytes, more than the {MAX_EXPORT} an export may have")
    for n, line in enumerate(data.splitlines(), 1):
        if n > MAX_RECORDS:
            raise LabelImportError(f"{what}: more than {MAX_RECORDS} lines")
        if line.strip():
            try:
                yield n, json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise LabelImportError(f"{what} line {n}: not JSON ({exc})") from None


def field_of(obj: Any, name: str, where: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    """``obj[name]`` checked to be a ``kind``; a missing optional field is None."""
    if not isinstance(obj, dict):
        raise LabelImportError(f"{where}: expected an object")
    if name not in obj or obj[name] is None:
        if required:
            raise LabelImportError(f"{where}: field {name!r} is missing")
        return None
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise LabelImportError(f"{where}: field {name!r} is not a {' or '.join(k.__name__ for k in kinds)}")
    return value


def unit(value: Any, where: str, name: str) -> float:
    """A confidence or score in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise LabelImportError(f"{where}: field {name!r} is not a number in [0, 1]")
    return float(value) + 0.0


def records_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise LabelImportError(f"{what}: expected a JSON array of records")
    if len(value) > MAX_RECORDS:
        raise LabelImportError(f"{what}: more than {MAX_RECORDS} records")
    return value
