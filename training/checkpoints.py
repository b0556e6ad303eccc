"""Checkpoints: model and optimizer state as safetensors, digested tensor by tensor (specs/training.md §4).

Loading never unpickles: the artifact is safetensors (a JSON header and raw little-endian
bytes), and every tensor is re-digested and compared with the Checkpoint observation before it
is used, so a swapped artifact cannot slip into a resumed run.

Writing is split for the trainer: ``LiveCheckpoint`` reads the live state in place on the recorder
thread, digesting and storing it piece by piece, and the next optimizer step waits until it has
been read; ``start_checkpoint`` (for a dtype safetensors' layout table lacks) copies the state into
the artifact's bytes at once and ``PendingCheckpoint.finish`` digests them later.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from gradledger.ledger import encoding

from .errors import GovernanceError

TENSOR_DOMAIN = "gradledger/tensor/v1"
#: safetensors metadata key: which entries were Python scalars (they are restored as such).
SCALARS_KEY = "gradledger.scalars"

if sys.byteorder != "little":  # raw tensor bytes are hashed as stored; the spec fixes little-endian
    raise ImportError("gradledger checkpoints need a little-endian host")


def _raw(t: Tensor) -> Any:
    """A contiguous CPU tensor's bytes, as a buffer over its storage (not copied)."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def tensor_digest(t: Tensor) -> bytes:
    """SHA-256 of canonical CBOR ``["gradledger/tensor/v1", dtype, shape, data]``.

    ``dtype`` is the torch dtype name without ``torch.`` (float32, int64, bool, bfloat16 ...),
    ``shape`` an array of uints, ``data`` the elements in C order, little-endian, no padding.
    """
    t = t.detach().cpu().contiguous()
    return raw_digest(t.dtype, list(t.shape), _raw(t))


def raw_digest(dtype: torch.dtype, shape: list[int], raw: Any) -> bytes:
    """``tensor_digest`` of a tensor given as its dtype, shape and raw bytes (any buffer: not copied)."""
    nbytes = memoryview(raw).nbytes
    h = hashlib.sha256()
    # 0x84: array of 4 items; the items' canonical encodings follow back to back, the data streamed.
    h.update(b"\x84" + encoding.encode(TENSOR_DOMAIN) + encoding.encode(str(dtype).removeprefix("torch."))
             + encoding.encode(shape))
    h.update(encoding.bstr_header(nbytes))
    h.update(raw)
    return h.digest()


def checkpoint_digest(digests: Mapping[str, bytes]) -> bytes:
    """SHA-256 of the canonical CBOR map tensor name -> tensor digest."""
    return hashlib.sha256(encoding.encode(dict(digests))).digest()


def _scalar_tensor(value: Any) -> tuple[Tensor, str] | None:
    if type(value) is bool:
        return torch.tensor(value, dtype=torch.bool), "bool"
    if type(value) is int:
        return torch.tensor(value, dtype=torch.int64), "int"
    if type(value) is float:
        return torch.tensor(value, dtype=torch.float64), "float"
    return None


def flatten_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, copy: bool = True, skip_group_keys: frozenset[str] = frozenset()
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Deterministically named tensors of the model and optimizer state, and which were Python scalars.

    With ``copy=False`` the tensors alias the live state where they can (CPU, contiguous): only
    for serializing at once, before training moves on; tensors sharing storage are still copied.

    Names: ``model.<state_dict key>``; ``optim.state.<param index>.<key>`` (torch's optimizer
    state_dict indices: parameters numbered in param_groups order); ``optim.group.<g>.<key>``
    for each numeric or bool hyper-parameter of group ``g``. ``None`` values are left out.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            # clone: safetensors refuses shared storage, and the snapshot must not move with training.
            t = value.detach().cpu().contiguous()
            tensors[name] = t.clone() if copy else t
            return
        converted = _scalar_tensor(value)
        if converted is not None:
            tensors[name], scalars[name] = converted

    for key, value in model.state_dict().items():
        put(f"model.{key}", value)
    state = optimizer.state_dict()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            put(f"optim.state.{index}.{key}", value)
    for g, group in enumerate(state["param_groups"]):
        for key, value in group.items():
            if key != "params" and key not in skip_group_keys:
                put(f"optim.group.{g}.{key}", value)
    if not copy:
        _unshare(tensors)
    return tensors, scalars


