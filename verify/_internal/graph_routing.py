"""Routing applied by the verifier around a model program (specs/routing.md §6).

The trainer's exported program may carry the gate, or not, or a forged one: nothing in it is
trusted. The verifier instead

1. finds, from the recorded layout and the program's own module scopes, the values that are the
   output of each boundary module (``boundary_nodes``, §6.1);
2. proves by reachability over the dataflow graph that mixing exactly those values gives the
   routed gradient of §3.4 (``check_cut``, §6.2); the scopes only choose *where* to cut, the
   proof does not depend on them being honest;
3. proves that examples do not interact (``check_batch_independent`` in ``batch_rows``, §6.3);
4. runs the program with its own ``mix`` at those values and at the user outputs, the program's
   ``profiles`` input (if it has one) held at ones so that an honest program's gate is the
   identity (``boundary_hook``, ``scale_outputs``, ``program_inputs``).

``ratios`` and ``mix`` are re-implemented from §3.1 and §3.2, not imported from the trainer: two
implementations that agree bit for bit are the evidence.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from gradledger.ledger.errors import VerificationError
from gradledger.ledger.program import SYM_OPS, After, Graph, Node, Ref, run

__all__ = [
    "GATED_PREFIX",
    "CutError",
    "RoutingNotProven",
    "band_descriptions",
    "boundary_hook",
    "boundary_nodes",
    "check_cut",
    "mix",
    "plan_routing",
    "program_inputs",
    "ratios",
    "routed_forward",
    "scale_outputs",
    "state_prefix",
]

#: The gated wrapper (``GatedModel``) holds the model as its ``model`` attribute: its state names and
#: module paths are the recorded ones under this prefix.
GATED_PREFIX = "model."

#: Ops whose results are Python ints (sizes): they carry no tensor data and no gradient.
_SIZE_OPS = frozenset({"aten.sym_size.int", *SYM_OPS})


class RoutingNotProven(VerificationError):
    """The verifier cannot prove that replaying this program routes gradients as specs/routing.md says."""


class CutError(RoutingNotProven):
    """A band boundary does not separate the bands in the program's dataflow (specs/routing.md §6.2)."""


# -- the recorded layout -----------------------------------------------------------------------


