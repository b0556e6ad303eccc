"""A step's update and its record, shared by the trainer and unlearning's replay of a run.

``route_examples``: the routing tables (rule, profile, source paths and names per dataset index);
``step_and_measure``: the optimizer's step and the per-band update norms it made (specs/routing.md
§5); ``update_body``: the GovernedUpdate body of a step (specs/training.md §3.1). Unlearning
re-runs a run's steps (specs/unlearning.md) and must record them exactly as the trainer did: one
implementation serves both (the verifier keeps its own, as the design's second implementation).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from gradledger.ledger.errors import CredentialError

from .errors import GovernanceError, ManifestError
from .gate import _l2_of_norms, routing_ratios, validate_profiles
from .policy import profiles_tensor, route


@dataclass(frozen=True)
class RoutedExamples:
    """Per dataset index: policy rule, binary64 profile, sorted distinct source paths, source names."""

    rules: list[int]
    profiles: list[tuple[float, ...]]
    paths: list[tuple[str, ...]]
    names: list[tuple[str, ...]]


def route_examples(manifests: Sequence[Mapping[str, Any]], registry: Any, compiled: Any,
                   flagged: bool = False, suspended: frozenset[int] = frozenset()) -> RoutedExamples:
    """Route every manifest (a manifest map) under ``compiled``, resolving source paths in ``registry``;
    each example as ``flagged`` by memorization or not (specs/dynamics.md §2.4), with the ``suspended``
    rules (§5.5) matching nothing."""
    rules, profiles, paths, names = [], [], [], []
    for i, m in enumerate(manifests):
        try:
            src_paths = {s["source"]: registry.get(s["key_id"]).path for s in m["sources"]}
        except CredentialError as exc:
            raise ManifestError(f"manifest {i}: a source has no credential in the ledger: {exc}") from None
        r = route(compiled, m, src_paths, flagged, suspended)
        rules.append(r.rule)
        profiles.append(r.profile)
        paths.append(tuple(sorted(set(src_paths.values()))))
        names.append(tuple(src_paths))
    return RoutedExamples(rules, profiles, paths, names)


class RouteTables:
    """Every example's routing as not flagged and, where the policy matches memorization flags, as
    flagged (specs/dynamics.md §2.4); and, where rules carry entropy budgets, the same under each set of
    suspended rules a checkpoint put in force (§5.5), built the first time it is. A step's table is
    ``at(flags, suspended)``."""

    def __init__(self, manifests: Sequence[Mapping[str, Any]], registry: Any, compiled: Any) -> None:
        def route(suspended: frozenset[int], flag: bool) -> RoutedExamples:
            return route_examples(manifests, registry, compiled, flag, suspended)

        self._route = route
        self.plain = route(frozenset(), False)
        self.flagged = route(frozenset(), True) if compiled.matches_flags else None
        self._pairs: dict[frozenset[int], tuple[RoutedExamples, RoutedExamples | None]] = {
            frozenset(): (self.plain, self.flagged)}

    def built(self, suspended: frozenset[int]) -> bool:
        """Whether the tables under ``suspended`` exist yet (``pair`` builds them)."""
        return suspended in self._pairs

    def pair(self, suspended: frozenset[int]) -> tuple[RoutedExamples, RoutedExamples | None]:
        """The plain and flagged tables with the ``suspended`` rules matching nothing."""
        if suspended not in self._pairs:
            self._pairs[suspended] = (self._route(suspended, False),
                                      self._route(suspended, True) if self.flagged is not None else None)
        return self._pairs[suspended]

    def at(self, flags: frozenset[int], suspended: frozenset[int] = frozenset()) -> RoutedExamples:
        plain, flagged = self.pair(suspended)
        if flagged is None or not flags:
            return plain
        pick = [flagged if i in flags else plain for i in range(len(plain.rules))]
        return RoutedExamples([t.rules[i] for i, t in enumerate(pick)], [t.profiles[i] for i, t in enumerate(pick)],
                              plain.paths, plain.names)


class Routes:
    """What a step reads of its examples' routing, per dataset index, under the memorization flags in force
    (specs/dynamics.md §2.4): the rule, the gate's float32 profile row (and its mixing ratios when ``ratios``),
    what the example adds to authority_writes (its paths, its binary64 profile) and its source names. The
    trainer and unlearning's replay hold one each; ``use`` switches the flags and the suspended rules (a no-op
    for the same ones). Each table is validated once, when it is built, so a batch's profiles are rows of
    validated tables."""

    def __init__(self, tables: RouteTables, n_bands: int, *, ratios: bool = False) -> None:
        self.tables, self.n_bands, self._with_ratios = tables, n_bands, ratios
        self._validate(frozenset())
        self.flags: frozenset[int] | None = None
        #: The rules an entropy budget suspends now (specs/dynamics.md §5.5).
        self.suspended: frozenset[int] = frozenset()
        self.use(frozenset())

    @property
    def reads_flags(self) -> bool:
        return self.tables.flagged is not None

    def _validate(self, suspended: frozenset[int]) -> None:
        """The tables under ``suspended``, built and validated once: a batch's profiles are their rows."""
        for table in self.tables.pair(suspended):
            if table is not None:
                validate_profiles(profiles_tensor(table.profiles, self.n_bands), self.n_bands)

    def use(self, flags: frozenset[int], suspended: frozenset[int] | None = None) -> None:
        """Route with ``flags`` in force and (given) the ``suspended`` rules, else those in force."""
        suspended = self.suspended if suspended is None else suspended
        if flags == self.flags and suspended == self.suspended:
            return
        if not self.tables.built(suspended):
            self._validate(suspended)
        routed = self.tables.at(flags, suspended)
        self.flags, self.suspended = flags, suspended
        self.rules, self.names = routed.rules, routed.names
        self.profiles = profiles_tensor(routed.profiles, self.n_bands)
        # A row of the table's ratios equals the ratios of the row (row-wise elementwise ops).
        self.ratios = routing_ratios(self.profiles) if self._with_ratios else None
        self.writes_of = [(routed.paths[i], tuple(routed.profiles[i])) for i in range(len(routed.rules))]


