"""Checkpoint artifacts: safetensors read without pickle, every digest recomputed (specs/training.md §4)."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Mapping

import torch
from torch import Tensor

from gradledger.ledger import encoding
from gradledger.ledger.errors import VerificationError

TENSOR_DOMAIN = "gradledger/tensor/v1"
SCALARS_KEY = "gradledger.scalars"


class CheckpointError(VerificationError):
    """A checkpoint artifact is missing, malformed or does not match its record."""


def tensor_digest(t: Tensor) -> bytes:
    """SHA-256(CBOR ["gradledger/tensor/v1", dtype, shape, data]), data little-endian C order."""
    t = t.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    h = hashlib.sha256()
    # The canonical CBOR of the 4-item array, with the data streamed rather than copied into it.
    h.update(b"\x84" + encoding.encode(TENSOR_DOMAIN) + encoding.encode(str(t.dtype).removeprefix("torch."))
             + encoding.encode(list(t.shape)) + encoding.bstr_header(memoryview(data).nbytes))
    h.update(data)
    return h.digest()


def checkpoint_digest(digests: Mapping[str, bytes]) -> bytes:
    return hashlib.sha256(encoding.encode(dict(digests))).digest()


def digest_state(tensors: Mapping[str, Tensor]) -> tuple[dict[str, bytes], bytes]:
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    return digests, checkpoint_digest(digests)


def load_checkpoint(data: bytes | None, body: Mapping[str, Any], seq: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The checked tensors of the Checkpoint at ``seq`` and which were Python scalars."""
    from safetensors.torch import load

    if data is None:
        raise CheckpointError(f"checkpoint artifact {body['artifact'].hex()[:16]} is not in the bundle", seq=seq)
    try:
        tensors = load(data)
        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        scalars = json.loads(meta.get(SCALARS_KEY, "{}"))
    except Exception as exc:  # safetensors and json raise their own kinds for malformed input
        raise CheckpointError(f"checkpoint artifact is not valid safetensors: {exc}", seq=seq) from None
    if not isinstance(scalars, dict) or any(v not in ("bool", "int", "float") for v in scalars.values()):
        raise CheckpointError("checkpoint scalar metadata is malformed", seq=seq)
    expected = body["tensors"]
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"checkpoint tensors differ from the record: missing {sorted(set(expected) - set(tensors))[:5]}, "
            f"extra {sorted(set(tensors) - set(expected))[:5]}",
            seq=seq,
        )
    try:
        digests, digest = digest_state(tensors)
    except Exception as exc:  # a dtype or layout the digest rule cannot read is a failure, never a crash
        raise CheckpointError(f"checkpoint tensors cannot be digested: {exc}", seq=seq) from None
    bad = [n for n in digests if digests[n] != expected[n]]
    if bad:
        raise CheckpointError(f"checkpoint tensor {bad[0]!r} does not match its recorded digest", seq=seq)
    if digest != body["digest"]:
        raise CheckpointError("checkpoint digest does not match its tensor digests", seq=seq)
    return tensors, scalars
