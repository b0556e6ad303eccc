"""Build the program's state tensors from the raw weight and constant files (specs/replay.md §2.4).

A config entry names a file of raw little-endian bytes and the tensor's dtype, sizes, strides and
offset. The file must hold exactly the bytes its views need (no slack for a hidden payload, no
shortfall for a read past the end); ``use_pickle`` entries and pickle-named files are refused.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch
from torch import Tensor

from .archive import MAX_CONFIG_JSON, MAX_PROGRAM_BYTES, Archive, is_pickle_name
from .errors import ProgramError
from .parse import TensorMeta, tensor_meta


def _config(archive: Archive, name: str) -> dict[str, dict[str, Any]]:
    if not archive.has(name):
        raise ProgramError(f"model program has no {name!r}")
    try:
        doc = json.loads(archive.read(name, MAX_CONFIG_JSON))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ProgramError(f"model program config {name!r} is not JSON: {str(exc)[:120]}") from None
    config = doc.get("config") if type(doc) is dict else None
    if type(config) is not dict or set(doc) != {"config"}:
        raise ProgramError(f"model program config {name!r} is not a payload config")
    for fqn, meta in config.items():
        if type(meta) is not dict:
            raise ProgramError(f"model program config {name!r}: entry {fqn[:60]!r} is not an object")
        path = meta.get("path_name")
        if meta.get("use_pickle") is not False or type(path) is not str or is_pickle_name(path):
            raise ProgramError(f"model program config {name!r}:{fqn[:60]} carries a pickle payload; refused")
        if "/" in path or path in ("", ".", ".."):
            raise ProgramError(f"model program config {name!r}: {path[:60]!r} is not a file name")
    return config


def _extent(meta: TensorMeta) -> int:
    """Bytes a strided view needs from the start of its file (0 for an empty tensor)."""
    if any(not isinstance(s, int) for s in meta.sizes) or meta.offset < 0 or any(s < 0 for s in meta.strides):
        raise ProgramError("model program stores a tensor with a symbolic or negative size, stride or offset")
    sizes: list[int] = [int(s) for s in meta.sizes]
    if any(s == 0 for s in sizes):
        return 0
    last = meta.offset + sum((s - 1) * st for s, st in zip(sizes, meta.strides))
    return (last + 1) * meta.dtype.itemsize


def load_state(archive: Archive, model: str, wanted: Mapping[str, str], *,
               read_weights: bool = True) -> dict[str, tuple[Tensor | None, TensorMeta, bool]]:
    """``wanted``: state name -> ``weights`` or ``constants``. Returns name -> (tensor, meta, is_param).

    With ``read_weights`` false every entry is checked as usual (config, metadata, file sizes) but
    the weight files are not read: their tensors are ``None`` (the caller brings the values, checked
    against ``meta``); constants are read either way.
    """
    configs = {
        "weights": _config(archive, f"data/weights/{model}_weights_config.json"),
        "constants": _config(archive, f"data/constants/{model}_constants_config.json"),
    }
    for kind, config in configs.items():
        extra = set(config) - {n for n, k in wanted.items() if k == kind}
        if extra:
            raise ProgramError(f"model program {kind} config holds {sorted(extra)[0][:60]!r}, which no input names")
    metas: dict[str, tuple[str, TensorMeta, bool]] = {}
    need: dict[str, int] = {}  # file -> bytes its views need
    for name, kind in wanted.items():
        entry = configs[kind].get(name)
        if entry is None:
            raise ProgramError(f"model program has no stored value for {name!r}")
        meta = tensor_meta(entry.get("tensor_meta"), f"stored {name[:60]!r}")
        is_param = entry.get("is_param")
        if type(is_param) is not bool:
            raise ProgramError(f"model program: stored {name[:60]!r} has no is_param flag")
        path = f"data/{kind}/{entry['path_name']}"
        metas[name] = (path, meta, is_param)
        need[path] = max(need.get(path, 0), _extent(meta))
    total = 0
    files: dict[str, Tensor] = {}
    for path, nbytes in need.items():
        if not archive.has(path):
            raise ProgramError(f"model program has no weight file {path!r}")
        if archive.size(path) != nbytes:
            raise ProgramError(f"model program weight file {path!r} holds {archive.size(path)} bytes, its tensors need {nbytes}")
        total += nbytes
        if total > MAX_PROGRAM_BYTES:
            raise ProgramError("model program weights exceed the size limit")
        if not read_weights and path.startswith("data/weights/"):
            continue
        buf = bytearray(nbytes)
        archive.read_into(path, memoryview(buf))
        files[path] = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    out: dict[str, tuple[Tensor | None, TensorMeta, bool]] = {}
    for name, (path, meta, is_param) in metas.items():
        if path not in files:
            out[name] = (None, meta, is_param)
            continue
        flat = files[path]
        sizes = [int(s) for s in meta.sizes]
        if flat.numel() == 0:
            t = torch.zeros(sizes, dtype=meta.dtype)
        else:
            usable = flat[: flat.numel() - flat.numel() % meta.dtype.itemsize]
            t = torch.as_strided(usable.view(meta.dtype), sizes, list(meta.strides), meta.offset)
        out[name] = (t, meta, is_param)
    return out
