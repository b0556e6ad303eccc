"""The operator allowlist (normative: specs/replay.md §2.3 points here) and the symbolic-int operators.

A program node may call only an ATen overload named in ``ATEN_OPS`` (pure tensor math, shape and
view ops, the random ops that draw from torch's default generator like eager training does) or a
Python integer operator in ``SYM_OPS``, which this module evaluates itself on Python ints only.
Nothing outside these tables is ever looked up: higher-order ops, custom ops, ops that touch files,
RNG state or the network are refused with the op's name.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .errors import ProgramError

#: What ``torch.export.export(..., strict=False)`` emits (training IR) for the models of tests/,
#: bench/ and the demo (MLPs, the gate, transformers, CNNs with BatchNorm), and their close kin.
ATEN_OPS: frozenset[str] = frozenset({
    # linear algebra
    "linear.default", "addmm.default", "mm.default", "bmm.default", "baddbmm.default", "matmul.default",
    # activations and pointwise math
    "relu.default", "gelu.default", "tanh.default", "sigmoid.default", "silu.default", "hardtanh.default",
    "leaky_relu.default", "elu.default", "softplus.default", "exp.default", "log.default", "sqrt.default",
    "rsqrt.default", "neg.default", "abs.default", "erf.default", "pow.Tensor_Scalar", "pow.Tensor_Tensor",
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "mul.Tensor", "mul.Scalar",
    "div.Tensor", "div.Scalar", "div.Tensor_mode", "clamp.default", "clamp_min.default",
    "softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default",
    # dropout (draws from the default generator, which replay seeds per step)
    "dropout.default", "native_dropout.default", "feature_dropout.default",
    # normalization
    "layer_norm.default", "native_layer_norm.default", "group_norm.default", "rms_norm.default",
    "batch_norm.default", "native_batch_norm.default", "_native_batch_norm_legit.default",
    "_native_batch_norm_legit.no_stats", "_native_batch_norm_legit_no_training.default",
    "_native_batch_norm_legit_functional.default",
    # embeddings, convolution, pooling, attention
    "embedding.default", "conv1d.default", "conv2d.default", "convolution.default", "max_pool2d.default",
    "max_pool2d_with_indices.default", "avg_pool2d.default", "adaptive_avg_pool1d.default",
    "adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default", "scaled_dot_product_attention.default",
    # shapes and views
    "view.default", "reshape.default", "_unsafe_view.default", "permute.default", "transpose.int", "t.default",
    "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default", "flatten.using_ints", "unflatten.int",
    "expand.default", "contiguous.default", "clone.default", "detach.default", "alias.default", "slice.Tensor",
    "select.int", "narrow.default", "cat.default", "stack.default", "split.Tensor", "split_with_sizes.default",
    "chunk.default", "unbind.int", "index_select.default", "gather.default", "index.Tensor", "sym_size.int",
    # reductions
    "mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default", "argmax.default", "argmin.default",
    # comparisons, masks, selection
    "where.self", "gt.Scalar", "gt.Tensor", "lt.Scalar", "lt.Tensor", "ge.Scalar", "ge.Tensor", "le.Scalar",
    "le.Tensor", "eq.Scalar", "eq.Tensor", "ne.Scalar", "ne.Tensor", "logical_not.default", "bitwise_not.default",
    "__and__.Tensor",
    "masked_fill.Scalar", "masked_fill.Tensor", "tril.default", "triu.default",
    # factories and casts (CPU only: every device argument is checked to be the CPU)
    "zeros_like.default", "ones_like.default", "full_like.default", "zeros.default", "ones.default",
    "full.default", "new_zeros.default", "new_ones.default", "arange.default", "arange.start", "arange.start_step",
    "lift_fresh_copy.default",
    "_to_copy.default", "to.dtype", "to.dtype_layout", "to.device", "type_as.default",
    "_assert_tensor_metadata.default",
    # in place: only on a buffer (BatchNorm's num_batches_tracked += 1), checked by the parser
    "add_.Tensor",
})

#: In-place overloads: their first argument must be a buffer of the program.
IN_PLACE: frozenset[str] = frozenset({"add_.Tensor"})

_INT_LIMIT = 1 << 62


def _int_op(fn: Callable[[int, int], int], a: Any, b: Any) -> int:
    if type(a) is not int or type(b) is not int:
        raise ProgramError("a symbolic-size operator got a value that is not an int")
    out = fn(a, b)
    if not -_INT_LIMIT < out < _INT_LIMIT:
        raise ProgramError("a symbolic-size operator overflowed")
    return out


def _floordiv(a: int, b: int) -> int:
    if b == 0:
        raise ProgramError("a symbolic-size division by zero")
    return a // b


def _mod(a: int, b: int) -> int:
    if b == 0:
        raise ProgramError("a symbolic-size modulo by zero")
    return a % b


#: Python operators on symbolic ints (``_operator.mul`` in the archive), evaluated here on ints only.
SYM_OPS: dict[str, Callable[[Any, Any], int]] = {
    "_operator.add": functools.partial(_int_op, lambda a, b: a + b),
    "_operator.sub": functools.partial(_int_op, lambda a, b: a - b),
    "_operator.mul": functools.partial(_int_op, lambda a, b: a * b),
    "_operator.floordiv": functools.partial(_int_op, _floordiv),
    "_operator.mod": functools.partial(_int_op, _mod),
}


@functools.lru_cache(maxsize=None)
def overload(op: str) -> torch._ops.OpOverload:
    """The ``torch.ops.aten`` overload for an allowlisted ``op`` (``"linear.default"``); nothing else."""
    if op not in ATEN_OPS:
        raise ProgramError(f"model program calls {op!r}, which is not on the operator allowlist")
    packet, _, name = op.partition(".")
    try:
        return getattr(getattr(torch.ops.aten, packet), name)
    except (AttributeError, RuntimeError):
        raise ProgramError(f"model program calls {op!r}, which this torch does not provide") from None


@functools.lru_cache(maxsize=None)
def returns_one(op: str) -> bool:
    """Whether the overload returns a single value (not a tuple and not a list)."""
    rets = overload(op)._schema.returns
    return len(rets) == 1 and not isinstance(rets[0].type, torch.ListType)
