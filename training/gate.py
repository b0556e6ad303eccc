"""The depth-selective gate: per-example gradient routing in one forward and one backward.

Gradient routing (Cloud et al. 2024) mixes an activation ``a`` as
``r*a + (1-r)*a.detach()``: the forward value is ``a`` and the gradient that
flows into ``a`` is ``r`` times what arrives. Applying it per example at the
model output (``r = p[:, 0]``) and at each band boundary
(``r = p[:, k] / p[:, k-1]``) makes the gradient that example ``i`` sends into
band ``k`` exactly ``p[i, k]`` times its ungated gradient, because every path
from band ``k``'s parameters to the loss crosses boundaries ``k, k-1, ..., 1``
and the output, and the ratios telescope. ``specs/routing.md`` is normative.

We compute the mix as ``d + r*(a - d)`` with ``d = a.detach()``. It has the
same gradient (``r``) as the textbook form but its forward value is ``a``
bit for bit (``a - d`` is exactly zero), whereas ``r*a + (1-r)*d`` can be off
by an ulp; replay needs the governed forward to equal the plain one exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradledger.training.bands import BandLayout, ResolvedBands, resolve_bands
from gradledger.training.errors import BandError, GovernanceError
from gradledger.training.inputs import InputStructure

__all__ = [
    "GatedModel",
    "band_grad_norms",
    "check_routing",
    "clip_bands",
    "export_gated",
    "mix",
    "routing_ratios",
    "validate_profiles",
]

# Same epsilon as torch.nn.utils.clip_grad_norm_, so a band clipped here
# matches a single-band clip_grad_norm_ bit for bit.
CLIP_EPS = 1e-6


def validate_profiles(profiles: Tensor, n_bands: int, batch: int | None = None) -> None:
    """Refuse profiles that the routing rule is not defined for.

    Each row must lie in [0, 1] and be non-increasing (a deeper band never
    gets more than a shallower one); otherwise a ratio would exceed 1 or a
    positive multiplier would follow a zero and be lost.
    """
    if not isinstance(profiles, Tensor) or not profiles.is_floating_point():
        raise GovernanceError("profiles must be a floating-point tensor")
    if profiles.dim() != 2 or profiles.shape[1] != n_bands:
        raise GovernanceError(f"profiles must have shape [batch, {n_bands}], got {list(profiles.shape)}")
    if batch is not None and profiles.shape[0] != batch:
        raise GovernanceError(f"profiles cover {profiles.shape[0]} examples, the batch has {batch}")
    p = profiles.detach()
    if not bool(torch.isfinite(p).all()):
        raise GovernanceError("profiles contain non-finite values")
    if bool((p < 0).any()) or bool((p > 1).any()):
        raise GovernanceError("profile multipliers must lie in [0, 1]")
    if n_bands > 1 and bool((p[:, 1:] > p[:, :-1]).any()):
        bad = torch.nonzero((p[:, 1:] > p[:, :-1]).any(dim=1)).flatten().tolist()
        raise GovernanceError(f"profiles must be non-increasing from head to deeper bands (rows {bad})")


def routing_ratios(profiles: Tensor) -> Tensor:
    """[B, n] mixing coefficients: column 0 is p[:, 0]; column k is p[:, k] / p[:, k-1], 0 where p[:, k-1] == 0.

    Where the shallower multiplier is 0 no gradient reaches the boundary
    anyway; 0 (not NaN) keeps 0 * inf-style NaNs out of the backward.
    """
    head = profiles[:, :1]
    if profiles.shape[1] == 1:
        return head
    prev = profiles[:, :-1]
    cur = profiles[:, 1:]
    positive = prev > 0
    safe_prev = torch.where(positive, prev, torch.ones_like(prev))
    ratios = torch.where(positive, cur / safe_prev, torch.zeros_like(cur))
    return torch.cat([head, ratios], dim=1)


def mix(a: Tensor, r: Tensor) -> Tensor:
    """Per-example gradient scaling with an exact forward: value ``a``, gradient ``r`` times upstream.

    ``r`` has shape [B] and broadcasts over every dim of ``a`` but the first. The result has the wider
    dtype of ``a`` and ``r`` (its value is ``a``'s, exactly).
    """
    if a.dim() == 0 or a.shape[0] != r.shape[0]:
        raise BandError(
            f"a routed activation must have the batch as its first dim ({r.shape[0]}), got shape {list(a.shape)}"
        )
    # The wider of the two dtypes (specs/routing.md §3.2): a float64 model mixes in float64; under
    # autocast a bfloat16 value is mixed by a float32 ratio and comes out float32, exactly what the
    # exported program does, whose traced cast of ``r`` is fixed at the float32 it was traced with.
    # (Chosen by width in Python: torch.promote_types would be traced into the program as an op.)
    wide = a.dtype if a.dtype.itemsize >= r.dtype.itemsize else r.dtype
    r = r.to(wide).reshape((r.shape[0],) + (1,) * (a.dim() - 1))
    d = a.detach()
    return d + r * (a - d)


def _mix_tree(obj: Any, r: Tensor) -> Any:
    """Mix every floating tensor in a module output (tensor, tuple, list, dict); leave the rest alone."""
    if isinstance(obj, Tensor):
        return mix(obj, r) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        items = [_mix_tree(o, r) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_mix_tree(o, r) for o in obj]
    if type(obj) is dict:
        return {k: _mix_tree(v, r) for k, v in obj.items()}
    if isinstance(obj, dict):
        # A HuggingFace ModelOutput (an OrderedDict subclass that rebuilds from keyword arguments).
        return type(obj)(**{k: _mix_tree(v, r) for k, v in obj.items()})
    if obj is None or isinstance(obj, (int, float, bool, str)):
        return obj
    raise BandError(f"cannot route a module output of type {type(obj).__name__}")


_set = object.__setattr__


def _is_tracing() -> bool:
    return bool(torch.compiler.is_compiling() or torch.compiler.is_exporting())


def batch_statistics_module(model: nn.Module) -> str | None:
    """The name of the first BatchNorm that normalizes by the batch's own statistics, or None.

    Such a layer mixes examples (each example's output depends on the others'), so no per-example
    routing holds, and the verifier's batch-independence check refuses the program
    (specs/routing.md §6). It is refused at the step it would run, never recorded.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            return name or type(m).__name__
    return None


class GatedModel(nn.Module):
    """Wrap a model and a band layout; ``forward(x, profiles)`` routes each example's gradient by depth.

    ``profiles`` is [B, n_bands], head first, each row in [0, 1] and
    non-increasing. After ``loss.backward()`` on the returned output, band
    ``k``'s gradient equals ``sum_i profiles[i, k] * grad_k(loss_i)``: one
    forward, one backward, no per-example passes.

    The gate installs forward hooks on the boundary modules of the wrapped
    model. They act only while this gate's ``forward`` runs, so calling the
    wrapped model directly is ungated. ``remove_hooks()`` detaches them.

    Preconditions (checked by ``check_routing``, not on every step): every
    path from a band's parameters to the output passes through its boundary;
    each boundary module runs exactly once per forward (checked every call);
    examples do not interact (no BatchNorm in train mode); boundary outputs
    have the batch as their first dim.
    """

    def __init__(self, model: nn.Module, layout: BandLayout | ResolvedBands, *, validate: bool = True,
                 inputs: InputStructure = InputStructure("tensor")) -> None:
        super().__init__()
        self.model = model
        #: How the wrapped model takes ``x``: one tensor, or parts it is called with (specs/training.md §5.1).
        self.inputs = inputs
        self.bands: ResolvedBands = layout if isinstance(layout, ResolvedBands) else resolve_bands(model, layout)
        self.validate = validate
        # The current call's ratios; set only while forward runs so the hooks
        # are inert otherwise (the wrapped model stays usable on its own).
        self._ratios: Tensor | None = None
        self._calls: list[int] = [0] * len(self.bands)
        self._handles: list[RemovableHandle] = []
        for k in range(1, len(self.bands)):
            module = self.bands.boundary_modules[k]
            assert module is not None
            # A partial over a bound method (not a closure) so copy.deepcopy of
            # the gate rebinds the copied hooks to the copied gate.
            self._handles.append(module.register_forward_hook(functools.partial(self._hook, k)))

    @property
    def layout(self) -> BandLayout:
        return self.bands.layout

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    def _hook(self, k: int, module: nn.Module, args: Any, output: Any) -> Any:
        ratios = self._ratios
        if ratios is None:
            return None  # not inside our forward: leave the output untouched
        self._calls[k] += 1
        return _mix_tree(output, ratios[:, k])

    def forward(self, x: Any, profiles: Tensor) -> Any:
        n = len(self.bands)
        if profiles.dim() != 2 or profiles.shape[1] != n:
            raise GovernanceError(f"profiles must have shape [batch, {n}], got {list(profiles.shape)}")
        if self.validate and not _is_tracing():
            first = x if isinstance(x, Tensor) else self.inputs.flatten(x)[0] if self.inputs.structured else None
            validate_profiles(profiles, n, batch=first.shape[0] if isinstance(first, Tensor) else None)
        # Ratios stay in the profiles' dtype; mix() casts to each activation's
        # dtype, so float64 profiles give float64 ratios for float64 models.
        return self._run(x, routing_ratios(profiles))

    def _run(self, x: Any, ratios: Tensor) -> Any:
        """Forward with explicit mixing coefficients [B, n] (column 0 at the output, k at boundary k)."""
        n = len(self.bands)
        if self._ratios is not None:
            raise BandError("GatedModel.forward is not re-entrant")
        # Plain attributes (neither parameters, buffers nor modules): set past nn.Module.__setattr__, whose
        # checks cost microseconds on every step.
        _set(self, "_ratios", ratios)
        _set(self, "_calls", [0] * n)
        try:
            out = self.inputs.call_model(self.model, x)
        finally:
            _set(self, "_ratios", None)
        for k in range(1, n):
            if self._calls[k] != 1:
                raise BandError(
                    f"boundary {self.layout.bands[k].boundary!r} of band {self.layout.bands[k].name!r} ran "
                    f"{self._calls[k]} times in one forward; routing needs exactly one"
                )
        return _mix_tree(out, ratios[:, 0])

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _resolve(model: nn.Module, layout: BandLayout | ResolvedBands | None) -> ResolvedBands:
    if isinstance(layout, ResolvedBands):
        return layout
    if isinstance(model, GatedModel):
        if layout is None or layout == model.layout:
            return model.bands
        return resolve_bands(model.model, layout)
    if layout is None:
        raise BandError("a band layout is required")
    return resolve_bands(model, layout)


def _band_norm(params: Sequence[nn.Parameter]) -> Tensor:
    # Per-parameter L2 in the gradient's dtype, then the L2 of those in
    # float64, in band parameter order: the order and dtypes specs/routing.md fixes.
    # torch._foreach_norm computes each norm with linalg.vector_norm's kernel (bit for bit),
    # in one call instead of one Python round trip per parameter.
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return _l2_of_norms(torch._foreach_norm(grads, 2))


def _l2_of_norms(norms: Sequence[Tensor]) -> Tensor:
    # float64 of each per-parameter norm, then their L2; mixed dtypes are cast one by one.
    if len({n.dtype for n in norms}) == 1:
        return torch.linalg.vector_norm(torch.stack(list(norms)).to(torch.float64), 2)
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms]), 2)


