"""Parse a program's model JSON strictly into a ``Graph`` (specs/replay.md §2.2).

Only the fields listed there are read. Symbolic sizes are checked by grammar and never evaluated
(``exprs``); guards are parsed as size comparisons that ``check_inputs`` enforces itself; range
constraints are read as two integers per input symbol. Every name a node uses must be defined
before it (inputs or earlier outputs), every target must be on the allowlist of ``ops``, every
argument one of the kinds ``values`` decodes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from . import ops
from .exprs import Guard, check_all_exprs, check_expr, parse_guard
from .graph import Graph, InputSpec, Node, OutputSpec, Ref
from .values import (TensorMeta, argument, as_dict, as_list, as_str, fail, plain_name, refs, sym_int_arg,
                     tensor_meta, tensor_ref, union)

__all__ = ["Parsed", "TensorMeta", "parse_model", "tensor_meta"]

SCHEMA_MAJOR = 8
MAX_NODES = 1_000_000
_STATE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_EMPTY_STACK = "_empty_nn_module_stack_from_metadata_hook"


@dataclass(frozen=True)
class Parsed:
    """The model JSON, parsed: the graph, the user inputs' metadata and their symbols' ranges."""

    graph: Graph
    inputs: Mapping[str, TensorMeta]  # user inputs
    ranges: Mapping[str, tuple[int, int | None]]  # symbol -> (min, max)
    persistent: frozenset[str]  # persistent buffers' targets
    guards: tuple[Guard, ...]


# -- nodes -------------------------------------------------------------------------------------


def _module_stack(meta: dict[str, Any], what: str) -> tuple[str, ...]:
    raw = meta.get("nn_module_stack")
    if raw is None:
        return ()
    text = as_str(raw, f"{what} nn_module_stack")
    out: list[str] = []
    for item in text.split(";"):
        parts = item.split(",")
        if parts and all(p == _EMPTY_STACK for p in parts):
            continue
        if len(parts) < 3:
            raise fail(f"{what} has a malformed nn_module_stack")
        path = parts[1]
        if path == "":
            continue  # the root module
        if not _MODULE_PATH.fullmatch(path):
            raise fail(f"{what} has a module path that is not dotted names")
        out.append(path)
    return tuple(out)


def _node(raw: Any, index: int, defined: set[str], buffers: frozenset[str]) -> Node:
    d = as_dict(raw, f"node {index}")
    target = as_str(d.get("target"), f"node {index} target")
    name = plain_name(d.get("name"), f"node {index} name")
    what = f"node {name!r}"
    if target in ops.SYM_OPS:
        op = target
        schema_args: list[Any] | None = None
    elif target.startswith("torch.ops.aten.") and target.removeprefix("torch.ops.aten.") in ops.ATEN_OPS:
        op = target.removeprefix("torch.ops.")
        schema_args = list(ops.overload(op.removeprefix("aten."))._schema.arguments)
    else:
        raise fail(f"{what} calls {target[:120]!r}, which is not on the operator allowlist")
    named: dict[str, Any] = {}
    for j, item in enumerate(as_list(d.get("inputs"), f"{what} inputs")):
        it = as_dict(item, f"{what} input {j}")
        arg_name = as_str(it.get("name"), f"{what} input {j} name")
        if arg_name in named:
            raise fail(f"{what} names argument {arg_name[:40]!r} twice")
        if it.get("kind") not in (None, 1, 2):
            raise fail(f"{what} input {j} has an unknown kind")
        named[arg_name] = argument(it.get("arg"), f"{what} argument {arg_name[:40]!r}")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if schema_args is None:  # a Python operator on two ints
        if list(named) != ["a", "b"]:
            raise fail(f"{what} must take exactly (a, b)")
        args = [named["a"], named["b"]]
        if any(not isinstance(a, (int, Ref)) or type(a) is bool for a in args):
            raise fail(f"{what} takes symbolic ints only")
    else:
        known = {a.name for a in schema_args}
        unknown = set(named) - known
        if unknown:
            raise fail(f"{what}: {op} has no argument {sorted(unknown)[0][:40]!r}")
        positional = True
        for a in schema_args:
            if a.name not in named:
                if not a.has_default_value():
                    raise fail(f"{what}: {op} needs argument {a.name!r}")
                positional = False
                continue
            if positional and not a.kwarg_only:
                args.append(named[a.name])
            else:
                positional = False
                kwargs[a.name] = named[a.name]
    for r in refs(tuple(args) + tuple(kwargs.values())):
        if r.name not in defined:
            raise fail(f"{what} uses {r.name!r} before it is defined")
    if op.removeprefix("aten.") in ops.IN_PLACE:
        first = args[0] if args else None
        if not isinstance(first, Ref) or first.name not in buffers:
            raise fail(f"{what}: the in-place {op} may only update a buffer")
    outputs = _outputs(d.get("outputs"), what, op)
    for o in outputs:
        if o is not None:
            if o in defined:
                raise fail(f"{what} redefines {o!r}")
            defined.add(o)
    meta = d.get("metadata", {})
    stack = _module_stack(as_dict(meta, f"{what} metadata"), what)
    return Node(name, op, tuple(args), MappingProxyType(kwargs), outputs, stack)


def _outputs(raw: Any, what: str, op: str) -> tuple[str | None, ...]:
    items = as_list(raw, f"{what} outputs")
    out: list[str | None] = []
    for item in items:
        kind, val = union(item, f"{what} output")
        if kind == "as_tensor":
            out.append(tensor_ref(val, what).name)
        elif kind == "as_tensors":
            if len(items) != 1:
                raise fail(f"{what} mixes a list output with others")
            out.extend(tensor_ref(t, what).name for t in as_list(val, what))
        elif kind == "as_sym_int":
            r = sym_int_arg(val, what)
            if not isinstance(r, Ref):
                raise fail(f"{what} outputs a constant")
            out.append(r.name)
        elif kind == "as_none":
            out.append(None)
        else:
            raise fail(f"{what} has an output of kind {kind[:40]!r}")
    if op in ops.SYM_OPS or ops.returns_one(op.removeprefix("aten.")):
        if len(out) != 1:
            raise fail(f"{what}: {op} returns one value, the node names {len(out)}")
    elif not ops.overload(op.removeprefix("aten."))._schema.returns:
        if out not in ([], [None]):
            raise fail(f"{what}: {op} returns nothing, the node names an output")
        return ()
    else:
        rets = ops.overload(op.removeprefix("aten."))._schema.returns
        if len(rets) > 1 and len(out) != len(rets):
            raise fail(f"{what}: {op} returns {len(rets)} values, the node names {len(out)}")
    return tuple(out)


# -- signature ---------------------------------------------------------------------------------


def _input_spec(raw: Any, what: str) -> tuple[InputSpec, bool]:
    kind, val = union(raw, what)
    d = as_dict(val, what)
    if kind == "user_input":
        k2, v2 = union(d.get("arg"), what)
        if k2 != "as_tensor":
            raise fail(f"{what}: a user input must be a tensor")
        return InputSpec(tensor_ref(v2, what).name, "user_input", None), False
    fields = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name"}
    if kind not in fields:
        raise fail(f"{what} is an input of kind {kind[:40]!r}, which is not accepted")
    target = as_str(d.get(fields[kind]), what)
    if not _STATE_NAME.fullmatch(target) or len(target) > 512:
        raise fail(f"{what}: {target[:60]!r} is not a dotted state name")
    persistent = True
    if kind == "buffer":
        persistent = d.get("persistent")
        if type(persistent) is not bool:
            raise fail(f"{what}: a buffer's persistent flag is not a bool")
    spec = InputSpec(tensor_ref(d.get("arg"), what).name, "constant" if kind == "tensor_constant" else kind, target)
    return spec, persistent


def _output_spec(raw: Any, what: str) -> OutputSpec:
    kind, val = union(raw, what)
    d = as_dict(val, what)
    if kind == "user_output":
        k2, v2 = union(d.get("arg"), what)
        if k2 == "as_tensor":
            return OutputSpec(tensor_ref(v2, what).name, "user_output", None)
        if k2 == "as_none" and v2 is True:
            return OutputSpec(None, "user_output", None)
        raise fail(f"{what}: a user output must be a tensor")
    if kind == "buffer_mutation":
        target = as_str(d.get("buffer_name"), what)
        return OutputSpec(tensor_ref(d.get("arg"), what).name, "buffer_mutation", target)
    raise fail(f"{what} is an output of kind {kind[:40]!r}, which is not accepted")


def parse_model(text: bytes) -> Parsed:
    """The model JSON (``archive/models/<name>.json``) as a checked ``Parsed``."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise fail(f"the model JSON does not parse: {str(exc)[:120]}") from None
    doc = as_dict(doc, "the model JSON")
    version = as_dict(doc.get("schema_version"), "schema_version")
    if version.get("major") != SCHEMA_MAJOR:
        raise fail(f"schema version {str(version.get('major'))[:20]} is not {SCHEMA_MAJOR}")
    verifiers = doc.get("verifiers", [])
    if verifiers not in ([], ["TRAINING"], ["ATEN"]):
        raise fail("the program is not an ATen or training-IR export")
    # Never evaluated (specs/replay.md §2.2): symbolic sizes are checked by grammar, guards parsed
    # as size comparisons that check_inputs enforces itself.
    check_all_exprs(doc)
    guards = tuple(parse_guard(g) for g in as_list(doc.get("guards_code", []), "guards_code"))
    gm = as_dict(doc.get("graph_module"), "graph_module")
    g = as_dict(gm.get("graph"), "graph")
    sig = as_dict(gm.get("signature"), "signature")
    inputs: list[InputSpec] = []
    persistent: set[str] = set()
    for i, raw in enumerate(as_list(sig.get("input_specs"), "input_specs")):
        spec, keep = _input_spec(raw, f"input spec {i}")
        inputs.append(spec)
        if spec.kind == "buffer" and keep:
            persistent.add(spec.target)  # type: ignore[arg-type]
    names = [s.name for s in inputs]
    targets = [s.target for s in inputs if s.target is not None]
    if len(set(names)) != len(names) or len(set(targets)) != len(targets):
        raise fail("two graph inputs share a name or a state name")
    graph_inputs = [tensor_ref(union(a, "graph input")[1], "graph input").name
                    for a in as_list(g.get("inputs"), "graph inputs")]
    if graph_inputs != names:
        raise fail("the graph's inputs differ from its signature")
    defined = set(names)
    buffers = frozenset(s.name for s in inputs if s.kind == "buffer")
    raw_nodes = as_list(g.get("nodes"), "nodes")
    if len(raw_nodes) > MAX_NODES:
        raise fail(f"{len(raw_nodes)} nodes, above {MAX_NODES}")
    nodes = tuple(_node(n, i, defined, buffers) for i, n in enumerate(raw_nodes))
    outputs = tuple(_output_spec(o, f"output spec {i}") for i, o in enumerate(as_list(sig.get("output_specs"), "output_specs")))
    for o in outputs:
        if o.name is not None and o.name not in defined:
            raise fail(f"output {o.name!r} is never defined")
        if o.kind == "buffer_mutation" and o.target not in {s.target for s in inputs if s.kind == "buffer"}:
            raise fail(f"output {o.name!r} mutates {str(o.target)[:60]!r}, which is no buffer")
    if not any(o.kind == "user_output" for o in outputs):
        raise fail("the program returns nothing")
    values = as_dict(g.get("tensor_values"), "tensor_values")
    metas = {}
    for spec in inputs:
        if spec.kind == "user_input":
            metas[spec.name] = tensor_meta(values.get(spec.name), f"input {spec.name!r}")
    symbols = {s for m in metas.values() for s in m.sizes if isinstance(s, str)}
    ranges: dict[str, tuple[int, int | None]] = {}
    rc = as_dict(doc.get("range_constraints", {}), "range_constraints")
    for key in rc:
        check_expr(key)
    for sym in symbols:
        r = as_dict(rc.get(sym, {"min_val": 0, "max_val": None}), f"range of {sym}")
        lo, hi = r.get("min_val"), r.get("max_val")
        if type(lo) is not int or (hi is not None and type(hi) is not int):
            raise fail(f"the range of {sym} is not two integers")
        ranges[sym] = (lo, hi)
    graph = Graph(tuple(inputs), nodes, outputs)
    for guard in guards:
        for size in guard.sizes():
            if size.name not in metas or size.dim >= len(metas[size.name].sizes):
                raise fail(f"a guard names input {size.name!r} dim {size.dim}, which the program does not take")
    return Parsed(graph, MappingProxyType(metas), MappingProxyType(ranges), frozenset(persistent), guards)
