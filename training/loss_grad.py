"""The run's loss and its gradient at the model output, computed without the autograd engine.

Why: at every ``optimizer.step()`` the recorder recomputes the registered loss on a detached copy of
the model's output and compares its gradient bit for bit with the one the user's backward sent
(specs/training.md §3.2, "Recognizing the loss"). Through ``torch.autograd.grad`` that costs about
55 microseconds of engine overhead a step for a ten-class output: on a small model, a tenth of the
whole training step. For the plain cases (``cross_entropy`` without label smoothing, ``nll_loss``;
a 2-D floating output and 1-D int64 labels; no autocast) this module calls the very kernels the
autograd graph of ``F.cross_entropy`` / ``F.nll_loss`` runs, in the same order with the same
arguments: ``_log_softmax`` then ``nll_loss_forward``; backward ``nll_loss_backward`` then
``_log_softmax_backward_data``, seeded with ``ones / divisor`` as ``DivBackward`` seeds it. The values
are therefore the autograd path's, bit for bit (tests/test_loss_grad.py checks it against
``torch.autograd.grad`` over random outputs, labels, dtypes and divisors). Every other case (label
smoothing, autocast, other shapes) returns ``None`` and the recorder takes the autograd path.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["direct_loss_grads"]

_NONE, _MEAN = 0, 1  # torch's Reduction::None, Reduction::Mean
_IGNORE_INDEX = -100  # F.cross_entropy / F.nll_loss default


def direct_loss_grads(name: str, settings: Mapping[str, Any], out: Tensor, labels: Tensor,
                      divisors: Sequence[int]) -> tuple[Tensor, list[Tensor], Tensor] | None:
    """The loss of ``out`` (detached) and ``labels``, per divisor ``d`` the gradient of ``loss / d``
    with respect to ``out``, and each example's loss (``reduction="none"``: ``nll_loss_forward`` with
    reduction None on the same log-probabilities, the kernels ``F.cross_entropy(..., reduction="none")``
    runs); ``None`` where this is not one of the plain cases above."""
    if settings.get("reduction", "mean") != "mean" or set(settings) - {"reduction", "label_smoothing"}:
        return None
    if name == "cross_entropy":
        if settings.get("label_smoothing", 0.0) != 0.0:
            return None
    elif name != "nll_loss":
        return None
    if (out.dim() != 2 or out.dtype not in (torch.float32, torch.float64) or labels.dim() != 1
            or labels.dtype != torch.int64 or labels.shape[0] != out.shape[0] or out.shape[0] == 0
            or torch.is_autocast_enabled("cpu") or out.device.type != "cpu" or labels.device != out.device):
        return None
    aten = torch.ops.aten
    with torch.no_grad():
        x = out.detach()
        logp = aten._log_softmax(x, 1, False) if name == "cross_entropy" else x
        loss, total_weight = aten.nll_loss_forward(logp, labels, None, _MEAN, _IGNORE_INDEX)
        grads = []
        for d in divisors:
            seed = torch.ones((), dtype=loss.dtype)
            if d != 1:
                seed = seed / d  # DivBackward's grad / other, with other the wrapped Python int
            g = aten.nll_loss_backward(seed, logp, labels, None, _MEAN, _IGNORE_INDEX, total_weight)
            if name == "cross_entropy":
                g = aten._log_softmax_backward_data(g, logp, 1, x.dtype)
            grads.append(g)
        per_example, _ = aten.nll_loss_forward(logp, labels, None, _NONE, _IGNORE_INDEX)
    return loss, grads, per_example
