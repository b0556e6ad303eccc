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

Per-example gradients: ``vmap(grad(...))`` over the examples through the program (``torch.func``, as
Opacus's functorch grad sampler does), each example its own forward and backward; where the program
draws random numbers (dropout), per-example forwards would draw other masks than the step's, so the
gradients come from one batched backward of the step's own forward (``torch.autograd.grad(...,
is_grads_batched=True)``), exact but quadratic in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from gradledger.ledger.program import ProgramError

from ..gate import CLIP_EPS

__all__ = ["Accumulator", "BandParams", "ExampleGrads", "band_weights", "per_example_band_grads"]

@dataclass(frozen=True)
class BandParams:
    """The run's band parameters (head first), each with its param group's index and its state name in
    the program module."""

    bands: list[list[Tensor]]
    groups: list[list[int]]
    names: list[list[str]]


def _split(flat: Sequence[Tensor | None], params: BandParams, n: int,
           scale: Sequence[Sequence[float]] | None) -> list[list[Tensor]]:
    out, pos = [], 0
    for k, ps in enumerate(params.bands):
        band = []
        for i, p in enumerate(ps):
            g = flat[pos + i]
            g = torch.zeros((n, p.numel()), dtype=p.dtype) if g is None else g.reshape(n, -1)
            if scale is not None and scale[k][i] != 1.0:
                g = g * scale[k][i]
            band.append(g)
        pos += len(ps)
        out.append(band)
    return out


class ExampleGrads:
    """Per-example band gradients of ``loss(module(*inputs, profiles), targets)`` (one example's loss each):
    by ``vmap(grad(...))`` while the program draws no random numbers, else by the batched backward."""

    def __init__(self, module: Any, params: BandParams, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.module, self.params, self.loss = module, params, loss
        self.names = [n for ns in params.names for n in ns]  # the parameters' state names, flat
        self.functional = True

    def functional_grads(self, inputs: Sequence[Tensor], profiles: Tensor, targets: Tensor, *,
                         scale: Sequence[Sequence[float]] | None = None) -> list[list[Tensor]] | None:
        """The ``vmap(grad)`` gradients, or None (from then on) where the program draws random numbers."""
        if not self.functional:
            return None
        try:
            return _split(self._vmapped(inputs, profiles, targets), self.params, int(targets.shape[0]), scale)
        except (RuntimeError, ProgramError) as exc:  # the interpreter reports a node's failure as ProgramError
            if "random" not in str(exc):
                raise
            self.functional = False  # dropout: the masks must be the forward's own
            return None

    def __call__(self, inputs: Sequence[Tensor], profiles: Tensor, targets: Tensor, *,
                 scale: Sequence[Sequence[float]] | None = None, out: Tensor | None = None) -> list[list[Tensor]]:
        """``out``: the batch's own forward (graph kept), for the fallback; without it one is run."""
        found = self.functional_grads(inputs, profiles, targets, scale=scale)
        if found is not None:
            return found
        if out is None:
            out = self.module(*inputs, profiles)
        return per_example_band_grads(self.loss(out, targets), self.params, retain_graph=True, scale=scale)

    def _vmapped(self, inputs: Sequence[Tensor], profiles: Tensor, targets: Tensor) -> list[Tensor]:
        from torch.func import grad, vmap

        self.module.check(*inputs, profiles)
        values = [p.detach() for ps in self.params.bands for p in ps]  # this step's weights

        def one(vals: list[Tensor], xs: tuple[Tensor, ...], prof: Tensor, target: Tensor) -> Tensor:
            out = self.module.call_with(dict(zip(self.names, vals)), *(x[None] for x in xs), prof[None])
            return self.loss(out, target[None]).sum()

        return list(vmap(grad(one), in_dims=(None, 0, 0, 0))(values, tuple(inputs), profiles, targets))


def per_example_band_grads(losses: Tensor, params: BandParams, *, retain_graph: bool,
                           scale: Sequence[Sequence[float]] | None = None) -> list[list[Tensor]]:
    """Per band, per parameter, the ``[n, numel]`` matrix of each example's loss gradient (flattened, in the
    parameter's dtype; a parameter no example reaches gives zeros); ``scale[k][i]`` multiplies parameter
    ``i`` of band ``k`` (a learning rate). Kept per parameter: no copy into one band-wide matrix."""
    n = int(losses.shape[0])
    flat = [p for ps in params.bands for p in ps]
    eye = torch.eye(n, dtype=losses.dtype)
    grads = torch.autograd.grad(losses, flat, grad_outputs=eye, is_grads_batched=True, retain_graph=retain_graph,
                                allow_unused=True)
    return _split(grads, params, n, scale)


def band_weights(norms: Sequence[float], limits: Sequence[float | None], clip_factor: float = 1.0) -> list[float]:
    """Per band, the clip coefficient a step applied (specs/routing.md §5: ``limit / (norm + CLIP_EPS)``
    when below 1) times the user's clip factor."""
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

    def add(self, index: Tensor, train: Sequence[Sequence[Tensor]], query: Sequence[Sequence[Tensor]],
            weights: Tensor, step: int | None) -> None:
        """Add one batch: ``train[k][i]`` ``[B, numel]`` and ``query[k][i]`` ``[Q, numel]`` per band parameter,
        ``weights`` ``[B, K]`` (each example's weight in each band at this step); ``index`` the batch's dataset
        indices. The inner products run in the parameters' dtype (float32: a first-order score, not a replayed
        value), each parameter's added into the float64 sums."""
        total = torch.zeros((len(index), self.examples.shape[1]), dtype=torch.float64)
        for k, (gs, Gs) in enumerate(zip(train, query)):
            if not gs:
                continue
            dots = sum((g @ G.T).to(torch.float64) for g, G in zip(gs, Gs))
            s = dots * weights[:, k : k + 1]
            total += s
            self.bands[k] += s.sum(0)
            if self.self_influence is not None:
                own = sum((g * g).sum(1).to(torch.float64) for g in gs)
                self.self_influence.index_add_(0, index, weights[:, k] * own)
        self.examples.index_add_(0, index, total)
        if step is not None:
            self.steps[step] += float(total.sum()) / max(1, self.examples.shape[1])


def query_band_grads(grads: ExampleGrads, inputs: Sequence[Tensor], targets: Tensor, n_bands: int,
                     scale: Sequence[Sequence[float]], seed: int) -> list[list[Tensor]]:
    """The query examples' per-example band gradients at the current weights (profile 1 in every band);
    ``targets`` is what ``grads``' loss reads (``Query.rows()``).
    Under a fixed seed in a forked generator: dropout in the query's forward never moves the replay's."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's: torch.manual_seed also queues every device's
        ones = torch.ones((int(targets.shape[0]), n_bands), dtype=torch.float32)
        return grads(inputs, ones, targets, scale=scale)
