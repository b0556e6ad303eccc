"""Checkpoints: model and optimizer state as safetensors, digested tensor by tensor (specs/training.md §4).

Loading never unpickles: the artifact is safetensors (a JSON header and raw little-endian
bytes), and every tensor is re-digested and compared with the Checkpoint observation before it
is used, so a swapped artifact cannot slip into a resumed run.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
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


def tensor_digest(t: Tensor) -> bytes:
    """SHA-256 of canonical CBOR ``["gradledger/tensor/v1", dtype, shape, data]``.

    ``dtype`` is the torch dtype name without ``torch.`` (float32, int64, bool, bfloat16 ...),
    ``shape`` an array of uints, ``data`` the elements in C order, little-endian, no padding.
    """
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    nbytes = memoryview(raw).nbytes
    h = hashlib.sha256()
    # 0x84: array of 4 items; the items' canonical encodings follow back to back, the data streamed.
    h.update(b"\x84" + encoding.encode(TENSOR_DOMAIN) + encoding.encode(str(t.dtype).removeprefix("torch."))
             + encoding.encode(list(t.shape)))
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

    def __init__(self, data: bytes, names: list[str]) -> None:
        self._data, self._names, self._loaded = data, names, None

    def _tensors(self) -> dict[str, Tensor]:
        if self._loaded is None:
            self._loaded = st_load(self._data)
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
        data: bytes | Callable[[], bytes],
    ) -> None:
        self.step, self.digests, self.digest = step, digests, digest
        self._data = data
        self._tensors = tensors

    @property
    def data(self) -> bytes:
        return self._data() if callable(self._data) else self._data

    @property
    def tensors(self) -> Mapping[str, Tensor]:
        if self._tensors is None:
            return _StoredTensors(self.data, list(self.digests))
        return self._tensors

    def body(self, artifact: bytes) -> dict[str, Any]:
        return {"step": self.step, "digest": self.digest, "tensors": dict(self.digests), "artifact": artifact}


def make_checkpoint(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    skip_group_keys: frozenset[str] = frozenset()) -> CheckpointData:
    # The live state is digested and serialized in place (no snapshot copy); the checkpoint's
    # tensors are then read back from the artifact bytes on demand.
    tensors, scalars = flatten_state(model, optimizer, copy=False, skip_group_keys=skip_group_keys)
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    data = st_save(tensors, metadata={SCALARS_KEY: json.dumps(scalars, sort_keys=True)})
    del tensors
    return CheckpointData(step, None, digests, checkpoint_digest(digests), data)


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
    "TENSOR_DOMAIN",
    "checkpoint_digest",
    "flatten_state",
    "make_checkpoint",
    "read_checkpoint",
    "restore",
    "tensor_digest",
]