def step_and_measure(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], snapshot: list[Tensor], band_sizes: Sequence[int]
) -> list[float]:
    """Snapshot ``params`` into ``snapshot``, ``optimizer.step()``, return the per-band update norms."""
    with torch.no_grad():
        torch._foreach_copy_(snapshot, list(params))
        optimizer.step()
        return delta_norms(params, snapshot, band_sizes)


def update_body(
    step: int,
    indices: Sequence[int],
    rules: Sequence[int],
    limits: Sequence[float | None],
    *,
    policy: bytes,
    loss: float,
    grad_norms: list[float],
    update_norms: list[float],
    optimizer: dict[str, Any],
    seeds: dict[str, int],
    writes_of: Sequence[tuple[tuple[str, ...], tuple[float, ...]]],
    names: Sequence[tuple[str, ...]],
    n_bands: int,
    example_losses: bytes | None = None,
) -> dict[str, Any]:
    """The GovernedUpdate body of one step (specs/training.md §3.1); ``optimizer`` as described;
    ``example_losses`` (format 4) from ``example_loss_bytes``."""
    writes: dict[str, list[float]] = {}
    sources: set[str] = set()
    zero = (0.0,) * n_bands
    for i in indices:
        # The policy's float64 multipliers (not the float32 gate copy), added in batch order.
        paths, profile = writes_of[i]
        for path in paths:
            writes[path] = [a + b for a, b in zip(writes.get(path, zero), profile)]
        sources.update(names[i])
    body = {
        "step": step,
        "batch": list(indices),
        "policy": policy,
        "lr": float(optimizer["groups"][0]["lr"]),
        "loss": loss,
        "band_grad_norms": grad_norms,
        "band_update_norms": update_norms,
        "authority_writes": writes,
        "sources": sorted(sources),
        "optimizer": optimizer,
        "seeds": seeds,
        "routing": {"rules": list(rules), "limits": list(limits)},
    }
    if example_losses is not None:
        body["example_losses"] = example_losses
    return body



def example_loss_bytes(losses: Sequence[Tensor | None]) -> bytes:
    """``example_losses`` of a GovernedUpdate (specs/training.md §3.1): each micro-batch's per-example
    losses in batch order, as IEEE 754 binary32, little-endian, 4 bytes per example."""
    if any(t is None for t in losses):
        raise GovernanceError("a micro-batch of the step has no per-example losses")
    flat = torch.cat([t.detach().reshape(-1) for t in losses if t is not None]).to(torch.float32)
    # tolist() gives each binary32 as the exact Python float; packing it back as "<f" is exact.
    return struct.pack(f"<{flat.numel()}f", *flat.tolist())


def example_loss_values(data: bytes) -> list[float]:
    """The binary32 values of an ``example_losses`` field, as floats (``example_loss_bytes``' inverse)."""
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def delta_norms(params: Sequence[Tensor], before: list[Tensor], sizes: Sequence[int]) -> list[float]:
    # The band-norm rule of specs/routing.md §5 applied to (before - after), band by band
    # (``sizes`` parameters each, in order): per-parameter L2 in the parameter's dtype, then the
    # L2 of those in float64. ``before`` is overwritten with the differences.
    if not params:
        return [0.0] * len(sizes)
    torch._foreach_sub_(before, list(params))
    norms = torch._foreach_norm(before, 2)
    out: list[Tensor] = []
    pos = 0
    for size in sizes:
        out.append(_l2_of_norms(norms[pos : pos + size]) if size else torch.zeros((), dtype=torch.float64))
        pos += size
    return torch.stack(out).tolist()


__all__ = ["RouteTables", "RoutedExamples", "Routes", "delta_norms", "example_loss_bytes", "example_loss_values", "route_examples", "step_and_measure", "update_body"]
