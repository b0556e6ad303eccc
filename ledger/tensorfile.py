"""Tensor digests (specs/training.md §4) of a released safetensors file, read without torch.

A released model is checked against the checkpoint the ledger recorded by its tensors' digests,
straight from the file's bytes: the header is bounded and parsed as JSON (no code runs), each
tensor's bytes are a slice of a read-only memory map, hashed without a copy.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

from . import encoding
from .errors import UnusableInput
from .files import open_regular

TENSOR_DOMAIN = "gradledger/tensor/v1"
#: safetensors' own limit on the header (100 MB): a larger one is not a safetensors file.
MAX_HEADER_SIZE = 100_000_000
#: safetensors dtype codes -> the torch dtype names the digest rule uses.
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class TensorFileError(UnusableInput):
    """A model file is not a well-formed safetensors file."""


def digest_prefix(dtype: str, shape: list[int], nbytes: int) -> bytes:
    """The canonical CBOR of ["gradledger/tensor/v1", dtype, shape, data] up to the data's bytes."""
    return (b"\x84" + encoding.encode(TENSOR_DOMAIN) + encoding.encode(dtype) + encoding.encode(shape)
            + encoding.bstr_header(nbytes))


def tensor_digests(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Each tensor's digest in the safetensors file at ``path``, by name."""
    path = Path(path)
    fd = open_regular(path, "model file", TensorFileError)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise TensorFileError(f"{path}: too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if header_len > min(MAX_HEADER_SIZE, size - 8):
            raise TensorFileError(f"{path}: safetensors header of {header_len} bytes does not fit the file")
        try:
            header = json.loads(os.pread(fd, header_len, 8))
        except (ValueError, UnicodeDecodeError):
            raise TensorFileError(f"{path}: safetensors header is not JSON") from None
        if not isinstance(header, dict):
            raise TensorFileError(f"{path}: safetensors header is not a map")
        header.pop("__metadata__", None)
        base, data_len = 8 + header_len, size - 8 - header_len
        out: dict[str, bytes] = {}
        view = mmap.mmap(fd, 0, prot=mmap.PROT_READ) if size else None
        try:
            for name, entry in header.items():
                out[name] = _digest(path, name, entry, view, base, data_len)
        finally:
            if view is not None:
                view.close()
        return out
    finally:
        os.close(fd)


def model_files(model: Path) -> list[Path]:
    """The files model-signing signs under ``model`` (its default ignore list), sorted."""
    if model.is_file():
        return [model]
    if not model.is_dir():
        raise TensorFileError(f"{model}: no such model file or directory")
    skip = {".git", ".gitattributes", ".github", ".gitignore"}
    return sorted(p for p in model.rglob("*") if p.is_file() and not skip & set(p.relative_to(model).parts))


def model_tensors(files: list[Path]) -> dict[str, bytes]:
    """Every tensor digest of the model's safetensors files, by tensor name; a name twice is refused."""
    out: dict[str, bytes] = {}
    for path in files:
        if path.suffix != ".safetensors":
            continue
        for name, digest in tensor_digests(path).items():
            if name in out:
                raise TensorFileError(f"tensor {name!r} appears in two model files")
            out[name] = digest
    if not out:
        raise TensorFileError("the model holds no .safetensors file: nothing links it to a recorded checkpoint")
    return out


def recorded_model_tensors(checkpoint_tensors: dict[str, bytes]) -> dict[str, bytes]:
    """A Checkpoint body's ``model.<name>`` digests by ``<name>``: what model files must hold
    (specs/release.md §4.1)."""
    return {k.removeprefix("model."): v for k, v in checkpoint_tensors.items() if k.startswith("model.")}


def differing_names(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """The names only one side has; if none, those whose values differ (sorted)."""
    return sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k] != b[k])


def _digest(path: Path, name: str, entry: object, view: mmap.mmap | None, base: int, data_len: int) -> bytes:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise TensorFileError(f"{path}: tensor {name!r} has no dtype gradledger digests")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
        raise TensorFileError(f"{path}: tensor {name!r} has a malformed shape or offsets")
    begin, end = offsets
    count = 1
    for d in shape:
        count *= d
    if not 0 <= begin <= end <= data_len or end - begin != count * SIZES[entry["dtype"]]:
        raise TensorFileError(f"{path}: tensor {name!r} lies outside the file or has the wrong length")
    h = hashlib.sha256(digest_prefix(DTYPES[entry["dtype"]], shape, end - begin))
    if end > begin and view is not None:
        with memoryview(view)[base + begin : base + end] as data:
            h.update(data)
    return h.digest()
