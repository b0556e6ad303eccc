"""Differential privacy through depth routing: clip factors, seeded noise and the accountant (specs/privacy.md).

Why a clip factor instead of clipped per-example gradients: the clipped sum ``sum_i c_i g_i`` is the
gradient of ``sum_i c_i loss_i``, so the trainer measures each private example's per-band gradient
norm once (Opacus's ghost norms, or torch's batched autograd, over the step's own forward, dropout
masks included), then
scales that example's gradient by ``c_i`` at the model output with the gate's exact mix. The user's
single backward then produces the clipped sum, and replay reproduces it bit for bit from the
recorded factors, whatever per-example implementation measured the norms: the verifier recomputes
them its own way and compares within a tolerance. Noise goes only into the bands private examples
may reach (their rule's profile), from a generator seeded by the run seed, the step and the band.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .errors import GovernanceError
from .gate import _mix_tree

__all__ = ["NormTaps", "PrivacyPlan", "Spent", "add_noise", "batch_factors", "clip_factors", "effective_noise", "epsilon",
           "mix_factors", "noise_seed", "require_accountant", "round_down_all"]

#: specs/privacy.md §5.1: the PrivacySpent record's format.
SPENT_FORMAT = 1

#: specs/privacy.md §3: the domain of the noise seed rule.
NOISE_DOMAIN = b"gradledger/privacy/noise/v1"
#: The epsilon of Opacus's and torch's clip factors, max_norm / (norm + 1e-6).
CLIP_EPS = 1e-6
INSTALL_HINT = "pip install 'gradledger[privacy]' (Opacus, for its privacy accountants)"


@dataclass(frozen=True)
class PrivacyPlan:
    """The policy's privacy section (specs/privacy.md §1) in the shape a step needs."""

    clip: tuple[float | None, ...]  # per band, C_b
    noise: tuple[float | None, ...]  # per band, sigma_b
    delta: float
    private_rules: frozenset[int]
    #: Per policy rule: the bands a private rule's examples reach (its profile's non-zero entries), else None.
    reach: tuple[tuple[int, ...] | None, ...] = ()

    @classmethod
    def of(cls, compiled: Any) -> "PrivacyPlan | None":
        """From a ``CompiledPolicy``: None when its policy has no privacy section."""
        privacy = compiled.privacy
        if privacy is None:
            return None
        reach = tuple(tuple(k for k, m in enumerate(r.profile) if m != 0.0) if r.private else None
                      for r in compiled.rules)
        return cls(tuple(privacy["clip"]), tuple(privacy["noise"]), privacy["delta"], compiled.private_rules, reach)

    @property
    def bands(self) -> list[int]:
        """The bands private examples may reach: those with a clip and a noise multiplier."""
        return [k for k, c in enumerate(self.clip) if c is not None]

    def record(self, factors: Sequence[float], sample_rate: float) -> dict[str, Any]:
        """``recipe.privacy`` of a step (specs/privacy.md §4)."""
        return {"factors": list(factors), "clip": list(self.clip), "noise": list(self.noise),
                "sample_rate": sample_rate}