def band_descriptions(layout: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The bands of RunStarted ``settings.bands`` (``{"bands": [...]}``, or the list itself), head first."""
    bands = layout.get("bands") if isinstance(layout, Mapping) else layout
    if not isinstance(bands, (list, tuple)) or not bands:
        raise RoutingNotProven("the recorded band layout has no bands")
    for k, band in enumerate(bands):
        if not isinstance(band, Mapping) or not isinstance(band.get("name"), str):
            raise RoutingNotProven(f"recorded band {k} is malformed")
        boundary = band.get("boundary")
        if k == 0 and boundary is not None:
            raise RoutingNotProven(f"the head band {band['name']!r} has a boundary")
        if k > 0 and (not isinstance(boundary, str) or not boundary):
            raise RoutingNotProven(f"band {band['name']!r} has no boundary module")
    return list(bands)


def _parameter_targets(graph: Graph) -> dict[str, str]:
    """Parameter state name -> graph input name."""
    return {s.target: s.name for s in graph.inputs if s.kind == "parameter" and s.target is not None}


def state_prefix(graph: Graph, band_params: Sequence[Sequence[str]]) -> str:
    """``"model."`` when the program is the gated wrapper, ``""`` for a plain model (§6.1).

    Decided from the recorded parameter names alone: the prefix under which every recorded band
    parameter is a parameter input of the program. Neither or both: refused.
    """
    targets = _parameter_targets(graph)
    names = [n for ns in band_params for n in ns]
    if not names:
        raise RoutingNotProven("the recorded layout lists no band parameters")
    fits = [p for p in (GATED_PREFIX, "") if all(p + n in targets for n in names)]
    if len(fits) != 1:
        missing = next((n for n in names if n not in targets and GATED_PREFIX + n not in targets), None)
        why = (f"recorded band parameter {missing!r} is not a parameter of the program" if missing
               else "the recorded parameter names fit the program both with and without the 'model.' prefix")
        raise CutError(why)
    return fits[0]


# -- §6.1 boundary values ----------------------------------------------------------------------


def _refs(value: Any) -> Iterable[str]:
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _refs(v)


def _node_refs(node: Node) -> list[str]:
    return [r for a in (*node.args, *node.kwargs.values()) for r in _refs(a)]


def _in_scope(node: Node, path: str) -> bool:
    return any(m == path or m.startswith(path + ".") for m in node.module_stack)


def boundary_nodes(
    graph: Graph, layout: Mapping[str, Any] | Sequence[Mapping[str, Any]], band_params: Sequence[Sequence[str]],
) -> list[list[str]]:
    """The values that are each boundary module's output, indexed by band (``[0]`` is always empty).

    specs/routing.md §6.1: for band ``k >= 1`` with boundary path ``b`` (under the prefix of
    ``state_prefix``), the tensor values produced by nodes in ``b``'s scope (a module stack entry
    equal to ``b`` or under it) that a node outside that scope uses or that are user outputs.
    Sizes (``sym_size`` and integer operators) are not values here. A boundary that yields no
    value is refused.
    """
    bands = band_descriptions(layout)
    prefix = state_prefix(graph, band_params)
    outputs = {o.name for o in graph.outputs if o.kind == "user_output" and o.name is not None}
    users: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for r in _node_refs(node):
            users.setdefault(r, []).append(node)
    result: list[list[str]] = [[]]
    for band in bands[1:]:
        path = prefix + band["boundary"]
        found: list[str] = []
        for node in graph.nodes:
            if node.op in _SIZE_OPS or not _in_scope(node, path):
                continue
            for out in node.outputs:
                if out is None:
                    continue
                if out in outputs or any(not _in_scope(u, path) for u in users.get(out, ())):
                    found.append(out)
        if not found:
            raise CutError(f"boundary {band['boundary']!r} of band {band['name']!r} yields no value in the program "
                           f"(no node runs in module {path!r} whose result leaves it)")
        result.append(found)
    return result


# -- §6.2 the cut ------------------------------------------------------------------------------


def _dataflow(graph: Graph) -> tuple[dict[str, list[str]], dict[str, str]]:
    """value -> values computed from it, and value -> the node that produces it.

    Conservative: every tensor argument of a node feeds every result (an op with no gradient
    still counts); an in-place update also feeds the tensor it updates. Sizes feed nothing.
    """
    succ: dict[str, list[str]] = {}
    producer: dict[str, str] = {}
    for node in graph.nodes:
        outs = [o for o in node.outputs if o is not None]
        for o in outs:
            producer[o] = node.name
        if node.op in _SIZE_OPS:
            continue
        refs = _node_refs(node)
        targets = list(outs)
        if node.op.endswith("_.Tensor") and node.args and isinstance(node.args[0], Ref):
            targets.append(node.args[0].name)  # in place: later readers of the buffer see the update
        for r in refs:
            succ.setdefault(r, []).extend(t for t in targets if t != r)
    return succ, producer


def _path(start: str, succ: Mapping[str, list[str]], goals: set[str], blocked: set[str]) -> list[str] | None:
    """A dataflow path from ``start`` to a value in ``goals`` avoiding ``blocked``, or None."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in succ.get(v, ()):
            if w in parent or w in blocked:
                continue
            parent[w] = v
            if w in goals:
                path = [w]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])  # type: ignore[arg-type]
                return path[::-1]
            queue.append(w)
    return None


def _show(path: list[str], producer: Mapping[str, str]) -> str:
    names = [producer.get(v, v) for v in path]
    return " -> ".join(names if len(names) <= 8 else [*names[:4], "...", *names[-3:]])


