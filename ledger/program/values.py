"""Decode the typed values of a program's model JSON: tensor metadata, node arguments (specs/replay.md §2.2).

Each decoder accepts exactly the JSON shape the ``torch.export`` schema gives a field and raises
``ProgramError`` for anything else; nothing is evaluated. A symbolic size of a user input is read
only in torch's plain ``Symbol('s0', ...)`` form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .errors import ProgramError
from .graph import Ref

MAX_RANK = 16
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
#: The only symbolic-size form read: torch's plain symbol, never handed to sympy.
_SYMBOL = re.compile(r"Symbol\('([a-z][a-z0-9_]{0,63})'(?:, (?:positive|integer|nonnegative|real)=True)*\)|([a-z][a-z0-9_]{0,63})")

#: torch._export.serde.schema.ScalarType values (tests/test_program_loader.py pins them to torch's).
DTYPES: Mapping[int, torch.dtype] = MappingProxyType({
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
    7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16,
})
LAYOUTS: Mapping[int, torch.layout] = MappingProxyType({7: torch.strided})
MEMORY_FORMATS: Mapping[int, torch.memory_format] = MappingProxyType({
    1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d, 4: torch.preserve_format,
})
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class TensorMeta:
    """What the archive says of a tensor: dtype, sizes (an int, or a symbol's name), strides, offset."""

    dtype: torch.dtype
    sizes: tuple[int | str, ...]
    strides: tuple[int, ...]
    offset: int
    requires_grad: bool


def fail(what: str) -> ProgramError:
    return ProgramError(f"model program: {what}")


def as_dict(v: Any, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise fail(f"{what} is not an object")
    return v


def as_list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise fail(f"{what} is not a list")
    return v


def as_int(v: Any, what: str) -> int:
    if type(v) is not int:
        raise fail(f"{what} is not an integer")
    return v


def as_str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise fail(f"{what} is not a string")
    return v


def union(v: Any, what: str) -> tuple[str, Any]:
    """A serialized union: an object with exactly one key."""
    d = as_dict(v, what)
    if len(d) != 1:
        raise fail(f"{what} is not a one-field union")
    return next(iter(d.items()))


def plain_name(v: Any, what: str) -> str:
    s = as_str(v, what)
    if not _NAME.fullmatch(s):
        raise fail(f"{what} {s[:40]!r} is not a plain name")
    return s


def as_float(v: Any, what: str) -> float:
    # json writes non-finite floats as these strings; no other string is a float.
    if type(v) is str and v in ("Infinity", "-Infinity", "NaN"):
        return {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}[v]
    if type(v) is float or type(v) is int:
        return float(v)
    raise fail(f"{what} is not a float")


def _sym_size(v: Any, what: str) -> int | str:
    kind, val = union(v, what)
    if kind == "as_int":
        return as_int(val, what)
    if kind == "as_expr":
        expr = as_str(as_dict(val, what).get("expr_str"), what)
        m = _SYMBOL.fullmatch(expr)
        if m is None:
            raise fail(f"{what}: only a plain symbol is accepted as a symbolic size")
        return m.group(1) or m.group(2)
    raise fail(f"{what} is not a size")


def tensor_meta(v: Any, what: str) -> TensorMeta:
    d = as_dict(v, what)
    # The type first: a bundle's list or dict here is unhashable, and must refuse, not raise TypeError.
    code, layout = d.get("dtype"), d.get("layout")
    dtype = DTYPES.get(code) if type(code) is int else None
    if dtype is None:
        raise fail(f"{what} has a dtype outside the allowed ones")
    if type(layout) is not int or LAYOUTS.get(layout) is None:
        raise fail(f"{what} is not a strided tensor")
    dev = as_dict(d.get("device"), f"{what} device")
    if dev.get("type") != "cpu" or dev.get("index") not in (None, 0):
        raise fail(f"{what} is not on the CPU")
    sizes = tuple(_sym_size(s, f"{what} size") for s in as_list(d.get("sizes"), f"{what} sizes"))
    strides_raw = as_list(d.get("strides"), f"{what} strides")
    if len(sizes) > MAX_RANK or len(strides_raw) != len(sizes):
        raise fail(f"{what} has a bad rank")
    strides = tuple(s if isinstance(s, int) else -1 for s in (_sym_size(x, f"{what} stride") for x in strides_raw))
    offset = _sym_size(d.get("storage_offset"), f"{what} offset")
    rg = d.get("requires_grad")
    if type(rg) is not bool:
        raise fail(f"{what} requires_grad is not a bool")
    if any(isinstance(s, int) and s < 0 for s in sizes):
        raise fail(f"{what} has a negative size")
    return TensorMeta(dtype, sizes, strides, offset if isinstance(offset, int) else -1, rg)


# -- node arguments ---------------------------------------------------------------------------------


def sym_int_arg(v: Any, what: str) -> int | Ref:
    kind, val = union(v, what)
    if kind == "as_name":
        return Ref(plain_name(val, what))
    if kind == "as_int":
        return as_int(val, what)
    raise fail(f"{what} is not a symbolic int")


def tensor_ref(v: Any, what: str) -> Ref:
    return Ref(plain_name(as_dict(v, what).get("name"), what))


def _optional_tensor(v: Any, what: str) -> Ref | None:
    kind, val = union(v, what)
    if kind == "as_tensor":
        return tensor_ref(val, what)
    if kind == "as_none" and val is True:
        return None
    raise fail(f"{what} is not an optional tensor")


def _device(v: Any, what: str) -> torch.device:
    d = as_dict(v, what)
    if set(d) - {"type", "index"} or d.get("type") != "cpu" or d.get("index") not in (None, 0):
        raise fail(f"{what}: only the CPU device is allowed")
    return _CPU


def _enum(table: Mapping[int, Any], v: Any, what: str) -> Any:
    if type(v) is not int or v not in table:
        raise fail(f"{what} is not an allowed value")
    return table[v]


def argument(v: Any, what: str) -> Any:
    kind, val = union(v, what)
    if kind == "as_none":
        if val is not True:
            raise fail(f"{what} is a malformed none")
        return None
    if kind == "as_tensor":
        return tensor_ref(val, what)
    if kind == "as_tensors":
        return tuple(tensor_ref(t, what) for t in as_list(val, what))
    if kind == "as_optional_tensor":
        return _optional_tensor(val, what)
    if kind == "as_optional_tensors":
        return tuple(_optional_tensor(t, what) for t in as_list(val, what))
    if kind == "as_int":
        return as_int(val, what)
    if kind == "as_ints":
        return tuple(as_int(i, what) for i in as_list(val, what))
    if kind == "as_float":
        return as_float(val, what)
    if kind == "as_floats":
        return tuple(as_float(f, what) for f in as_list(val, what))
    if kind == "as_bool":
        if type(val) is not bool:
            raise fail(f"{what} is not a bool")
        return val
    if kind == "as_bools":
        out = tuple(as_list(val, what))
        if any(type(b) is not bool for b in out):
            raise fail(f"{what} is not a list of bools")
        return out
    if kind == "as_string":
        s = as_str(val, what)
        if len(s) > 64:
            raise fail(f"{what} is too long a string")
        return s
    if kind == "as_sym_int":
        return sym_int_arg(val, what)
    if kind == "as_sym_ints":
        return tuple(sym_int_arg(i, what) for i in as_list(val, what))
    if kind == "as_scalar_type":
        return _enum(DTYPES, val, what)
    if kind == "as_layout":
        return _enum(LAYOUTS, val, what)
    if kind == "as_memory_format":
        return _enum(MEMORY_FORMATS, val, what)
    if kind == "as_device":
        return _device(val, what)
    raise fail(f"{what} is an argument of kind {kind[:40]!r}, which is not accepted")


def refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, tuple):
        return [r for v in value for r in refs(v)]
    return []