def _unshare(tensors: dict[str, Tensor]) -> None:
    # safetensors refuses tensors that share storage (tied weights): all but the first get a copy.
    seen: set[int] = set()
    for name, t in tensors.items():
        if t.numel() == 0:
            tensors[name] = t.clone()
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[name] = t.clone()
        else:
            seen.add(ptr)


class _StoredTensors(Mapping[str, Tensor]):
    """A checkpoint's tensors, decoded from its safetensors bytes when first read (no second copy
    of the state is held between checkpoints)."""

    def __init__(self, data: bytes | bytearray, names: list[str]) -> None:
        self._data, self._names, self._loaded = data, names, None

    def _tensors(self) -> dict[str, Tensor]:
        if self._loaded is None:
            self._loaded = st_load(bytes(self._data))  # safetensors reads bytes, not a bytearray
        return self._loaded

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


class CheckpointData:
    """One checkpoint: its step, tensor digests, overall digest and safetensors artifact.

    ``data`` may be given as the bytes or as a zero-argument callable that returns them (the
    trainer passes a read from the ledger, so a run does not hold a copy of the state between
    checkpoints). ``tensors`` defaults to decoding ``data`` when first read.
    """

    def __init__(
        self, step: int, tensors: Mapping[str, Tensor] | None, digests: dict[str, bytes], digest: bytes,
        data: bytes | bytearray | Callable[[], bytes],
    ) -> None:
        self.step, self.digests, self.digest = step, digests, digest
        self._data = data
        self._tensors = tensors

    @property
    def data(self) -> bytes | bytearray:
        return self._data() if callable(self._data) else self._data

    @property
    def tensors(self) -> Mapping[str, Tensor]:
        if self._tensors is None:
            return _StoredTensors(self.data, list(self.digests))
        return self._tensors

    def body(self, artifact: bytes) -> dict[str, Any]:
        return {"step": self.step, "digest": self.digest, "tensors": dict(self.digests), "artifact": artifact}


#: safetensors' dtype codes, in the order ``safetensors.torch.save`` lays tensors out (by dtype in this
#: order, then by name): ``serialize`` writes the same bytes (specs/training.md §4 names that function).
_SAFETENSORS_DTYPES: tuple[tuple[torch.dtype, str], ...] = (
    (torch.uint64, "U64"), (torch.int64, "I64"), (torch.float64, "F64"), (torch.complex64, "C64"),
    (torch.float32, "F32"), (torch.uint32, "U32"), (torch.int32, "I32"), (torch.bfloat16, "BF16"),
    (torch.float16, "F16"), (torch.uint16, "U16"), (torch.int16, "I16"), (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.float8_e5m2, "F8_E5M2"), (torch.int8, "I8"), (torch.uint8, "U8"), (torch.bool, "BOOL"),
)
_ST_CODE = {dtype: (rank, code) for rank, (dtype, code) in enumerate(_SAFETENSORS_DTYPES)}


