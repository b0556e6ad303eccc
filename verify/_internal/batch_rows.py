"""Examples do not interact in the forward pass: a static proof over the program (specs/routing.md §6.3).

Abstract interpretation with concrete shapes. The program runs once on the real batch
(``gradledger.ledger.program.run``, without gradients, on copies of its buffers), and beside
every tensor value we carry an *owner* tensor of the same shape (int32):

- ``i >= 0``: the element depends on example ``i`` only (and on parameters and constants);
- ``FREE`` (-1): it depends on no example;
- ``MIXED`` (-2): it depends on two or more examples.

Each allowlisted op has a rule that computes the owners of its results from those of its
arguments, element by element where the op is a view (``reshape``, ``permute``, ``cat``, …: the
op itself is applied to the owners, so ``[B, T, D] -> [B*T, D] -> [B, T, D]`` keeps its row
blocks) and by combining over the dims an op reduces or contracts otherwise. An op without a
rule is refused. A user output, a boundary value or a buffer update that is not
*row-owned* (every element of row ``i`` owned by ``i`` or ``FREE``; buffers: all ``FREE``) is
refused, naming the node that first mixed (or displaced) examples.

After a boundary value passes, its owners are reset to its row index: a ``FREE`` element in row
``i`` is scaled by example ``i``'s coefficient, so it must stay with example ``i`` downstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from gradledger.ledger.program import SYM_OPS, Graph, Node, ProgramError, Ref, run
from gradledger.ledger.program import ops as program_ops

from .graph_routing import RoutingNotProven

__all__ = ["FREE", "MIXED", "BatchInteraction", "RULES", "check_batch_independent"]

FREE = -1
MIXED = -2
_BIG = 1 << 30


class BatchInteraction(RoutingNotProven):
    """The program lets examples interact, or uses an op the batch rules do not cover (§6.3)."""


# -- owner algebra -----------------------------------------------------------------------------


# Owners are kept *compressed*: same number of dims as the value, a dim of size 1 where the owner
# does not vary along it (it broadcasts to the value's shape). A batched activation [B, T, D]
# costs B integers, not B*T*D; view ops expand, apply the op, and compress again.


def _free(shape: Sequence[int]) -> Tensor:
    return torch.full((1,) * len(shape), FREE, dtype=torch.int32)


def _rows(shape: Sequence[int]) -> Tensor:
    """Owners of a batch-first value whose row ``i`` belongs to example ``i``."""
    b = shape[0]
    return torch.arange(b, dtype=torch.int32).reshape((b,) + (1,) * (len(shape) - 1))


def _compress(o: Tensor) -> Tensor:
    for d in range(o.dim()):
        if o.shape[d] > 1 and bool((o == o.narrow(d, 0, 1)).all()):
            o = o.narrow(d, 0, 1)
    return o.contiguous()


def _full(o: Tensor, like: Tensor) -> Tensor:
    """The owner at the value's full shape (a view)."""
    return o.expand(like.shape)


def _comb(*owners: Tensor | None) -> Tensor:
    """Element-wise (broadcasting): FREE is neutral, equal owners stay, different owners mix."""
    out: Tensor | None = None
    for o in owners:
        if o is None:
            continue
        if out is None:
            out = o
            continue
        out = torch.where(out == FREE, o, torch.where((o == FREE) | (o == out), out, torch.full_like(out, MIXED)))
    if out is None:
        return _free(())
    return out


def _red(o: Tensor, dims: Sequence[int] | None) -> Tensor:
    """Combine owners over ``dims`` (all when None), keeping them as size-1 dims."""
    if o.dim() == 0:
        return o
    dims = list(range(o.dim())) if dims is None else sorted({d % o.dim() for d in dims})
    if not dims:
        return o
    if any(o.shape[d] == 0 for d in dims):
        shape = [1 if d in dims else s for d, s in enumerate(o.shape)]
        return _free(shape)
    mn = torch.where(o == FREE, torch.full_like(o, _BIG), o).amin(dim=dims, keepdim=True)
    mx = o.amax(dim=dims, keepdim=True)
    return torch.where(mn == _BIG, torch.full_like(mn, FREE), torch.where(mn == mx, mn, torch.full_like(mn, MIXED)))