def check_cut(
    graph: Graph,
    layout: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    band_params: Sequence[Sequence[str]],
    boundaries: Sequence[Sequence[str]],
) -> None:
    """Prove that mixing at ``boundaries`` gives the routed gradient (specs/routing.md §6.2, §3.4).

    Every recorded band parameter must be a parameter input of the program. For each band
    ``k >= 1``: (a) with boundary ``k``'s values removed, no parameter of a band ``j >= k``
    reaches a user output; (b) no parameter of a band ``j < k`` reaches a value of boundary
    ``k``; (c) no value of boundary ``k`` reaches another. Raises ``CutError`` naming the band,
    the parameter and the nodes of an offending path.
    """
    bands = band_descriptions(layout)
    if len(band_params) != len(bands) or len(boundaries) != len(bands):
        raise CutError(f"{len(bands)} recorded bands, {len(band_params)} band parameter lists, "
                       f"{len(boundaries)} boundary value lists")
    prefix = state_prefix(graph, band_params)
    targets = _parameter_targets(graph)
    params = [[(n, targets[prefix + n]) for n in ns] for ns in band_params]
    succ, producer = _dataflow(graph)
    outputs = {o.name for o in graph.outputs if o.kind == "user_output" and o.name is not None}
    for k in range(1, len(bands)):
        where = f"boundary {bands[k]['boundary']!r} of band {bands[k]['name']!r}"
        cut = set(boundaries[k])
        if not cut:
            raise CutError(f"{where} has no value to mix")
        for j in range(len(bands)):
            for name, value in params[j]:
                if j >= k:  # (a) every path to the output crosses boundary k
                    path = _path(value, succ, outputs, cut)
                    if path is not None:
                        raise CutError(f"parameter {name!r} of band {bands[j]['name']!r} reaches the model output "
                                       f"without crossing {where}: {_show(path, producer)}")
                else:  # (b) nothing shallower lies below boundary k
                    path = _path(value, succ, cut, set())
                    if path is not None:
                        raise CutError(f"parameter {name!r} of band {bands[j]['name']!r} reaches {where} "
                                       f"(node {producer.get(path[-1], path[-1])!r}): it lies below the boundary: "
                                       f"{_show(path, producer)}")
        for v in boundaries[k]:  # (c) each path crosses boundary k once
            path = _path(v, succ, cut - {v}, set())
            if path is not None:
                raise CutError(f"{where}: its value {producer.get(v, v)!r} feeds its value "
                               f"{producer.get(path[-1], path[-1])!r}, so a path crosses the boundary twice: "
                               f"{_show(path, producer)}")


# -- §3.1, §3.2 the verifier's own mix ---------------------------------------------------------


def ratios(profiles: Tensor) -> Tensor:
    """Mixing coefficients [B, n] from profiles [B, n] in the profiles' dtype (specs/routing.md §3.1).

    ``r[:, 0] = p[:, 0]``; ``r[:, k] = p[:, k] / p[:, k-1]`` where ``p[:, k-1] > 0``, else ``0``.
    """
    if profiles.dim() != 2 or profiles.shape[1] < 1 or not profiles.is_floating_point():
        raise RoutingNotProven(f"profiles must be a floating [batch, bands] tensor, got {list(profiles.shape)}")
    cols = [profiles[:, 0]]
    for k in range(1, profiles.shape[1]):
        prev, cur = profiles[:, k - 1], profiles[:, k]
        positive = prev > 0
        # The division runs only on positive divisors (1 stands in elsewhere and is discarded).
        cols.append(torch.where(positive, cur / torch.where(positive, prev, torch.ones_like(prev)),
                                torch.zeros_like(cur)))
    return torch.stack(cols, dim=1)


def mix(value: Tensor, r: Tensor) -> Tensor:
    """``d + r' * (value - d)``, ``d = value.detach()``, ``r'`` = ``r`` in the wider of its and value's dtypes
    (a bfloat16 value under autocast is mixed in float32), shaped [B, 1, ..., 1].

    specs/routing.md §3.2: the forward value is ``value`` bit for bit (up to the sign of zero),
    the gradient into ``value`` is ``r'`` times the incoming one.
    """
    if value.dim() == 0 or value.shape[0] != r.shape[0]:
        raise RoutingNotProven(f"a routed value must have the batch ({r.shape[0]}) as its first dim, "
                               f"got shape {list(value.shape)}")
    rr = r.to(torch.promote_types(r.dtype, value.dtype)).reshape((r.shape[0],) + (1,) * (value.dim() - 1))
    d = value.detach()
    return d + rr * (value - d)