def noise_seed(run_seed: int, step: int, band: int) -> int:
    """specs/privacy.md §3: the first 8 bytes of SHA-256(domain || u64 run seed || u64 step || u32 band),
    big-endian, with the top bit cleared (a seed torch.Generator takes on every platform)."""
    digest = hashlib.sha256(NOISE_DOMAIN + struct.pack(">QQI", run_seed, step, band)).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class NormTaps:
    """Opacus's ghost-clipping norm samplers (``GradSampleModuleFastGradientClipping.NORM_SAMPLERS``: Linear,
    Embedding) on the layers that hold the private bands' parameters: forward hooks keep each layer's input
    and output of the training forward, and one ordinary backward of the private examples' summed losses to
    those outputs gives every example's per-layer gradient norm without materializing per-example gradients.

    Why: torch's batched autograd (the fallback, ``clip_factors`` without taps) vmaps a backward per private
    row and cost about 2 ms a step on bench/privacy.py's MLP head, five times the plain step; the ghost norms
    cost a backward through the head. Usable only where every parameter of the private bands belongs to a
    layer Opacus has a norm sampler for, each layer called once per forward.
    """

    def __init__(self, model: nn.Module, bands: Sequence[Sequence[Tensor]], plan: PrivacyPlan) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
        band_of = {id(p): k for k in plan.bands for p in bands[k]}
        self.layers: list[tuple[nn.Module, int, Callable[..., Any]]] = []
        covered: set[int] = set()
        usable = True
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in band_of]
            if not own:
                continue
            found = {band_of[id(p)] for p in own}
            sampler = samplers.get(type(module))
            if sampler is None or len(found) != 1 or len(own) != len(list(module.parameters(recurse=False))):
                usable = False
                break
            self.layers.append((module, found.pop(), sampler))
            covered |= {id(p) for p in own}
        self.usable = usable and covered == set(band_of)
        self._calls: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._handles = [m.register_forward_hook(self._tap, prepend=True) for m, _, _ in self.layers] \
            if self.usable else []

    def _tap(self, module: nn.Module, args: Any, out: Any) -> None:
        # prepend: before the gate's boundary hooks, so the output is the layer's own (its gradient the layer's).
        if torch.is_grad_enabled() and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            self._calls.setdefault(id(module), []).append((args[0].detach(), out))

    def clear(self) -> None:
        """Forget what the last forward left (called before each training forward, and after use)."""
        self._calls = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def band_norms(self, losses: Tensor, rows: Tensor, n_bands: int) -> Tensor | None:
        """[len(rows), n_bands] binary64 per-example gradient norms of each band, or None where this forward
        cannot be read so (a layer called other than once)."""
        calls = [self._calls.get(id(m), []) for m, _, _ in self.layers]
        if not self.usable or any(len(c) != 1 for c in calls):
            return None
        outs = [c[0][1] for c in calls]
        backprops = torch.autograd.grad(losses.sum(), outs, retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
        squares = torch.zeros(len(rows), n_bands, dtype=torch.float64)
        for (module, band, sampler), (act, _), back in zip(self.layers, [c[0] for c in calls], backprops):
            for norm in sampler(module, [act[rows]], back[rows]).values():
                squares[:, band] += norm.to(torch.float64) ** 2
        return squares.sqrt()


def clip_factors(leaf: Tensor, labels: Tensor, example_loss: Callable[[Tensor, Tensor], Tensor], rows: Sequence[int],
                 bands: Sequence[Sequence[Tensor]], plan: PrivacyPlan, taps: NormTaps | None = None) -> list[float]:
    """specs/privacy.md §2: for each private batch row ``i`` in ``rows``, ``min_b min(1, C_b / (|g_ib| + 1e-6))``
    over the private bands ``b``, ``g_ib`` the gradient of example ``i``'s loss (reduction "none") with
    respect to band ``b``'s parameters through this very forward, rounded down to binary32.

    The norms come from Opacus's ghost norms (``taps``) where they can, else from torch's batched autograd
    (``is_grads_batched``: one vmapped backward over the private rows' one-hot seeds, the graph kept for the
    user's own backward), only for the private bands' parameters: the pass stops where those bands end."""
    if not rows:
        return []
    index = torch.tensor(list(rows), dtype=torch.int64)
    losses = example_loss(leaf[index], labels[index])
    norms = None if taps is None else taps.band_norms(losses, index, len(bands))
    if norms is None:
        norms = torch.zeros(len(rows), len(bands), dtype=torch.float64)
        params = [p for k in plan.bands for p in bands[k]]
        seeds = torch.eye(len(rows), dtype=losses.dtype)
        grads = torch.autograd.grad(losses, params, grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        pos = 0
        for k in plan.bands:
            n = len(bands[k])
            for g in grads[pos:pos + n]:
                norms[:, k] += (g.reshape(len(rows), -1).to(torch.float64) ** 2).sum(dim=1)
            pos += n
        norms = norms.sqrt()
    factors = torch.ones(len(rows), dtype=torch.float64)
    for k in plan.bands:
        clip = plan.clip[k]
        assert clip is not None
        factors = torch.minimum(factors, clip / (norms[:, k] + CLIP_EPS))
    return round_down_all(factors)


def batch_factors(leaf: Tensor, labels: Tensor, example_loss: Callable[[Tensor, Tensor], Tensor], rules: Sequence[int],
                  bands: Sequence[Sequence[Tensor]], plan: PrivacyPlan, taps: NormTaps | None = None) -> list[float]:
    """specs/privacy.md §2 for a whole batch routed by ``rules``: the clip factor of each example whose rule is
    private (``clip_factors``), 1.0 for every other."""
    rows = [i for i, r in enumerate(rules) if r in plan.private_rules]
    factors = [1.0] * len(rules)
    for i, f in zip(rows, clip_factors(leaf, labels, example_loss, rows, bands, plan, taps)):
        factors[i] = f
    return factors


def mix_factors(out: Any, factors: Sequence[float]) -> Any:
    """The model output with the clip factors mixed into every floating tensor (the gate's exact mix: the value
    unchanged, each example's gradient scaled by its factor)."""
    return _mix_tree(out, torch.tensor(list(factors), dtype=torch.float32))


def round_down_all(values: Tensor) -> list[float]:
    """Each binary64 value as the largest binary32 not above it: a factor rounded up could let a norm pass its
    clip (specs/privacy.md §2)."""
    f32 = values.to(torch.float32)
    over = f32.to(torch.float64) > values
    f32 = torch.where(over, torch.nextafter(f32, torch.zeros_like(f32)), f32)
    return f32.tolist()


def add_noise(bands: Sequence[Sequence[Tensor]], plan: PrivacyPlan, run_seed: int, step: int, batch: int) -> None:
    """specs/privacy.md §3: into each private band ``b``'s gradient, ``sigma_b * C_b / B`` times standard normal
    draws of one generator seeded ``noise_seed(run seed, step, b)``, parameter by parameter in band order
    (a parameter without a gradient gets zeros first: the noise does not depend on the batch)."""
    for k in plan.bands:
        clip, sigma = plan.clip[k], plan.noise[k]
        assert clip is not None and sigma is not None
        std = sigma * clip / batch
        gen = torch.Generator().manual_seed(noise_seed(run_seed, step, k))
        with torch.no_grad():
            for p in bands[k]:
                z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(z.to(p.grad.device), alpha=std)


def effective_noise(sigmas: Sequence[float | None]) -> float:
    """specs/privacy.md §5: the noise multiplier of several bands together, ``(sum_b sigma_b^-2)^(-1/2)`` (an
    example's clipped per-band gradients and their independent noises are one Gaussian mechanism)."""
    return math.fsum(s ** -2 for s in sigmas if s is not None) ** -0.5


def require_accountant() -> Any:
    """Opacus's accountants module, or GovernanceError with the install hint (a run under a privacy policy
    checks this at its start, not at its first checkpoint)."""
    try:
        from opacus import accountants
    except ImportError as exc:
        raise GovernanceError(f"a run under a privacy policy accounts its epsilon with Opacus, which cannot be "
                              f"imported ({exc}): {INSTALL_HINT}") from None
    return accountants


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Opacus's accountant (``rdp`` or ``prv``) over ``[(noise multiplier, sample rate, steps)]``."""
    accountants = require_accountant()
    acc = accountants.RDPAccountant() if accountant == "rdp" else accountants.PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta))


