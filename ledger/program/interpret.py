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

#: Ops whose size argument (the first list argument) makes a tensor of that many elements, or a
#: view later ops materialize: checked before the call (a first bound; the replay worker's memory
#: limit is the second).
MAX_ELEMENTS = 1 << 31
_SIZED = {"aten.zeros.default", "aten.ones.default", "aten.full.default", "aten.new_zeros.default",
          "aten.new_ones.default", "aten.expand.default",
          "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}


def _resolve(value: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        return [_resolve(v, env) for v in value]  # torch's list arguments
    return value


def _check_size(node: Node, args: list[Any], kwargs: dict[str, Any]) -> None:
    size = next((a for a in args if isinstance(a, list)), kwargs.get("size"))
    n = 1
    for s in size if isinstance(size, list) else []:
        if type(s) is not int:
            raise ProgramError(f"model program node {node.name!r}: a size is not an int")
        n *= max(s, 1)  # -1 (inferred) and 0 add nothing beyond the input's own elements
        if n > MAX_ELEMENTS:
            raise ProgramError(f"model program node {node.name!r} would make more than {MAX_ELEMENTS} elements")


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
                if node.op in _SIZED:
                    _check_size(node, args, kwargs)
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