def _mix_floating(value: Any, r: Tensor) -> Any:
    return mix(value, r) if isinstance(value, Tensor) and value.is_floating_point() else value


def boundary_hook(boundaries: Sequence[Sequence[str]], r: Tensor) -> After:
    """The ``after`` hook of ``gradledger.ledger.program.run`` that mixes each boundary value.

    ``r`` is ``ratios(profiles)``; a value of boundary ``k`` is replaced by ``mix(value, r[:, k])``
    (floating tensors only) before any node uses it. A value that two nested boundaries share is
    mixed once per boundary, in band order (specs/routing.md §6.4).
    """
    by_value: dict[str, list[int]] = {}
    for k, values in enumerate(boundaries):
        for v in values:
            by_value.setdefault(v, []).append(k)

    def after(node: Node, value: Any) -> Any:
        hits = [(i, by_value[o]) for i, o in enumerate(node.outputs) if o is not None and o in by_value]
        if not hits:
            return value
        single = len(node.outputs) == 1 and not isinstance(value, (tuple, list))
        items = [value] if single else list(value)
        for i, ks in hits:
            for k in ks:
                items[i] = _mix_floating(items[i], r[:, k])
        return items[0] if single else type(value)(items) if isinstance(value, tuple) else items

    return after


def scale_outputs(outputs: Sequence[Any], r: Tensor) -> tuple[Any, ...]:
    """Head scaling (specs/routing.md §3.3 item 2): every floating user output mixed with ``r[:, 0]``."""
    return tuple(_mix_floating(o, r[:, 0]) for o in outputs)


def program_inputs(graph: Graph, x: Tensor | tuple[Tensor, ...], n_bands: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The program's user inputs for a batch ``x`` (one tensor, or a model's parts in canonical order,
    specs/training.md §5.1): ``x`` and, for a gated program, ``profiles`` of ones.

    Ones make an honest gate's ratios exactly 1, so its mix is the identity in value and
    gradient and the verifier's own mix is the only routing; a forged gate sees a constant.
    """
    names = graph.user_inputs
    parts = list(x) if isinstance(x, tuple) else [x]
    if len(names) == len(parts):
        return dict(zip(names, parts))
    if len(names) == len(parts) + 1 and names[-1] == "profiles":
        out = dict(zip(names, parts))
        out["profiles"] = torch.ones(parts[0].shape[0], n_bands, dtype=dtype)
        return out
    raise RoutingNotProven(f"the program takes inputs {list(names)}: a model program takes its {len(parts)} "
                           "input(s), a gated one those and last 'profiles'")


# -- for replay --------------------------------------------------------------------------------


def plan_routing(graph: Graph, settings: Mapping[str, Any]) -> list[list[str]]:
    """Boundary values of a run's program, with the cut proved (§6.1, §6.2), from RunStarted ``settings``.

    Once per program. Batch independence (§6.3) is separate: once per distinct input shape.
    """
    bands, band_params = settings.get("bands"), settings.get("band_params")
    if not isinstance(band_params, (list, tuple)) or not all(isinstance(ns, (list, tuple)) for ns in band_params):
        raise RoutingNotProven("RunStarted settings.band_params is not a list of parameter-name lists")
    boundaries = boundary_nodes(graph, bands, band_params)  # type: ignore[arg-type]
    check_cut(graph, bands, band_params, boundaries)  # type: ignore[arg-type]
    return boundaries


def routed_forward(
    graph: Graph, x: Tensor | tuple[Tensor, ...], state: Mapping[str, Tensor], profiles: Tensor,
    boundaries: Sequence[Sequence[str]],
) -> tuple[Any, ...]:
    """The user outputs of one routed forward (§6.4): the program with ``x`` (and profiles of ones), the
    verifier's mix at every boundary value and at the outputs. ``loss.backward()`` then yields the
    routed gradient in ``state``'s parameters."""
    r = ratios(profiles)
    inputs = program_inputs(graph, x, profiles.shape[1], profiles.dtype)
    return scale_outputs(run(graph, inputs, state, after=boundary_hook(boundaries, r)), r)
