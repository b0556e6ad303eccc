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
from dataclasses import dataclass
from typing import Any, Mapping

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


def flatten_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Deterministically named tensors of the model and optimizer state, and which were Python scalars.

    Names: ``model.<state_dict key>``; ``optim.state.<param index>.<key>`` (torch's optimizer
    state_dict indices: parameters numbered in param_groups order); ``optim.group.<g>.<key>``
    for each numeric or bool hyper-parameter of group ``g``. ``None`` values are left out.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            # clone: safetensors refuses shared storage, and the snapshot must not move with training.
            tensors[name] = value.detach().cpu().contiguous().clone()
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
            if key != "params":
                put(f"optim.group.{g}.{key}", value)
    return tensors, scalars


@dataclass(frozen=True)
class CheckpointData:
    step: int
    tensors: dict[str, Tensor]
    digests: dict[str, bytes]
    digest: bytes
    data: bytes  # the safetensors artifact

    def body(self, artifact: bytes) -> dict[str, Any]:
        return {"step": self.step, "digest": self.digest, "tensors": dict(self.digests), "artifact": artifact}


def make_checkpoint(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> CheckpointData:
    tensors, scalars = flatten_state(model, optimizer)
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    data = st_save(tensors, metadata={SCALARS_KEY: json.dumps(scalars, sort_keys=True)})
    return CheckpointData(step, tensors, digests, checkpoint_digest(digests), data)


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