def band_grad_norms(model: nn.Module, layout: BandLayout | ResolvedBands | None = None) -> list[float]:
    """L2 norm of each band's accumulated ``.grad`` (missing grads count as zero), head first."""
    bands = _resolve(model, layout)
    return [float(_band_norm(ps)) for ps in bands.params]


def clip_bands(
    model: nn.Module,
    layout: BandLayout | ResolvedBands | None,
    limits: Sequence[float | None],
) -> list[float]:
    """Clip each band's gradient to its L2 limit; return the norms measured before clipping.

    Call after backward through the gate, so the norms are of the routed
    gradient. Like ``clip_grad_norm_`` per band: when ``limit / (norm + 1e-6)
    < 1`` every gradient in the band is multiplied by that coefficient. A
    ``None`` limit leaves the band alone. A band whose norm is not finite is
    left untouched and its norm returned so the caller can refuse the step.
    """
    bands = _resolve(model, layout)
    if len(limits) != len(bands):
        raise GovernanceError(f"{len(limits)} norm limits for {len(bands)} bands")
    for k, limit in enumerate(limits):
        if limit is not None and not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit >= 0):
            raise GovernanceError(f"band {bands.names[k]!r}: norm limit must be a finite number >= 0, got {limit!r}")
    grads = [[p.grad.detach() for p in params if p.grad is not None] for params in bands.params]
    flat = [g for gs in grads for g in gs]
    # All per-parameter norms in one fused call, then each band's float64 L2 (specs/routing.md §5).
    norms = torch._foreach_norm(flat, 2) if flat else []
    band_norms: list[Tensor] = []
    pos = 0
    for gs in grads:
        band_norms.append(_l2_of_norms(norms[pos : pos + len(gs)]) if gs else torch.zeros((), dtype=torch.float64))
        pos += len(gs)
    out: list[float] = torch.stack(band_norms).tolist()
    for gs, norm, limit in zip(grads, out, limits):
        if limit is None or not math.isfinite(norm):
            continue
        coef = float(limit) / (norm + CLIP_EPS)
        if coef < 1.0 and gs:
            torch._foreach_mul_(gs, coef)
    return out