class Spent:
    """The sample rates of a run's steps so far (consecutive equal ones merged), and the PrivacySpent
    record of a checkpoint (specs/privacy.md §5.1): epsilon per private band and for the whole model."""

    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.rates: list[tuple[float, int]] = []

    def add(self, rate: float) -> None:
        if self.rates and self.rates[-1][0] == rate:
            self.rates[-1] = (rate, self.rates[-1][1] + 1)
        else:
            self.rates.append((rate, 1))

    def read_back(self, updates: Sequence[dict[str, Any]]) -> None:
        """A resumed run's rates: those its recorded steps carry."""
        for u in updates:
            self.add(u["recipe"]["privacy"]["sample_rate"])

    def job(self, run_seq: int, step: int) -> Callable[[], dict[str, Any]]:
        """The record of the checkpoint of ``step`` (every step before it accounted), to build later: on the
        recorder thread, while training adds the next steps' rates."""
        rates = list(self.rates)
        return lambda: self._body(run_seq, step, rates)

    def _body(self, run_seq: int, step: int, rates: list[tuple[float, int]]) -> dict[str, Any]:
        plan = self.plan

        def spent(sigma: float, accountant: str = "rdp") -> float:
            return epsilon([(sigma, q, n) for q, n in rates], plan.delta, accountant)

        model = effective_noise(plan.noise)
        return {"format": SPENT_FORMAT, "run": run_seq, "step": step, "accountant": "rdp", "delta": plan.delta,
                "epsilon": spent(model), "bands": [None if s is None else spent(s) for s in plan.noise],
                "rules": [None if r is None else spent(effective_noise([plan.noise[k] for k in r])) if r else 0.0
                          for r in plan.reach],
                "prv": spent(model, "prv")}
