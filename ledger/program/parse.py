"""Parse a program's model JSON strictly into a ``Graph`` (specs/replay.md §2.2).

Only the fields listed there are read. ``guards_code`` is ignored (never executed: the input checks
it would run are re-derived from the input tensors' metadata, see ``InputMeta``); symbolic sizes are
accepted only in the plain symbol form and never evaluated; range constraints are read as two
integers per input symbol. Every name a node uses must be defined before it (inputs or earlier
outputs), every target must be on the allowlist of ``ops``, every argument one of a few kinds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

from . import ops
from .errors import ProgramError
from .exprs import Guard, check_all_exprs, check_expr, parse_guard
from .graph import Graph, InputSpec, Node, OutputSpec, Ref

SCHEMA_MAJOR = 8
MAX_NODES = 1_000_000
MAX_RANK = 16
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_STATE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
#: The only symbolic-size form read: torch's plain symbol, never handed to sympy.
_SYMBOL = re.compile(r"Symbol\('([a-z][a-z0-9_]{0,63})'(?:, (?:positive|integer|nonnegative|real)=True)*\)|([a-z][a-z0-9_]{0,63})")
_EMPTY_STACK = "_empty_nn_module_stack_from_metadata_hook"

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


@dataclass(frozen=True)
class Parsed:
    """The model JSON, parsed: the graph, the user inputs' metadata and their symbols' ranges."""

    graph: Graph
    inputs: Mapping[str, TensorMeta]  # user inputs
    ranges: Mapping[str, tuple[int, int | None]]  # symbol -> (min, max)
    persistent: frozenset[str]  # persistent buffers' targets
    guards: tuple[Guard, ...]


def _fail(what: str) -> ProgramError:
    return ProgramError(f"model program: {what}")


def _obj(v: Any, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise _fail(f"{what} is not an object")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise _fail(f"{what} is not a list")
    return v


def _int(v: Any, what: str) -> int:
    if type(v) is not int:
        raise _fail(f"{what} is not an integer")
    return v


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise _fail(f"{what} is not a string")
    return v


def _one(v: Any, what: str) -> tuple[str, Any]:
    """A serialized union: an object with exactly one key."""
    d = _obj(v, what)
    if len(d) != 1:
        raise _fail(f"{what} is not a one-field union")
    return next(iter(d.items()))


def _name(v: Any, what: str) -> str:
    s = _str(v, what)
    if not _NAME.fullmatch(s):
        raise _fail(f"{what} {s[:40]!r} is not a plain name")
    return s


def _float(v: Any, what: str) -> float:
    # json writes non-finite floats as these strings; no other string is a float.
    if type(v) is str and v in ("Infinity", "-Infinity", "NaN"):
        return {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}[v]
    if type(v) is float or type(v) is int:
        return float(v)
    raise _fail(f"{what} is not a float")


def _sym_size(v: Any, what: str) -> int | str:
    kind, val = _one(v, what)
    if kind == "as_int":
        return _int(val, what)
    if kind == "as_expr":
        expr = _str(_obj(val, what).get("expr_str"), what)
        m = _SYMBOL.fullmatch(expr)
        if m is None:
            raise _fail(f"{what}: only a plain symbol is accepted as a symbolic size")
        return m.group(1) or m.group(2)
    raise _fail(f"{what} is not a size")


def tensor_meta(v: Any, what: str) -> TensorMeta:
    d = _obj(v, what)
    dtype = DTYPES.get(d.get("dtype"))  # type: ignore[arg-type]
    if dtype is None or type(d.get("dtype")) is not int:
        raise _fail(f"{what} has a dtype outside the allowed ones")
    if LAYOUTS.get(d.get("layout")) is None or type(d.get("layout")) is not int:  # type: ignore[arg-type]
        raise _fail(f"{what} is not a strided tensor")
    dev = _obj(d.get("device"), f"{what} device")
    if dev.get("type") != "cpu" or dev.get("index") not in (None, 0):
        raise _fail(f"{what} is not on the CPU")
    sizes = tuple(_sym_size(s, f"{what} size") for s in _list(d.get("sizes"), f"{what} sizes"))
    strides_raw = _list(d.get("strides"), f"{what} strides")
    if len(sizes) > MAX_RANK or len(strides_raw) != len(sizes):
        raise _fail(f"{what} has a bad rank")
    strides = tuple(s if isinstance(s, int) else -1 for s in (_sym_size(x, f"{what} stride") for x in strides_raw))
    offset = _sym_size(d.get("storage_offset"), f"{what} offset")
    rg = d.get("requires_grad")
    if type(rg) is not bool:
        raise _fail(f"{what} requires_grad is not a bool")
    if any(isinstance(s, int) and s < 0 for s in sizes):
        raise _fail(f"{what} has a negative size")
    return TensorMeta(dtype, sizes, strides, offset if isinstance(offset, int) else -1, rg)


# -- arguments ---------------------------------------------------------------------------------


def _sym_int_arg(v: Any, what: str) -> int | Ref:
    kind, val = _one(v, what)
    if kind == "as_name":
        return Ref(_name(val, what))
    if kind == "as_int":
        return _int(val, what)
    raise _fail(f"{what} is not a symbolic int")


def _tensor_ref(v: Any, what: str) -> Ref:
    return Ref(_name(_obj(v, what).get("name"), what))


def _optional_tensor(v: Any, what: str) -> Ref | None:
    kind, val = _one(v, what)
    if kind == "as_tensor":
        return _tensor_ref(val, what)
    if kind == "as_none" and val is True:
        return None
    raise _fail(f"{what} is not an optional tensor")


def _device(v: Any, what: str) -> torch.device:
    d = _obj(v, what)
    if set(d) - {"type", "index"} or d.get("type") != "cpu" or d.get("index") not in (None, 0):
        raise _fail(f"{what}: only the CPU device is allowed")
    return _CPU


def _enum(table: Mapping[int, Any], v: Any, what: str) -> Any:
    if type(v) is not int or v not in table:
        raise _fail(f"{what} is not an allowed value")
    return table[v]


def _argument(v: Any, what: str) -> Any:
    kind, val = _one(v, what)
    if kind == "as_none":
        if val is not True:
            raise _fail(f"{what} is a malformed none")
        return None
    if kind == "as_tensor":
        return _tensor_ref(val, what)
    if kind == "as_tensors":
        return tuple(_tensor_ref(t, what) for t in _list(val, what))
    if kind == "as_optional_tensor":
        return _optional_tensor(val, what)
    if kind == "as_optional_tensors":
        return tuple(_optional_tensor(t, what) for t in _list(val, what))
    if kind == "as_int":
        return _int(val, what)
    if kind == "as_ints":
        return tuple(_int(i, what) for i in _list(val, what))
    if kind == "as_float":
        return _float(val, what)
    if kind == "as_floats":
        return tuple(_float(f, what) for f in _list(val, what))
    if kind == "as_bool":
        if type(val) is not bool:
            raise _fail(f"{what} is not a bool")
        return val
    if kind == "as_bools":
        out = tuple(_list(val, what))
        if any(type(b) is not bool for b in out):
            raise _fail(f"{what} is not a list of bools")
        return out
    if kind == "as_string":
        s = _str(val, what)
        if len(s) > 64:
            raise _fail(f"{what} is too long a string")
        return s
    if kind == "as_sym_int":
        return _sym_int_arg(val, what)
    if kind == "as_sym_ints":
        return tuple(_sym_int_arg(i, what) for i in _list(val, what))
    if kind == "as_scalar_type":
        return _enum(DTYPES, val, what)
    if kind == "as_layout":
        return _enum(LAYOUTS, val, what)
    if kind == "as_memory_format":
        return _enum(MEMORY_FORMATS, val, what)
    if kind == "as_device":
        return _device(val, what)
    raise _fail(f"{what} is an argument of kind {kind[:40]!r}, which is not accepted")


def _refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, tuple):
        return [r for v in value for r in _refs(v)]
    return []


# -- nodes -------------------------------------------------------------------------------------


def _module_stack(meta: dict[str, Any], what: str) -> tuple[str, ...]:
    raw = meta.get("nn_module_stack")
    if raw is None:
        return ()
    text = _str(raw, f"{what} nn_module_stack")
    out: list[str] = []
    for item in text.split(";"):
        parts = item.split(",")
        if parts and all(p == _EMPTY_STACK for p in parts):
            continue
        if len(parts) < 3:
            raise _fail(f"{what} has a malformed nn_module_stack")
        path = parts[1]
        if path == "":
            continue  # the root module
        if not _MODULE_PATH.fullmatch(path):
            raise _fail(f"{what} has a module path that is not dotted names")
        out.append(path)
    return tuple(out)


def _node(raw: Any, index: int, defined: set[str], buffers: frozenset[str]) -> Node:
    d = _obj(raw, f"node {index}")
    target = _str(d.get("target"), f"node {index} target")
    name = _name(d.get("name"), f"node {index} name")
    what = f"node {name!r}"
    if target in ops.SYM_OPS:
        op = target
        schema_args: list[Any] | None = None
    elif target.startswith("torch.ops.aten.") and target.removeprefix("torch.ops.aten.") in ops.ATEN_OPS:
        op = target.removeprefix("torch.ops.")
        schema_args = list(ops.overload(op.removeprefix("aten."))._schema.arguments)
    else:
        raise _fail(f"{what} calls {target[:120]!r}, which is not on the operator allowlist")
    named: dict[str, Any] = {}
    for j, item in enumerate(_list(d.get("inputs"), f"{what} inputs")):
        it = _obj(item, f"{what} input {j}")
        arg_name = _str(it.get("name"), f"{what} input {j} name")
        if arg_name in named:
            raise _fail(f"{what} names argument {arg_name[:40]!r} twice")
        if it.get("kind") not in (None, 1, 2):
            raise _fail(f"{what} input {j} has an unknown kind")
        named[arg_name] = _argument(it.get("arg"), f"{what} argument {arg_name[:40]!r}")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if schema_args is None:  # a Python operator on two ints
        if list(named) != ["a", "b"]:
            raise _fail(f"{what} must take exactly (a, b)")
        args = [named["a"], named["b"]]
        if any(not isinstance(a, (int, Ref)) or type(a) is bool for a in args):
            raise _fail(f"{what} takes symbolic ints only")
    else:
        known = {a.name for a in schema_args}
        unknown = set(named) - known
        if unknown:
            raise _fail(f"{what}: {op} has no argument {sorted(unknown)[0][:40]!r}")
        positional = True
        for a in schema_args:
            if a.name not in named:
                if not a.has_default_value():
                    raise _fail(f"{what}: {op} needs argument {a.name!r}")
                positional = False
                continue
            if positional and not a.kwarg_only:
                args.append(named[a.name])
            else:
                positional = False
                kwargs[a.name] = named[a.name]
    for r in _refs(tuple(args) + tuple(kwargs.values())):
        if r.name not in defined:
            raise _fail(f"{what} uses {r.name!r} before it is defined")
    if op.removeprefix("aten.") in ops.IN_PLACE:
        first = args[0] if args else None
        if not isinstance(first, Ref) or first.name not in buffers:
            raise _fail(f"{what}: the in-place {op} may only update a buffer")
    outputs = _outputs(d.get("outputs"), what, op)
    for o in outputs:
        if o is not None:
            if o in defined:
                raise _fail(f"{what} redefines {o!r}")
            defined.add(o)
    meta = d.get("metadata", {})
    stack = _module_stack(_obj(meta, f"{what} metadata"), what)
    return Node(name, op, tuple(args), MappingProxyType(kwargs), outputs, stack)


def _outputs(raw: Any, what: str, op: str) -> tuple[str | None, ...]:
    items = _list(raw, f"{what} outputs")
    out: list[str | None] = []
    for item in items:
        kind, val = _one(item, f"{what} output")
        if kind == "as_tensor":
            out.append(_tensor_ref(val, what).name)
        elif kind == "as_tensors":
            if len(items) != 1:
                raise _fail(f"{what} mixes a list output with others")
            out.extend(_tensor_ref(t, what).name for t in _list(val, what))
        elif kind == "as_sym_int":
            r = _sym_int_arg(val, what)
            if not isinstance(r, Ref):
                raise _fail(f"{what} outputs a constant")
            out.append(r.name)
        elif kind == "as_none":
            out.append(None)
        else:
            raise _fail(f"{what} has an output of kind {kind[:40]!r}")
    if op in ops.SYM_OPS or ops.returns_one(op.removeprefix("aten.")):
        if len(out) != 1:
            raise _fail(f"{what}: {op} returns one value, the node names {len(out)}")
    elif not ops.overload(op.removeprefix("aten."))._schema.returns:
        if out not in ([], [None]):
            raise _fail(f"{what}: {op} returns nothing, the node names an output")
        return ()
    else:
        rets = ops.overload(op.removeprefix("aten."))._schema.returns
        if len(rets) > 1 and len(out) != len(rets):
            raise _fail(f"{what}: {op} returns {len(rets)} values, the node names {len(out)}")
    return tuple(out)


# -- signature ---------------------------------------------------------------------------------


def _input_spec(raw: Any, what: str) -> tuple[InputSpec, bool]:
    kind, val = _one(raw, what)
    d = _obj(val, what)
    if kind == "user_input":
        k2, v2 = _one(d.get("arg"), what)
        if k2 != "as_tensor":
            raise _fail(f"{what}: a user input must be a tensor")
        return InputSpec(_tensor_ref(v2, what).name, "user_input", None), False
    fields = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name"}
    if kind not in fields:
        raise _fail(f"{what} is an input of kind {kind[:40]!r}, which is not accepted")
    target = _str(d.get(fields[kind]), what)
    if not _STATE_NAME.fullmatch(target) or len(target) > 512:
        raise _fail(f"{what}: {target[:60]!r} is not a dotted state name")
    persistent = True
    if kind == "buffer":
        persistent = d.get("persistent")
        if type(persistent) is not bool:
            raise _fail(f"{what}: a buffer's persistent flag is not a bool")
    spec = InputSpec(_tensor_ref(d.get("arg"), what).name, "constant" if kind == "tensor_constant" else kind, target)
    return spec, persistent


def _output_spec(raw: Any, what: str) -> OutputSpec:
    kind, val = _one(raw, what)
    d = _obj(val, what)
    if kind == "user_output":
        k2, v2 = _one(d.get("arg"), what)
        if k2 == "as_tensor":
            return OutputSpec(_tensor_ref(v2, what).name, "user_output", None)
        if k2 == "as_none" and v2 is True:
            return OutputSpec(None, "user_output", None)
        raise _fail(f"{what}: a user output must be a tensor")
    if kind == "buffer_mutation":
        target = _str(d.get("buffer_name"), what)
        return OutputSpec(_tensor_ref(d.get("arg"), what).name, "buffer_mutation", target)
    raise _fail(f"{what} is an output of kind {kind[:40]!r}, which is not accepted")


def parse_model(text: bytes) -> Parsed:
    """The model JSON (``archive/models/<name>.json``) as a checked ``Parsed``."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise _fail(f"the model JSON does not parse: {str(exc)[:120]}") from None
    doc = _obj(doc, "the model JSON")
    version = _obj(doc.get("schema_version"), "schema_version")
    if version.get("major") != SCHEMA_MAJOR:
        raise _fail(f"schema version {str(version.get('major'))[:20]} is not {SCHEMA_MAJOR}")
    verifiers = doc.get("verifiers", [])
    if verifiers not in ([], ["TRAINING"], ["ATEN"]):
        raise _fail("the program is not an ATen or training-IR export")
    # Never evaluated (specs/replay.md §2.2): symbolic sizes are checked by grammar, guards parsed
    # as size comparisons that check_inputs enforces itself.
    check_all_exprs(doc)
    guards = tuple(parse_guard(g) for g in _list(doc.get("guards_code", []), "guards_code"))
    gm = _obj(doc.get("graph_module"), "graph_module")
    g = _obj(gm.get("graph"), "graph")
    sig = _obj(gm.get("signature"), "signature")
    inputs: list[InputSpec] = []
    persistent: set[str] = set()
    for i, raw in enumerate(_list(sig.get("input_specs"), "input_specs")):
        spec, keep = _input_spec(raw, f"input spec {i}")
        inputs.append(spec)
        if spec.kind == "buffer" and keep:
            persistent.add(spec.target)  # type: ignore[arg-type]
    names = [s.name for s in inputs]
    targets = [s.target for s in inputs if s.target is not None]
    if len(set(names)) != len(names) or len(set(targets)) != len(targets):
        raise _fail("two graph inputs share a name or a state name")
    graph_inputs = [_tensor_ref(_one(a, "graph input")[1], "graph input").name
                    for a in _list(g.get("inputs"), "graph inputs")]
    if graph_inputs != names:
        raise _fail("the graph's inputs differ from its signature")
    defined = set(names)
    buffers = frozenset(s.name for s in inputs if s.kind == "buffer")
    raw_nodes = _list(g.get("nodes"), "nodes")
    if len(raw_nodes) > MAX_NODES:
        raise _fail(f"{len(raw_nodes)} nodes, above {MAX_NODES}")
    nodes = tuple(_node(n, i, defined, buffers) for i, n in enumerate(raw_nodes))
    outputs = tuple(_output_spec(o, f"output spec {i}") for i, o in enumerate(_list(sig.get("output_specs"), "output_specs")))
    for o in outputs:
        if o.name is not None and o.name not in defined:
            raise _fail(f"output {o.name!r} is never defined")
        if o.kind == "buffer_mutation" and o.target not in {s.target for s in inputs if s.kind == "buffer"}:
            raise _fail(f"output {o.name!r} mutates {str(o.target)[:60]!r}, which is no buffer")
    if not any(o.kind == "user_output" for o in outputs):
        raise _fail("the program returns nothing")
    values = _obj(g.get("tensor_values"), "tensor_values")
    metas = {}
    for spec in inputs:
        if spec.kind == "user_input":
            metas[spec.name] = tensor_meta(values.get(spec.name), f"input {spec.name!r}")
    symbols = {s for m in metas.values() for s in m.sizes if isinstance(s, str)}
    ranges: dict[str, tuple[int, int | None]] = {}
    rc = _obj(doc.get("range_constraints", {}), "range_constraints")
    for key in rc:
        check_expr(key)
    for sym in symbols:
        r = _obj(rc.get(sym, {"min_val": 0, "max_val": None}), f"range of {sym}")
        lo, hi = r.get("min_val"), r.get("max_val")
        if type(lo) is not int or (hi is not None and type(hi) is not int):
            raise _fail(f"the range of {sym} is not two integers")
        ranges[sym] = (lo, hi)
    graph = Graph(tuple(inputs), nodes, outputs)
    for guard in guards:
        for side in (guard.left, guard.right):
            if not isinstance(side, int) and (side[0] not in metas or side[1] >= len(metas[side[0]].sizes)):
                raise _fail(f"a guard names input {side[0]!r} dim {side[1]}, which the program does not take")
    return Parsed(graph, MappingProxyType(metas), MappingProxyType(ranges), frozenset(persistent), guards)