@dataclass
class Entry:
    """Where one tensor lies in serialized bytes: ``data[start:end]``."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    start: int
    end: int


def _layout(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[str], list[tuple[int, int]]] | None:
    """safetensors' file head (length and header, padded), the tensors' order and each one's
    (offset after the head, size); None if a dtype is not one ``_SAFETENSORS_DTYPES`` lays out."""
    if any(t.dtype not in _ST_CODE for t in tensors.values()):
        return None
    names = sorted(tensors, key=lambda n: (_ST_CODE[tensors[n].dtype][0], n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    spans, pos = [], 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_CODE[t.dtype][1], "shape": list(t.shape), "data_offsets": [pos, pos + size]}
        spans.append((pos, size))
        pos += size
    # safetensors' header: compact JSON (serde_json's escaping: UTF-8 kept), space-padded to 8 bytes.
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head, names, spans


def serialize(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[bytearray, list[Entry]] | None:
    """The bytes ``safetensors.torch.save(tensors, metadata)`` writes, built in one buffer, and where
    each tensor lies in it; None if a dtype is not one safetensors lays out as ``_SAFETENSORS_DTYPES``.

    Why not safetensors itself: it copies every tensor twice (to a bytes object, then into the file
    image), so a checkpoint briefly held two extra copies of the state (256 MB for ResNet-18 with
    AdamW) and took ~200 ms to write them; here each tensor is copied once, by torch, into its place.
    """
    layout = _layout(tensors, metadata)
    if layout is None:
        return None
    head, names, spans = layout
    base = len(head)
    data = bytearray(base + sum(size for _, size in spans))
    data[:base] = head
    entries = []
    for name, (start, size) in zip(names, spans):
        t = tensors[name]
        if size:
            into = torch.frombuffer(data, dtype=torch.uint8, count=size, offset=base + start)
            into.copy_(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
        entries.append(Entry(name, t.dtype, list(t.shape), base + start, base + start + size))
    return data, entries


class PendingCheckpoint:
    """A checkpoint whose bytes are written (a copy of the state as it was) and whose digests are not
    yet computed: ``finish()`` computes them, on whatever thread calls it (the run's recorder thread,
    so that hashing and storing the state happen while training goes on)."""

    def __init__(self, step: int, data: bytes | bytearray, entries: list[Entry] | None,
                 digests: dict[str, bytes] | None = None) -> None:
        self.step, self.data, self._entries, self._digests = step, data, entries, digests

    def finish(self) -> CheckpointData:
        digests = self._digests
        if digests is None:
            assert self._entries is not None
            view = memoryview(self.data)
            digests = {e.name: raw_digest(e.dtype, e.shape, view[e.start : e.end]) for e in self._entries}
        return CheckpointData(self.step, None, digests, checkpoint_digest(digests), self.data)


def start_checkpoint(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                     skip_group_keys: frozenset[str] = frozenset()) -> PendingCheckpoint:
    """Serialize the live state (one copy) now; digest it later (``finish``)."""
    tensors, scalars = flatten_state(model, optimizer, copy=False, skip_group_keys=skip_group_keys)
    metadata = {SCALARS_KEY: json.dumps(scalars, sort_keys=True)}
    built = serialize(tensors, metadata)
    if built is not None:
        return PendingCheckpoint(step, *built)
    # A dtype outside the table: safetensors writes it, the digests are taken now from the live tensors.
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    return PendingCheckpoint(step, st_save(tensors, metadata=metadata), None, digests)


def make_checkpoint(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    skip_group_keys: frozenset[str] = frozenset()) -> CheckpointData:
    """The checkpoint of the live state (its tensors read back from the artifact bytes on demand)."""
    return start_checkpoint(step, model, optimizer, skip_group_keys=skip_group_keys).finish()


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise GovernanceError("checkpoint artifact is too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + size])
        return dict(header.get("__metadata__") or {})
    except (ValueError, TypeError) as exc:
        raise GovernanceError(f"checkpoint artifact header is not valid safetensors JSON: {exc}") from None


def read_checkpoint(data: bytes, body: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a checkpoint artifact, each checked against the Checkpoint ``body``."""
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed input
        raise GovernanceError(f"checkpoint artifact is not valid safetensors: {exc}") from None
    expected: Mapping[str, bytes] = body["tensors"]
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise GovernanceError(f"checkpoint artifact tensors differ from the record: missing {missing}, extra {extra}")
    for name, t in tensors.items():
        if tensor_digest(t) != expected[name]:
            raise GovernanceError(f"checkpoint tensor {name!r} does not match its recorded digest")
    if checkpoint_digest(expected) != body["digest"]:
        raise GovernanceError("checkpoint digest does not match its tensor digests")
    scalars = json.loads(_metadata(data).get(SCALARS_KEY, "{}"))
    return tensors, scalars


def restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], scalars: Mapping[str, str]
) -> None:
    """Load flattened state back into ``model`` and ``optimizer`` (the inverse of ``flatten_state``)."""

    def value(name: str) -> Any:
        kind = scalars.get(name)
        t = tensors[name]
        return {"bool": bool, "int": int, "float": float}[kind](t.item()) if kind else t

    model_state = {n.removeprefix("model."): value(n) for n in tensors if n.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise GovernanceError(f"checkpoint does not fit the model: {exc}") from None
    live = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    groups = [dict(g) for g in live["param_groups"]]
    for name in tensors:
        parts = name.split(".", 3)
        if parts[0] != "optim":
            continue
        if parts[1] == "state":
            state.setdefault(int(parts[2]), {})[parts[3]] = value(name)
        elif parts[1] == "group":
            g = int(parts[2])
            if g >= len(groups):
                raise GovernanceError(f"checkpoint has optimizer group {g}, the optimizer has {len(groups)}")
            restored = value(name)
            current = groups[g].get(parts[3])
            # A Python hyper-parameter stays Python: torch branches on the type of some (lr as tensor).
            if isinstance(current, Tensor) and not isinstance(restored, Tensor):
                restored = torch.tensor(restored, dtype=current.dtype)
            groups[g][parts[3]] = restored
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise GovernanceError(f"checkpoint does not fit the optimizer: {exc}") from None


__all__ = [
    "CheckpointData",
    "Entry",
    "PendingCheckpoint",
    "TENSOR_DOMAIN",
    "checkpoint_digest",
    "flatten_state",
    "make_checkpoint",
    "raw_digest",
    "read_checkpoint",
    "restore",
    "serialize",
    "start_checkpoint",
    "tensor_digest",
]


class LiveCheckpoint:
    """A checkpoint read from the live state, in place, while training goes on (specs/training.md §4).

    ``start`` takes references, not copies, to what only ``optimizer.step()`` writes (the model's
    parameters, the optimizer's per-parameter state) and copies the rest now (buffers, which a
    forward may update; the optimizer's group values, which a scheduler may set before the next
    step). ``pieces()`` then yields the artifact's bytes (the very bytes ``serialize`` builds) tensor
    by tensor, digesting each as it goes; ``released`` is set once every tensor has been read (or
    reading was abandoned). The trainer waits for it before the next optimizer step, so the bytes are
    the state at this step, and the run never holds a second copy of its parameters and optimizer
    state (for ResNet-18 with AdamW, 134 MB at every checkpoint).
    """

    def __init__(self, step: int, head: bytes, names: list[str], tensors: dict[str, Tensor]) -> None:
        self.step, self._head, self._names, self._tensors = step, head, names, tensors
        self.digests: dict[str, bytes] = {}
        self.released = threading.Event()

    @classmethod
    def start(cls, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
              skip_group_keys: frozenset[str] = frozenset()) -> "LiveCheckpoint | None":
        """The live checkpoint of this step; None where ``serialize`` does not lay a dtype out (then
        ``start_checkpoint`` copies the state at once)."""
        tensors, scalars = flatten_state(model, optimizer, copy=False, skip_group_keys=skip_group_keys)
        layout = _layout(tensors, {SCALARS_KEY: json.dumps(scalars, sort_keys=True)})
        if layout is None:
            return None
        stepped = {"model." + n for n, _ in model.named_parameters(remove_duplicate=False)}
        live = {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()}
        for name, t in tensors.items():
            # Kept in place: a parameter or a per-parameter optimizer state entry, aliasing the live
            # tensor. Anything else (or a parameter that is not its live storage) is copied now.
            in_place = name.startswith("optim.state.") or (
                name in stepped and t.numel() > 0 and t.untyped_storage().data_ptr() in live)
            if not in_place:
                tensors[name] = t.clone()
        head, names, _ = layout
        return cls(step, head, names, tensors)

    def pieces(self) -> Iterator[Any]:
        """The artifact's bytes in order: the safetensors head, then each tensor's bytes, read in place."""
        try:
            yield self._head
            for name in self._names:
                t = self._tensors[name]
                raw = _raw(t)
                self.digests[name] = raw_digest(t.dtype, list(t.shape), raw)
                yield raw
        finally:
            self.release()

    def release(self) -> None:
        """Stop reading (set ``released``) whether or not ``pieces()`` ran to its end."""
        self._tensors = {}
        self.released.set()

    def finished(self, data: Callable[[], bytes]) -> CheckpointData:
        """The checkpoint once its pieces were all stored (``data`` reads the artifact back)."""
        if len(self.digests) != len(self._names):
            raise GovernanceError(f"checkpoint of step {self.step}: not every tensor was read")
        return CheckpointData(self.step, None, dict(self.digests), checkpoint_digest(self.digests), data)
