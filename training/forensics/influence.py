"""Influence of training examples on a query, band by band, at given weights (specs/forensics.md §4).

At weights ``w`` the first-order change of the query loss of query example ``j`` when a step applies
example ``z``'s contribution in band ``k`` is ``-a_k * <g_{z,k}, G_{j,k}>``, where ``g_{z,k}`` is the
gradient of ``z``'s loss through the run's gate (so the routing multiplier of ``z``'s profile in band
``k`` is in it: a band ``z`` may not reach gets exactly zero), ``G_{j,k}`` the gradient of query example
``j``'s loss (profile 1 in every band: the model as it answers), each parameter's ``G`` scaled by its
param group's learning rate at the step, and ``a_k`` the step's weight of one example in band ``k``
(``1 / B`` of the mean loss, times the band's clip coefficient and the user's clip factor). The
influence ``a_k * <g_{z,k}, G_{j,k}>`` is positive when training on ``z`` lowered the query loss: ``z``
taught the behavior.

Per-example gradients come from one batched backward (``torch.autograd.grad(..., is_grads_batched=
True)``, vmap over the backward of the per-example losses), the way per-sample gradient libraries do,
on the same forward the step replays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Accumulator", "BandParams", "band_weights", "per_example_band_grads"]

#: The gate's clip epsilon (specs/routing.md §5): coefficient ``limit / (norm + CLIP_EPS)`` when below 1.
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class BandParams:
    """The run's band parameters (head first), each with its param group's index."""

    bands: list[list[Tensor]]
    groups: list[list[int]]


def per_example_band_grads(losses: Tensor, params: BandParams, *, retain_graph: bool,
                           scale: Sequence[Sequence[float]] | None = None) -> list[Tensor]:
    """Per band, the ``[n, P_k]`` float64 matrix of each example's loss gradient over the band's parameters
    (flattened in band order); ``scale[k][i]`` multiplies parameter ``i`` of band ``k`` (a learning rate)."""
    n = int(losses.shape[0])
    flat = [p for ps in params.bands for p in ps]
    eye = torch.eye(n, dtype=losses.dtype)
    grads = torch.autograd.grad(losses, flat, grad_outputs=eye, is_grads_batched=True, retain_graph=retain_graph,
                                allow_unused=True)
    out, pos = [], 0
    for k, ps in enumerate(params.bands):
        cols = []
        for i, p in enumerate(ps):
            g = grads[pos + i]
            g = torch.zeros((n, p.numel()), dtype=torch.float64) if g is None else g.reshape(n, -1).to(torch.float64)
            if scale is not None and scale[k][i] != 1.0:
                g = g * scale[k][i]
            cols.append(g)
        pos += len(ps)
        out.append(torch.cat(cols, 1) if cols else torch.zeros((n, 0), dtype=torch.float64))
    return out


def band_weights(norms: Sequence[float], limits: Sequence[float | None], clip_factor: float = 1.0) -> list[float]:
    """Per band, the clip coefficient a step applied (specs/routing.md §5) times the user's clip factor."""
    out = []
    for norm, limit in zip(norms, limits):
        coef = 1.0
        if limit is not None:
            c = float(limit) / (norm + CLIP_EPS)
            coef = c if c < 1.0 else 1.0
        out.append(coef * clip_factor)
    return out


class Accumulator:
    """Influence sums: per training example and query example, per band and query example, per step,
    and (optionally) each training example's self-influence."""

    def __init__(self, n_train: int, n_query: int, n_bands: int, n_steps: int, self_influence: bool = False) -> None:
        self.examples = torch.zeros((n_train, n_query), dtype=torch.float64)
        self.bands = torch.zeros((n_bands, n_query), dtype=torch.float64)
        self.steps = torch.zeros(n_steps, dtype=torch.float64)
        self.self_influence = torch.zeros(n_train, dtype=torch.float64) if self_influence else None

    def add(self, index: Tensor, train: Sequence[Tensor], query: Sequence[Tensor], weights: Tensor,
            step: int | None) -> None:
        """Add one batch: ``train[k]`` ``[B, P_k]``, ``query[k]`` ``[Q, P_k]``, ``weights`` ``[B, K]`` (each
        example's weight in each band at this step); ``index`` the batch's dataset indices."""
        total = torch.zeros((len(index), self.examples.shape[1]), dtype=torch.float64)
        for k, (g, G) in enumerate(zip(train, query)):
            if g.shape[1] == 0:
                continue
            s = (g @ G.T) * weights[:, k : k + 1]
            total += s
            self.bands[k] += s.sum(0)
            if self.self_influence is not None:
                self.self_influence.index_add_(0, index, weights[:, k] * (g * g).sum(1))
        self.examples.index_add_(0, index, total)
        if step is not None:
            self.steps[step] += float(total.sum()) / max(1, self.examples.shape[1])


def query_band_grads(forward: Callable[[], Tensor], params: BandParams, scale: Sequence[Sequence[float]],
                     seed: int) -> list[Tensor]:
    """The query examples' per-example band gradients at the current weights; ``forward`` gives their losses.
    Run under a fixed seed in a forked generator: dropout in the query's forward never moves the replay's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = forward()
        return per_example_band_grads(losses, params, retain_graph=False, scale=scale)