def _all(o: Tensor | None) -> Tensor | None:
    return None if o is None else _red(o, None).reshape(())


def _fit(o: Tensor, like: Tensor, what: str) -> Tensor:
    """``o`` as a compressed owner of ``like``: leading dims added, every dim 1 or the value's size."""
    if o.dim() < like.dim():
        o = o.reshape((1,) * (like.dim() - o.dim()) + tuple(o.shape))
    if o.dim() != like.dim() or any(a not in (1, b) for a, b in zip(o.shape, like.shape)):
        raise BatchInteraction(f"{what}: the batch rule's shape {list(o.shape)} does not fit the result "
                               f"{list(like.shape)}")
    return o


# -- binding a node's arguments to its schema --------------------------------------------------


@dataclass
class _Call:
    node: Node
    args: dict[str, Any]  # argument name -> real value
    owners: dict[str, Any]  # argument name -> owner (same structure; None for non-tensors)
    result: Any  # the real result(s)

    def where(self) -> str:
        scope = self.node.module_stack[-1] if self.node.module_stack else "(top level)"
        return f"node {self.node.name!r} ({self.node.op}) in module {scope}"


def _bind(node: Node, real: list[Any], kw: Mapping[str, Any]) -> dict[str, Any]:
    schema = program_ops.overload(node.op.removeprefix("aten."))._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(real) and not arg.kwarg_only:
            out[arg.name] = real[i]
        elif arg.name in kw:
            out[arg.name] = kw[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _tensor_owner(c: _Call, name: str) -> Tensor | None:
    o = c.owners.get(name)
    return o if isinstance(o, Tensor) else None


# -- the rules (normative table: specs/routing.md §6.3) ----------------------------------------

Rule = Callable[[_Call], Any]


def _pointwise(c: _Call) -> Tensor:
    """Result element depends on the broadcast elements at its position of every tensor argument."""
    owners = [o for o in c.owners.values() if isinstance(o, Tensor)]
    return _fit(_comb(*owners), c.result, c.where())


def _first(c: _Call) -> Tensor:
    """Same positions as the first argument (dtype casts, copies, ``type_as``)."""
    o = next(iter(c.owners.values()))
    return _fit(o, c.result, c.where())


def _factory(c: _Call) -> Tensor:
    return _free(c.result.shape)


def _as_view(c: _Call) -> Any:
    """Apply the op itself to the owners: exact for views and concatenations."""
    name = c.node.op.removeprefix("aten.")
    if name in ("view.default", "_unsafe_view.default"):
        name = "reshape.default"  # owners need not be contiguous; the row-major order is the same
    fn = program_ops.overload(name)
    args = dict(c.args)
    for k, o in c.owners.items():
        if isinstance(o, Tensor):
            args[k] = _full(o, c.args[k])
        elif isinstance(o, (list, tuple)) and any(isinstance(t, Tensor) for t in o):
            args[k] = [_full(t, r) if isinstance(t, Tensor) else t for t, r in zip(o, c.args[k])]
    if name == "reshape.default" and "size" in args:
        args["shape"] = args.pop("size")
    out = fn(**args)
    return [_compress(t) for t in out] if isinstance(out, (list, tuple)) else _compress(out)


def _reduction(dim_arg: str | None) -> Rule:
    def rule(c: _Call) -> Tensor:
        o = c.owners["self"]
        dims = c.args.get(dim_arg) if dim_arg else None
        if isinstance(dims, int):
            dims = [dims]
        n = o.dim()
        reduced = set(range(n)) if not dims else {d % max(n, 1) for d in dims}
        r = _red(o, sorted(reduced))
        if not c.args.get("keepdim"):
            r = r.reshape([r.shape[d] for d in range(n) if d not in reduced])
        return _fit(r, c.result, c.where())
    return rule


def _along(arg: str) -> Rule:
    """Softmax-like: each result element depends on its whole line along ``dim``."""
    def rule(c: _Call) -> Tensor:
        return _fit(_red(c.owners[arg], [c.args["dim"]]), c.result, c.where())
    return rule


def _linear(c: _Call) -> Tensor:
    x, w, b = c.owners["input"], c.owners["weight"], _tensor_owner(c, "bias")
    rows_w = _red(w, [w.dim() - 1]).reshape(-1) if w.dim() == 2 else _all(w)
    return _fit(_comb(_red(x, [-1]), rows_w, b), c.result, c.where())


def _mm(first: str, second: str, extra: str | None = None) -> Rule:
    def rule(c: _Call) -> Tensor:
        a, b = c.owners[first], c.owners[second]
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        o = _comb(_red(a2, [-1]), _red(b2, [-2]))  # [..., m, 1] with [..., 1, p]
        if a.dim() == 1:
            o = o.squeeze(-2)
        if b.dim() == 1:
            o = o.squeeze(-1)
        if extra is not None:
            o = _comb(o, c.owners[extra])
        return _fit(o, c.result, c.where())
    return rule


def _norm_last(c: _Call) -> Any:
    """layer_norm / rms_norm: statistics over the trailing ``normalized_shape`` dims."""
    x = c.owners["input"]
    k = len(c.args["normalized_shape"])
    stats = _red(x, list(range(x.dim() - k, x.dim())))
    out = _comb(stats, _tensor_owner(c, "weight"), _tensor_owner(c, "bias"))
    if isinstance(c.result, (tuple, list)):  # native_layer_norm: (out, mean, rstd)
        return [_fit(out, c.result[0], c.where()), *(_fit(stats, t, c.where()) for t in c.result[1:])]
    return _fit(out, c.result, c.where())


def _group_norm(c: _Call) -> Tensor:
    x = c.owners["input"]
    stats = _red(x, list(range(1, x.dim()))) if x.dim() > 1 else _red(x, None)
    return _fit(_comb(stats, _all(_tensor_owner(c, "weight")), _all(_tensor_owner(c, "bias"))), c.result, c.where())


def _batch_norm(training_arg: str | None, *, batch_stats: bool = False) -> Rule:
    """``training_arg`` names the flag that selects batch statistics; ``batch_stats``: always uses them."""
    def rule(c: _Call) -> Any:
        if batch_stats or (training_arg is not None and c.args.get(training_arg)):
            raise BatchInteraction(
                f"{c.where()}: batch normalization in training mode normalizes each example with statistics of "
                "the whole batch (and updates running statistics from it), so examples interact; export the "
                "model with BatchNorm in eval mode, or use GroupNorm or LayerNorm")
        x = c.owners["input"]
        stats = [_all(_tensor_owner(c, n)) for n in ("weight", "bias", "running_mean", "running_var")]
        out = _comb(x, *stats)
        if isinstance(c.result, (tuple, list)):
            rest = _comb(_all(x), *stats)
            return [_fit(out, c.result[0], c.where()), *(_fit(rest, t, c.where()) for t in c.result[1:])]
        return _fit(out, c.result, c.where())
    return rule


def _embedding(c: _Call) -> Tensor:
    if c.args.get("scale_grad_by_freq"):
        raise BatchInteraction(f"{c.where()}: scale_grad_by_freq scales each example's gradient by how often "
                               "its tokens occur in the whole batch, so examples interact")
    w, idx = c.owners["weight"], c.owners["indices"]
    rows = _red(w, [1]).reshape(-1) if w.dim() == 2 else _all(w).reshape(1)
    picked = rows[c.args["indices"].long()] if rows.numel() > 1 else rows.reshape(())
    return _fit(_comb(picked, idx).unsqueeze(-1), c.result, c.where())


def _conv(c: _Call) -> Tensor:
    x, w = c.owners["input"], c.owners["weight"]
    batched = x.dim() == w.dim()
    xs = _red(x, list(range(1, x.dim()))) if batched else _red(x, None)
    return _fit(_comb(xs, _all(w), _all(_tensor_owner(c, "bias"))), c.result, c.where())


def _pool(spatial: int) -> Rule:
    def rule(c: _Call) -> Any:
        x = c.owners["self"]
        o = _red(x, list(range(x.dim() - spatial, x.dim())))
        if isinstance(c.result, (tuple, list)):
            return [_fit(o, t, c.where()) for t in c.result]
        return _fit(o, c.result, c.where())
    return rule


def _attention(c: _Call) -> Tensor:
    q, k, v = c.owners["query"], c.owners["key"], c.owners["value"]
    kv_dims = [-3, -2, -1] if c.args.get("enable_gqa") else [-2, -1]
    o = _comb(_red(q, [-1]), _red(k, kv_dims), _red(v, kv_dims))
    mask = _tensor_owner(c, "attn_mask")
    if mask is not None:
        o = _comb(o, _red(mask, [-1]))
    return _fit(o, c.result, c.where())


def _index_select(c: _Call) -> Tensor:
    """Conservative: data-chosen positions along ``dim`` may come from any example on that line."""
    line = _red(c.owners["self"], [c.args["dim"]])
    return _fit(_comb(line, _all(c.owners["index"])), c.result, c.where())


def _gather(c: _Call) -> Tensor:
    """``out[p] = self[p with its dim coordinate replaced by index[p]]``: conservative like
    index_select: the whole line along ``dim`` at the same other coordinates, and the index element."""
    dim = c.args["dim"] % max(c.result.dim(), 1)
    line = _red(c.owners["self"], [dim])
    for d in range(line.dim()):
        if d != dim and line.shape[d] > 1:
            line = line.narrow(d, 0, c.result.shape[d])  # the other coordinates are the result's own
    return _fit(_comb(line, c.owners["index"]), c.result, c.where())


def _index(c: _Call) -> Tensor:
    """``self[indices]`` (advanced indexing, ``index.Tensor``). The op applied to the owners of ``self``
    gives each result element's source element exactly (the index values are the real ones). The index
    values' own owners join at the element's position when every index is a tensor (they broadcast
    together, then over ``self``'s remaining dims); with a ``None`` slice among them, all of them join."""
    gathered = torch.ops.aten.index.Tensor(_full(c.owners["self"], c.args["self"]), c.args["indices"])
    owners = [o for o in (c.owners.get("indices") or []) if isinstance(o, Tensor)]
    if owners and not all(bool((o == FREE).all()) for o in owners):
        if all(i is not None for i in c.args["indices"]):
            idx = _comb(*owners)  # broadcasts like the indices themselves (right-aligned)
            lead = gathered.dim() - (c.args["self"].dim() - len(c.args["indices"])) - idx.dim()
            idx = idx.reshape((1,) * lead + tuple(idx.shape) + (1,) * (gathered.dim() - lead - idx.dim()))
            gathered = _comb(gathered, idx)
        else:
            gathered = _comb(gathered, *[_all(o) for o in owners])
    return _fit(_compress(gathered), c.result, c.where())


def _size(c: _Call) -> None:
    return None


def _assert(c: _Call) -> None:
    return None


_POINTWISE = """relu.default gelu.default tanh.default sigmoid.default silu.default hardtanh.default
leaky_relu.default elu.default softplus.default exp.default log.default sqrt.default rsqrt.default neg.default
abs.default erf.default pow.Tensor_Scalar pow.Tensor_Tensor add.Tensor add.Scalar sub.Tensor sub.Scalar
rsub.Scalar mul.Tensor mul.Scalar div.Tensor div.Scalar div.Tensor_mode clamp.default clamp_min.default
dropout.default feature_dropout.default where.self gt.Scalar gt.Tensor lt.Scalar lt.Tensor ge.Scalar ge.Tensor
le.Scalar le.Tensor eq.Scalar eq.Tensor ne.Scalar ne.Tensor logical_not.default bitwise_not.default
masked_fill.Scalar masked_fill.Tensor tril.default triu.default contiguous.default clone.default detach.default
alias.default lift_fresh_copy.default _to_copy.default to.dtype to.dtype_layout to.device __and__.Tensor""".split()

_VIEWS = """view.default reshape.default _unsafe_view.default permute.default transpose.int t.default
unsqueeze.default squeeze.dim squeeze.dims squeeze.default flatten.using_ints unflatten.int expand.default
slice.Tensor select.int narrow.default cat.default stack.default split.Tensor split_with_sizes.default
chunk.default unbind.int""".split()

#: Op -> rule. Normative: specs/routing.md §6.3 lists the same table in words.
RULES: dict[str, Rule] = {
    **{f"aten.{n}": _pointwise for n in _POINTWISE},
    **{f"aten.{n}": _as_view for n in _VIEWS},
    "aten.native_dropout.default": lambda c: [_first(c), _first(c)],
    "aten.type_as.default": _first,
    "aten.add_.Tensor": _pointwise,  # in place on a buffer: the update must stay FREE (checked)
    **{f"aten.{n}": _factory for n in ("zeros_like.default", "ones_like.default", "full_like.default",
                                       "zeros.default", "ones.default", "full.default", "new_zeros.default",
                                       "new_ones.default", "arange.default", "arange.start", "arange.start_step")},
    "aten.linear.default": _linear,
    "aten.mm.default": _mm("self", "mat2"),
    "aten.matmul.default": _mm("self", "other"),
    "aten.bmm.default": _mm("self", "mat2"),
    "aten.addmm.default": _mm("mat1", "mat2", "self"),
    "aten.baddbmm.default": _mm("batch1", "batch2", "self"),
    "aten.softmax.int": _along("self"),
    "aten._softmax.default": _along("self"),
    "aten.log_softmax.int": _along("self"),
    "aten._log_softmax.default": _along("self"),
    "aten.layer_norm.default": _norm_last,
    "aten.native_layer_norm.default": _norm_last,
    "aten.rms_norm.default": _norm_last,
    "aten.group_norm.default": _group_norm,
    "aten.batch_norm.default": _batch_norm("training"),
    "aten.native_batch_norm.default": _batch_norm("training"),
    "aten._native_batch_norm_legit.default": _batch_norm("training"),
    "aten._native_batch_norm_legit.no_stats": _batch_norm(None, batch_stats=True),
    "aten._native_batch_norm_legit_functional.default": _batch_norm("training"),
    "aten._native_batch_norm_legit_no_training.default": _batch_norm(None),
    "aten.embedding.default": _embedding,
    "aten.conv1d.default": _conv,
    "aten.conv2d.default": _conv,
    "aten.convolution.default": _conv,
    "aten.max_pool2d.default": _pool(2),
    "aten.max_pool2d_with_indices.default": _pool(2),
    "aten.avg_pool2d.default": _pool(2),
    "aten.adaptive_avg_pool2d.default": _pool(2),
    "aten._adaptive_avg_pool2d.default": _pool(2),
    "aten.adaptive_avg_pool1d.default": _pool(1),
    "aten.scaled_dot_product_attention.default": _attention,
    "aten.index_select.default": _index_select,
    "aten.gather.default": _gather,
    "aten.index.Tensor": _index,
    "aten.mean.dim": _reduction("dim"),
    "aten.mean.default": _reduction(None),
    "aten.sum.dim_IntList": _reduction("dim"),
    "aten.sum.default": _reduction(None),
    "aten.amax.default": _reduction("dim"),
    "aten.argmax.default": _reduction("dim"),  # an index along dim (or of the flattened value): its line's
    "aten.argmin.default": _reduction("dim"),
    "aten.sym_size.int": _size,
    "aten._assert_tensor_metadata.default": _assert,
}

#: Ops after which a value may hold examples along no single dim (checked to name the culprit).
_RESHAPES = frozenset(f"aten.{n}" for n in ("view.default", "reshape.default", "_unsafe_view.default",
                                            "flatten.using_ints", "unflatten.int"))


def _aligned(o: Tensor) -> bool:
    """Whether some dim alone tells each element's example (or no element has one)."""
    if o.dim() == 0 or not bool((o >= 0).any()):
        return True
    return any(not bool((_red(o, [e for e in range(o.dim()) if e != d]) == MIXED).any()) for d in range(o.dim()))


def _row_owned(o: Tensor, batch: int) -> bool:
    if o.dim() == 0:
        return False
    rows = _rows((batch,) + tuple(o.shape[1:]))  # o's dim 0 is the batch, or 1 (broadcast)
    return bool(((o == rows) | (o == FREE)).all())


# -- the interpretation ------------------------------------------------------------------------


def _resolve(value: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        return [_resolve(v, env) for v in value]
    return value


def check_batch_independent(
    graph: Graph,
    inputs: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    boundaries: Sequence[Sequence[str]] = (),
) -> None:
    """Prove that no example's result depends on another example (specs/routing.md §6.3).

    ``inputs``: the user inputs of one batch (each batch-first, one batch size); ``state``: the
    program's state by name, as for ``run``. Only shapes and index values matter: the program
    runs once without gradients on copies of its buffers and under a forked RNG, so nothing the
    caller holds changes. ``boundaries`` (from ``boundary_nodes``): their values must be
    row-owned too. The proof holds for this batch size; call it once per distinct input shape.
    Raises ``BatchInteraction`` naming the node and op.
    """
    sizes = {t.shape[0] for t in inputs.values() if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1 or any(not isinstance(t, Tensor) or t.dim() == 0 for t in inputs.values()):
        raise BatchInteraction("every user input must be a tensor with the batch as its first dim, one batch size")
    (batch,) = sizes
    boundary_of = {v: k for k, vs in enumerate(boundaries) for v in vs}
    owners: dict[str, Any] = {}
    mixed_at: dict[str, str] = {}  # value -> the node where its examples were first mixed or displaced
    for spec in graph.inputs:
        if spec.kind == "user_input":
            owners[spec.name] = _rows(inputs[spec.name].shape)
        else:
            assert spec.target is not None
            t = state.get(spec.target)
            owners[spec.name] = _free(t.shape) if isinstance(t, Tensor) else None
    values: dict[str, Any] = {}

    def after(node: Node, value: Any) -> Any:
        try:
            return interpret(node, value)
        except BatchInteraction:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            # A rule that cannot be applied proves nothing: refused, never skipped.
            raise BatchInteraction(f"node {node.name!r} ({node.op}): its batch rule could not be applied: "
                                   f"{str(exc)[:200]}") from None

    def interpret(node: Node, value: Any) -> Any:
        rule = RULES.get(node.op)
        if node.op in SYM_OPS:
            rule = _size
        if rule is None:
            raise BatchInteraction(f"node {node.name!r} calls {node.op}, for which no batch rule is defined: "
                                   "it cannot be shown that examples do not interact")
        real = [_resolve(a, values) for a in node.args]
        kw = {k: _resolve(v, values) for k, v in node.kwargs.items()}
        own = [_resolve(a, owners) for a in node.args]
        own_kw = {k: _resolve(v, owners) for k, v in node.kwargs.items()}
        if rule is _size:
            result = None
        else:
            call = _Call(node, _bind(node, real, kw), _bind(node, own, own_kw), value)
            result = rule(call)
            if node.op in program_ops.IN_PLACE:
                _in_place(call, node, result)
        multi = isinstance(value, (list, tuple))
        produced = list(value) if multi else [value]
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        if rule is _size or rule is _assert:
            results = [None] * len(produced)
        if len(results) != len(produced) or (node.outputs and len(node.outputs) != len(produced)):
            raise BatchInteraction(f"node {node.name!r} ({node.op}): its results do not match its named outputs")
        inherited = next((mixed_at[r] for a in (*node.args, *node.kwargs.values())
                          for r in _ref_names(a) if r in mixed_at), None)
        for name, v, o in zip(node.outputs, produced, results):
            if name is None:
                continue
            values[name] = v
            if isinstance(v, Tensor):
                if not isinstance(o, Tensor):
                    raise BatchInteraction(f"node {node.name!r} ({node.op}): the batch rule gives no owner of the "
                                           "result")
                o = _fit(o, v, f"node {node.name!r} ({node.op})")
                flagged = bool((o == MIXED).any()) or (
                    (node.op in _RESHAPES or inherited is not None) and not _aligned(o))
                if flagged:
                    scope = node.module_stack[-1] if node.module_stack else "(top level)"
                    mixed_at[name] = inherited or f"node {node.name!r} ({node.op}) in module {scope}"
                if name in boundary_of:
                    o = _check_rows(o, name, f"the value of boundary {boundary_of[name]}", mixed_at, batch, v)
            owners[name] = o
        return value

    def _in_place(call: _Call, node: Node, result: Any) -> None:
        target = node.args[0]
        if not isinstance(result, Tensor) or bool((result != FREE).any()):
            raise BatchInteraction(f"{call.where()} writes example data into the buffer "
                                   f"{target.name if isinstance(target, Ref) else target!r}")
        if isinstance(target, Ref):
            owners[target.name] = result

    for k, t in inputs.items():
        values[k] = t
    for spec in graph.inputs:
        if spec.kind != "user_input" and spec.target in state:
            values[spec.name] = state[spec.target]
    # Copies of the buffers and constants (a buffer update must not reach the caller's state);
    # parameters are only read.
    param_names = {s.target for s in graph.inputs if s.kind == "parameter"}
    work = {n: (t if n in param_names else t.clone()) for n, t in state.items()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            results = run(graph, dict(inputs), work, after=after)
    except ProgramError as exc:
        raise BatchInteraction(f"the program could not be run to check batch independence: {exc}") from None
    user_outputs = [o for o in graph.outputs if o.kind == "user_output"]
    for spec, value in zip(user_outputs, results):
        if spec.name is None or not isinstance(value, Tensor):
            continue
        _check_rows(owners[spec.name], spec.name, "the model output", mixed_at, batch, value)
    for spec in graph.outputs:
        if spec.kind == "buffer_mutation" and spec.name is not None:
            o = owners.get(spec.name)
            if isinstance(o, Tensor) and bool((o != FREE).any()):
                origin = mixed_at.get(spec.name, f"node producing {spec.name!r}")
                raise BatchInteraction(f"the update of buffer {spec.target!r} depends on the examples "
                                       f"(via {origin}): state carried between steps must not")


def _ref_names(value: Any) -> list[str]:
    if isinstance(value, Ref):
        return [value.name]
    if isinstance(value, (tuple, list)):
        return [r for v in value for r in _ref_names(v)]
    return []


def _check_rows(o: Tensor, name: str, what: str, mixed_at: Mapping[str, str], batch: int, value: Tensor) -> Tensor:
    """Refuse a value whose row ``i`` holds anything of another example; return its row owners."""
    if value.dim() == 0 or value.shape[0] != batch:
        raise BatchInteraction(f"{what} ({name!r}) has shape {list(value.shape)}: it must have the batch ({batch}) "
                               "as its first dim")
    if not _row_owned(o, batch):
        if o.dim() > 0 and name not in mixed_at and not bool((o == MIXED).any()):
            origin = f"value {name!r}, whose rows do not follow the examples"
        else:
            origin = mixed_at.get(name, f"value {name!r}")
        raise BatchInteraction(f"{what} ({name!r}) is not a per-example result: examples interact at {origin}")
    return _rows(value.shape)
