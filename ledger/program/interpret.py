"""Run a parsed ``Graph`` with ``torch.ops.aten`` calls (specs/replay.md §2.5).

Each node calls its allowlisted overload on the values its arguments name, in graph order, as the
``GraphModule`` that ``torch.export``'s ``module()`` builds would: the same kernels in the same
order, so the same bits (tests/test_program_loader.py compares them). ``after(node, value)``
lets the caller replace a node's result before any user sees it (the verifier applies its own
routing mix at band boundaries this way).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from . import ops
from .errors import ProgramError
from .graph import Graph, Node, Ref

After = Callable[[Node, Any], Any]

#: Factory ops whose size argument is checked before allocation (elements).
MAX_FACTORY_ELEMENTS = 1 << 31
_FACTORIES = {"aten.zeros.default", "aten.ones.default", "aten.full.default"}


def _resolve(value: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        return [_resolve(v, env) for v in value]  # torch's list arguments
    return value


def _check_factory(node: Node, args: list[Any]) -> None:
    size = args[0] if args else node.kwargs.get("size")
    n = 1
    for s in size if isinstance(size, list) else []:
        if type(s) is not int or s < 0:
            raise ProgramError(f"model program node {node.name!r}: a factory size is not a non-negative int")
        n *= s
        if n > MAX_FACTORY_ELEMENTS:
            raise ProgramError(f"model program node {node.name!r} would allocate more than {MAX_FACTORY_ELEMENTS} elements")


def run(graph: Graph, inputs: Mapping[str, Tensor], state: Mapping[str, Tensor], *,
        after: After | None = None) -> tuple[Any, ...]:
    """The user outputs of ``graph`` on ``inputs`` (user-input name -> tensor) and ``state``
    (state name -> tensor, parameters as leaves with ``requires_grad``).

    Buffer mutations (outputs of kind ``buffer_mutation``) are copied into ``state`` in place,
    as the unlifted module would; in-place buffer ops (``add_``) act on ``state`` directly.
    """
    env: dict[str, Any] = {}
    for spec in graph.inputs:
        source = inputs if spec.kind == "user_input" else state
        key = spec.name if spec.kind == "user_input" else spec.target
        if key not in source:
            raise ProgramError(f"model program input {key!r} was not given")
        env[spec.name] = source[key]
    for node in graph.nodes:
        args = [_resolve(a, env) for a in node.args]
        kwargs = {k: _resolve(v, env) for k, v in node.kwargs.items()}
        try:
            if node.op in ops.SYM_OPS:
                value = ops.SYM_OPS[node.op](*args)
                one = True
            else:
                name = node.op.removeprefix("aten.")
                if node.op in _FACTORIES:
                    _check_factory(node, args)
                value = ops.overload(name)(*args, **kwargs)
                one = ops.returns_one(name)
        except ProgramError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise ProgramError(f"model program node {node.name!r} ({node.op}) failed: {str(exc)[:200]}") from None
        if after is not None:
            value = after(node, value)
        if not node.outputs:
            continue
        if one:
            env[node.outputs[0]] = value  # type: ignore[index]
        else:
            if len(value) != len(node.outputs):
                raise ProgramError(f"model program node {node.name!r} returned {len(value)} values, "
                                   f"it names {len(node.outputs)}")
            for out, v in zip(node.outputs, value):
                if out is not None:
                    env[out] = v
    results = []
    for spec in graph.outputs:
        if spec.kind == "buffer_mutation":
            with torch.no_grad():
                state[spec.target].copy_(env[spec.name])  # type: ignore[index]
        else:
            results.append(None if spec.name is None else env[spec.name])
    return tuple(results)
