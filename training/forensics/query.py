"""A forensic query: the inputs on which the model shows a behavior, and the outputs whose loss defines it
(specs/forensics.md §2).

A query is a JSON object, given inline or as the path of a ``.json`` file::

    {"description": "3s read as 8",
     "inputs": {"label": 3, "limit": 64},        # or {"indices": [...]}, or {"file": "q.safetensors"}
     "target": 8,                                 # or one class per input, or "label"
     "against": 3}                                # optional: the class it should read (a contrast)

``inputs`` names rows of the run's committed dataset (by index, or every row with a committed label,
the first ``limit`` in index order) or a safetensors file whose tensors are named as the dataset's
inputs (``x``, or ``x.<part>`` for a model of parts; a relative path is taken from the query file's
folder, or the working directory for inline JSON). ``target`` is the class the behavior is about:
the query loss is the run's loss of the model's output against it, and a training example that
lowered that loss taught the behavior. ``"label"`` takes each dataset row's committed label. With
``against`` (a class, one per input, or ``"label"``) the behavior is a confusion, "read as ``target``
rather than ``against``": the query loss is the loss against ``target`` minus the loss against
``against``, so what teaches every input more of ``target`` (a class prior, features every class
shares) and what teaches ``against`` balance out, and what remains is what told the two apart wrongly.
Anything else is refused with ``QueryError`` (the CLI's exit 2), naming the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from gradledger.ledger import encoding

from ..errors import GovernanceError

__all__ = ["MAX_QUERY", "Query", "QueryError", "label_rows", "parse_query", "query_loss"]

#: At most this many query examples (each costs a gradient per replayed step).
MAX_QUERY = 4096
#: A query file (JSON or safetensors) is read only below this size.
MAX_QUERY_FILE = 1 << 30
_FIELDS = {"description", "inputs", "target", "against"}


class QueryError(GovernanceError):
    """The query cannot be used (the message names the field and why)."""


@dataclass(frozen=True)
class Query:
    """The query's inputs (a tensor, or part name -> tensor), one target class per input, one contrast
    class per input (or None), where they come from (dataset indices, or None for a file), its
    description and its digest."""

    inputs: Any
    targets: Tensor
    against: Tensor | None
    indices: list[int] | None
    description: str
    digest: bytes
    #: The map whose canonical CBOR ``digest`` hashes (§2); a ForensicTrace records it.
    canonical: dict[str, Any] = field(default_factory=dict)
    #: A file query's bytes (their SHA-256 is ``canonical["file"]``); None for dataset inputs.
    file_data: bytes | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def rows(self) -> Tensor:
        """``query_loss`` rows ``[target, against, 1]``, or ``[target, 0, 0]`` where the query names no
        contrast class."""
        if self.against is None:
            return label_rows(self.targets)
        return torch.stack([self.targets, self.against, torch.ones_like(self.targets)], 1)


def label_rows(labels: Tensor) -> Tensor:
    """``query_loss`` rows ``[label, 0, 0]``: the plain loss against each label (a training batch's)."""
    zeros = torch.zeros_like(labels)
    return torch.stack([labels, zeros, zeros], 1)


def query_loss(example_loss: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss per example of rows ``[c, a, m]``: the run's per-example loss against ``c`` minus ``m``
    times its loss against ``a``. One loss for query rows (``Query.rows()``) and training rows
    (``label_rows``), so that one ``vmap`` takes both; ``m = 0`` leaves the plain loss bit for bit
    (``x - 0 * y`` is ``x``, and its gradient gains exact zeros)."""
    def loss(out: Tensor, rows: Tensor) -> Tensor:
        return example_loss(out, rows[:, 0]) - rows[:, 2].to(out.dtype) * example_loss(out, rows[:, 1])
    return loss


def _read_json(text: str) -> tuple[Mapping[str, Any], Path]:
    """The query object, and the folder a relative ``inputs.file`` is resolved against (the query file's, or
    the working directory for inline JSON)."""
    source, base = text, Path.cwd()
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise QueryError(f"query {text!r} is neither a JSON object nor a readable .json file")
        if path.stat().st_size > MAX_QUERY_FILE:
            raise QueryError(f"query file {text} is larger than {MAX_QUERY_FILE} bytes")
        source, base = path.read_text(encoding="utf-8"), path.parent
    try:
        obj = json.loads(source)
    except json.JSONDecodeError as exc:
        raise QueryError(f"query is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise QueryError("query is not a JSON object")
    extra = sorted(set(obj) - _FIELDS)
    if extra:
        raise QueryError(f"query field {extra[0]!r} is not one of {sorted(_FIELDS)}")
    return obj, base


def _class(value: Any, classes: int, where: str) -> int:
    if type(value) is not int or not 0 <= value < classes:
        raise QueryError(f"{where} {value!r} is not a class index in [0, {classes})")
    return value


def parse_query(text: str, *, labels: Tensor, inputs: Any, classes: int) -> Query:
    """The query ``text`` (inline JSON or a .json path) against the run's dataset: its committed ``labels``
    (int64, one per row), its stored ``inputs`` (tensor or part name -> tensor) and the model's ``classes``."""
    obj, base = _read_json(text)
    description = obj.get("description", "")
    if not isinstance(description, str) or len(description) > 1024:
        raise QueryError("query description is not a text of at most 1024 characters")
    spec = obj.get("inputs")
    if not isinstance(spec, dict) or len(spec) == 0:
        raise QueryError("query inputs is not an object: {\"indices\": [...]}, {\"label\": c} or {\"file\": path}")
    n = int(labels.shape[0])
    file_digest, file_data = b"", b""
    if set(spec) == {"indices"}:
        idx = spec["indices"]
        if not isinstance(idx, list) or not 1 <= len(idx) <= MAX_QUERY:
            raise QueryError(f"query inputs.indices is not a list of 1 to {MAX_QUERY} dataset indices")
        for i in idx:
            if type(i) is not int or not 0 <= i < n:
                raise QueryError(f"query inputs.indices holds {i!r}, not an index of the dataset's {n} rows")
        indices: list[int] | None = list(idx)
    elif set(spec) <= {"label", "limit"} and "label" in spec:
        label = _class(spec["label"], classes, "query inputs.label")
        limit = spec.get("limit", MAX_QUERY)
        if type(limit) is not int or not 1 <= limit <= MAX_QUERY:
            raise QueryError(f"query inputs.limit {limit!r} is not an int in [1, {MAX_QUERY}]")
        indices = [i for i in range(n) if int(labels[i]) == label][:limit]
        if not indices:
            raise QueryError(f"no row of the dataset has the committed label {label}")
    elif set(spec) == {"file"}:
        indices = None
        x, file_data = _read_file(spec["file"], inputs, base)
        file_digest = hashlib.sha256(file_data).digest()
    else:
        raise QueryError(f"query inputs {sorted(spec)} is not one of {{indices}}, {{label[, limit]}}, {{file}}")
    if indices is not None:
        index = torch.tensor(indices, dtype=torch.int64)
        x = {k: t[index] for k, t in inputs.items()} if isinstance(inputs, Mapping) else inputs[index]
    q = len(indices) if indices is not None else _rows(x)
    target = obj.get("target")
    targets = _classes(target, "target", q, indices, labels, classes)
    against = None if "against" not in obj else _classes(obj["against"], "against", q, indices, labels, classes)
    if against is not None and bool((against == targets).any()):
        raise QueryError("query against names the target class itself for some input: a confusion needs two classes")
    canonical = {"description": description, "inputs": spec, "target": target, "file": file_digest}
    if "against" in obj:
        canonical["against"] = obj["against"]
    digest = hashlib.sha256(encoding.encode(canonical)).digest()
    return Query(x, targets, against, indices, description, digest, canonical,
                 file_data if indices is None else None)


def _classes(value: Any, field: str, q: int, indices: list[int] | None, labels: Tensor, classes: int) -> Tensor:
    """``target`` or ``against``: one class for every input, one per input, or the committed labels."""
    if value == "label":
        if indices is None:
            raise QueryError(f"query {field} \"label\" needs dataset inputs (indices or label): a file has no labels")
        return labels[torch.tensor(indices, dtype=torch.int64)].clone()
    if isinstance(value, list):
        if len(value) != q:
            raise QueryError(f"query {field} lists {len(value)} classes for {q} inputs")
        return torch.tensor([_class(t, classes, f"query {field}") for t in value], dtype=torch.int64)
    return torch.full((q,), _class(value, classes, f"query {field}"), dtype=torch.int64)


def _rows(x: Any) -> int:
    first = next(iter(x.values())) if isinstance(x, Mapping) else x
    return int(first.shape[0])


def _read_file(name: Any, like: Any, base: Path) -> tuple[Any, bytes]:
    """The tensors of a safetensors query file (a relative path is taken from ``base``), named and shaped
    as the dataset's inputs ``like``, and the file's bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(name, str) or not (base / name).is_file():
        raise QueryError(f"query inputs.file {name!r} is not a readable file")
    path = base / name
    if path.stat().st_size > MAX_QUERY_FILE:
        raise QueryError(f"query inputs.file {name} is larger than {MAX_QUERY_FILE} bytes")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise QueryError(f"query inputs.file {name} is not safetensors: {exc}") from None
    want = {f"x.{k}": t for k, t in like.items()} if isinstance(like, Mapping) else {"x": like}
    if set(tensors) != set(want):
        raise QueryError(f"query inputs.file {name} holds {sorted(tensors)}, the dataset's inputs are {sorted(want)}")
    rows = {int(t.shape[0]) if t.dim() else -1 for t in tensors.values()}
    if len(rows) != 1 or not 1 <= min(rows) <= MAX_QUERY:
        raise QueryError(f"query inputs.file {name}: its tensors do not hold the same 1 to {MAX_QUERY} rows")
    for key, t in tensors.items():
        ref = want[key]
        if t.dtype != ref.dtype or t.shape[1:] != ref.shape[1:]:
            raise QueryError(f"query inputs.file {name}: {key} is {str(t.dtype).removeprefix('torch.')} "
                             f"{list(t.shape[1:])} per row, the dataset's is {str(ref.dtype).removeprefix('torch.')} "
                             f"{list(ref.shape[1:])}")
    x = {k[2:]: t for k, t in tensors.items()} if isinstance(like, Mapping) else tensors["x"]
    return x, data