def _float_leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _float_leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _float_leaves(o)]
    return []


def check_routing(gated: GatedModel, x: Any, *, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Setup-time probe that the layout's boundaries really separate the bands.

    Routing is exact iff, for every boundary k, every path from bands >= k to
    the output crosses boundary k and no path from bands < k does. For each
    k >= 1 the probe closes boundary k alone (ratio 0 there, 1 everywhere
    else) and requires bands >= k to get exactly zero gradient (nothing
    bypasses boundary k) and bands < k their ungated gradient (no shallower
    parameter sits below it). A probe with weights at which some path has a
    vanishing gradient can miss a violation; it never reports a false one.
    Costs n_bands forwards and backwards; runs in eval mode under a forked
    RNG so training is unaffected. Raises BandError on the first violation.
    """
    n = gated.n_bands
    params = [p for ps in gated.bands.params for p in ps]
    owner = [k for k, ps in enumerate(gated.bands.params) for _ in ps]
    was_training = gated.training
    gated.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():

            def grads(out: Any) -> list[Tensor | None]:
                leaves = _float_leaves(out)
                if not leaves:
                    raise BandError("the model output has no floating-point tensor to probe with")
                gen = torch.Generator().manual_seed(0)
                total = sum(
                    (leaf * torch.randn(leaf.shape, generator=gen, dtype=leaf.dtype).to(leaf.device)).sum()
                    for leaf in leaves
                )
                return list(torch.autograd.grad(total, params, allow_unused=True))

            base = grads(gated.inputs.call_model(gated.model, x))
            batch = (gated.inputs.flatten(x)[0] if gated.inputs.structured else x).shape[0]
            dtype = params[0].dtype if params[0].is_floating_point() else torch.float32
            for k in range(1, n):
                ratios = torch.ones(batch, n, dtype=dtype, device=params[0].device)
                ratios[:, k] = 0
                got = grads(gated._run(x, ratios))
                for j, (g, b, name) in enumerate(zip(got, base, [nm for ns in gated.bands.param_names for nm in ns])):
                    band = owner[j]
                    if band >= k:
                        if g is not None and bool((g != 0).any()):
                            raise BandError(
                                f"parameter {name} (band {gated.bands.names[band]!r}) still gets gradient with "
                                f"boundary {gated.layout.bands[k].boundary!r} closed: a path bypasses the boundary"
                            )
                    else:
                        bz = torch.zeros_like(params[j]) if b is None else b
                        gz = torch.zeros_like(params[j]) if g is None else g
                        if not torch.allclose(gz, bz, rtol=rtol, atol=atol):
                            raise BandError(
                                f"parameter {name} (band {gated.bands.names[band]!r}) lost gradient when boundary "
                                f"{gated.layout.bands[k].boundary!r} closed: it lies below that boundary"
                            )
    finally:
        gated.train(was_training)


class _PartsGate(nn.Module):
    """The gate as the program exports it for a model of parts: ``forward(x, profiles)`` with ``x`` the
    tuple of parts in canonical order, so the program's user inputs are ``x_0 .. x_{n-1}, profiles``
    (specs/training.md §5.1). It shares the gate's ``model`` (state names stay ``model.*``) and hooks."""

    def __init__(self, gated: GatedModel) -> None:
        super().__init__()
        self.model = gated.model
        _set(self, "gate", gated)  # not a submodule: its state is ``model``, already registered

    def forward(self, x: tuple[Tensor, ...], profiles: Tensor) -> Any:
        return self.gate(self.gate.inputs.rebuild(x), profiles)


def export_gated(
    gated: GatedModel, x: Any, profiles: Tensor, *, dynamic_batch: bool = True, strict: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` the gate with ``(x, profiles)`` as inputs, batch size symbolic by default.

    The hooks are traced into the graph, so the exported program carries the
    routing: its ``module()`` routes gradients exactly like the eager gate. For a model of parts
    (``gated.inputs`` structured), ``x`` is the tuple of parts in canonical order.
    """
    structured = gated.inputs.structured
    parts = gated.inputs.flatten(x) if structured else [x]
    dynamic_shapes = None
    if dynamic_batch:
        if parts[0].shape[0] < 2:
            # torch.export specializes sizes 0 and 1, so a batch-of-one example
            # cannot yield a program with a symbolic batch.
            raise GovernanceError("export_gated needs an example batch of at least 2 for a dynamic batch size")
        batch = torch.export.Dim("batch")
        spec_x: Any = tuple({0: batch} for _ in parts) if structured else {0: batch}
        dynamic_shapes = {"x": spec_x, "profiles": {0: batch}}
    if structured:
        return torch.export.export(_PartsGate(gated), (tuple(parts), profiles), dynamic_shapes=dynamic_shapes,
                                   strict=strict)
    return torch.export.export(gated, (x, profiles), dynamic_shapes=dynamic_shapes, strict=strict)
