"""A recorded trace's influence terms, recomputed in one segment by the replay worker (specs/forensics.md
§4, §7.3).

The verifier's own twin of the trainer's attribution: it reads the spec, not ``gradledger.training``.
For each probe (one recorded ForensicTrace whose lineage the segment belongs to) it adds up, per
training example and band, ``a_{t,z,k} * <g_{z,k}(w), G_{j,k}(w)>`` averaged over the query's
examples, where ``w`` is each replayed step's weights (method ``replay``) or the segment's first
checkpoint (method ``checkpoints``). Per-example gradients come from one batched backward over the
per-example losses of one forward (exact for any program, dropout included): the step's own forward
(``replay``), forwards of at most ``CHUNK`` examples under a generator seeded ``TRAIN_SEED``
(``checkpoints``), and the query's forward under a generator seeded ``QUERY_SEED``, each in a forked
generator so that the replay's own draws never move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["CHUNK", "MAX_QUERY", "Probe", "ProbeError", "Terms", "band_weights", "example_grads", "lr_scale"]

#: specs/forensics.md §2: at most this many query examples.
MAX_QUERY = 4096
#: §4.1, §4.2: the seed of the query's forward, and of the checkpoints method's training forwards.
QUERY_SEED, TRAIN_SEED = 0, 1
#: §4.2: the checkpoints method's training examples are taken this many at a time, in index order.
CHUNK = 256
#: The query's per-example gradients a worker may hold (Q x parameters x 8 bytes).
MAX_QUERY_GRAD_BYTES = 4 << 30
CLIP_EPS = 1e-6  # specs/routing.md §5


class ProbeError(Exception):
    """A recorded trace that cannot be recomputed (the message says why): the trace check fails."""


@dataclass
class Probe:
    """One recorded trace to recompute in a segment: its ForensicTrace seq, method, the query's inputs
    (``{"indices": [...]}``, or ``{"file": digest, "names": [...]}`` with the dataset's tensor names in
    canonical order), its ``target`` and ``against`` (a class for every input, or one per input; None: no
    contrast) and whether self-influence is recomputed."""

    trace: int
    method: str
    query: dict[str, Any]
    target: int | list[int]
    against: int | list[int] | None
    self_influence: bool

    def to_obj(self) -> dict[str, Any]:
        return {"trace": self.trace, "method": self.method, "query": self.query, "target": self.target,
                "against": self.against, "self_influence": self.self_influence}

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> "Probe":
        return cls(obj["trace"], obj["method"], obj["query"], obj["target"], obj["against"], obj["self_influence"])


class Terms:
    """One probe's sums in one segment: per dataset index and band, per step, and self-influence."""

    def __init__(self, probe: Probe, n_examples: int, n_bands: int) -> None:
        self.probe = probe
        self.examples = torch.zeros((n_examples, n_bands), dtype=torch.float64)
        self.steps: dict[int, float] = {}
        self.own = torch.zeros(n_examples, dtype=torch.float64) if probe.self_influence else None
        self.error: str | None = None

    def add(self, index: Tensor, train: Sequence[Tensor], query: Sequence[Tensor], band_of: Sequence[int],
            weights: Tensor, step: int) -> None:
        """``train[i]`` ``[B, numel]`` and ``query[i]`` ``[Q, numel]`` per band parameter ``i`` (in band
        ``band_of[i]``), ``weights`` ``[B, K]``: each example's ``a_{t,z,k}``; the batch's dataset ``index``."""
        b, q = int(index.shape[0]), int(query[0].shape[0]) if query else 1
        dots = torch.zeros((b, self.examples.shape[1]), dtype=torch.float64)
        own = torch.zeros_like(dots) if self.own is not None else None
        for g, G, k in zip(train, query, band_of):
            dots[:, k] += (g @ G.T).to(torch.float64).sum(1) / q
            if own is not None:
                own[:, k] += (g * g).sum(1).to(torch.float64)
        contrib = dots * weights
        self.examples.index_add_(0, index, contrib)
        self.steps[step] = self.steps.get(step, 0.0) + float(contrib.sum())
        if own is not None and self.own is not None:
            self.own.index_add_(0, index, (own * weights).sum(1))

    def to_obj(self) -> dict[str, Any]:
        """What the worker sends back: the rows with any term, the steps, self-influence where asked."""
        if self.error is not None:
            return {"trace": self.probe.trace, "error": self.error}
        rows = torch.nonzero(self.examples.abs().sum(1) + (self.own.abs() if self.own is not None else 0)).flatten()
        out: dict[str, Any] = {
            "trace": self.probe.trace,
            "examples": [[int(i), self.examples[i].tolist()] for i in rows.tolist()],
            "steps": [[s, v] for s, v in sorted(self.steps.items())],
        }
        if self.own is not None:
            out["self"] = [[int(i), float(self.own[i])] for i in rows.tolist()]
        return out


def example_grads(losses: Tensor, params: Sequence[Tensor], *, retain_graph: bool) -> list[Tensor]:
    """Per parameter, the ``[n, numel]`` gradients of each of the ``n`` ``losses`` (zeros where a parameter
    is not reached): one batched backward (``is_grads_batched``) over one forward's graph."""
    n = int(losses.shape[0])
    eye = torch.eye(n, dtype=losses.dtype)
    grads = torch.autograd.grad(losses, list(params), grad_outputs=eye, is_grads_batched=True,
                                retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros((n, p.numel()), dtype=p.dtype) if g is None else g.reshape(n, -1)
            for g, p in zip(grads, params)]


def query_loss(loss_fn: Callable[..., Tensor], out: Tensor, rows: Tensor, kw: Mapping[str, Any]) -> Tensor:
    """§2: each row ``[c, a, m]``'s loss, the run's loss against ``c`` minus ``m`` times its loss against
    ``a`` (``reduction`` "none")."""
    classes = int(out.shape[-1])
    if bool((rows[:, :2] >= classes).any()) or bool((rows < 0).any()):
        raise ProbeError(f"the query names a class outside the model's {classes} outputs")
    each = {**kw, "reduction": "none"}
    return loss_fn(out, rows[:, 0], **each) - rows[:, 2].to(out.dtype) * loss_fn(out, rows[:, 1], **each)


def band_weights(norms: Sequence[float], limits: Sequence[float | None], clip: float = 1.0) -> list[float]:
    """Per band, ``c_{t,k}`` (specs/routing.md §5, 1 where the limit is null) times the user's clip factor."""
    out = []
    for norm, limit in zip(norms, limits):
        coef = 1.0
        if limit is not None:
            c = float(limit) / (float(norm) + CLIP_EPS)
            coef = min(c, 1.0)
        out.append(coef * clip)
    return out


def lr_scale(update: Mapping[str, Any], groups: Sequence[int]) -> list[float]:
    """Per band parameter (``groups``: its param group), its group's lr at the step over group 0's (§4)."""
    recorded = (update.get("optimizer") or {}).get("groups")
    lrs = [float(g["lr"]) for g in recorded] if recorded else [float(update["lr"])]
    base = lrs[0] if lrs[0] != 0 else 1.0
    return [(lrs[g] if g < len(lrs) else lrs[0]) / base for g in groups]


def check_query_size(q: int, params: Sequence[Tensor]) -> None:
    if not 1 <= q <= MAX_QUERY:
        raise ProbeError(f"the query has {q} examples (1 to {MAX_QUERY})")
    n = sum(p.numel() for p in params)
    if q * n * 8 > MAX_QUERY_GRAD_BYTES:
        raise ProbeError(f"the query's {q} examples x {n} parameters need more than {MAX_QUERY_GRAD_BYTES >> 20} "
                         "MiB of gradients")


class SegmentTracer:
    """The probes of one segment, computed as the segment's replay goes: ``at_checkpoint`` once the first
    checkpoint is restored (method ``checkpoints``), ``at_step`` on each step's own forward before its
    backward (method ``replay``). A probe that cannot be computed keeps its error and is skipped after."""

    def __init__(self, probes: Sequence[Probe], *, module: Any, inputs: Sequence[Tensor], by_name: Mapping[str, Tensor],
                 settings: Mapping[str, Any], labels: Sequence[int], rule_profiles: Mapping[int, Sequence[float]],
                 loss: Callable[..., Tensor], loss_kw: Mapping[str, Any],
                 artifact: Callable[[bytes], bytes | None]) -> None:
        self.module, self.inputs, self.loss, self.loss_kw = module, list(inputs), loss, dict(loss_kw)
        self.rule_profiles = rule_profiles
        self.labels = torch.tensor(list(labels), dtype=torch.int64)
        names = [n for ns in settings["band_params"] for n in ns]
        self.params = [by_name["model." + n] for n in names]
        self.band_of = [k for k, ns in enumerate(settings["band_params"]) for _ in ns]
        group = {n: g for g, ns in enumerate(settings["param_groups"]) for n in ns}
        self.groups = [group.get(n, 0) for n in names]
        self.n_bands = len(settings["band_params"])
        self.terms = [Terms(p, len(labels), self.n_bands) for p in probes]
        self.queries: list[tuple[tuple[Tensor, ...], Tensor] | None] = []
        for t in self.terms:
            try:
                self.queries.append(self._query(t.probe, artifact))
            except ProbeError as exc:
                t.error = str(exc)
                self.queries.append(None)

    def _query(self, probe: Probe, artifact: Callable[[bytes], bytes | None]) -> tuple[tuple[Tensor, ...], Tensor]:
        """The query's inputs and its loss rows ``[target, against, m]`` (§2)."""
        x = self._query_inputs(probe, artifact)
        q = int(x[0].shape[0])
        check_query_size(q, self.params)
        target = _classes(probe.target, q, "target")
        if probe.against is None:
            return x, torch.stack([target, torch.zeros_like(target), torch.zeros_like(target)], 1)
        against = _classes(probe.against, q, "against")
        if bool((against == target).any()):
            raise ProbeError("the query's against names its target for some input")
        return x, torch.stack([target, against, torch.ones_like(target)], 1)

    def _query_inputs(self, probe: Probe, artifact: Callable[[bytes], bytes | None]) -> tuple[Tensor, ...]:
        if "indices" in probe.query:
            index = torch.tensor(probe.query["indices"], dtype=torch.int64)
            n = int(self.inputs[0].shape[0])
            if index.dim() != 1 or not 1 <= len(index) <= MAX_QUERY or bool((index < 0).any()) \
                    or bool((index >= n).any()):
                raise ProbeError(f"the query's indices are not 1 to {MAX_QUERY} rows of the dataset")
            return tuple(t[index] for t in self.inputs)
        from safetensors import SafetensorError
        from safetensors.torch import load

        data = artifact(probe.query["file"])
        if data is None:
            raise ProbeError("the query file is not in the bundle")
        try:
            tensors = load(data)
        except SafetensorError as exc:
            raise ProbeError(f"the query file is not safetensors: {exc}") from None
        names = probe.query["names"]
        if sorted(tensors) != sorted(names):
            raise ProbeError(f"the query file holds {sorted(tensors)[:4]}, the dataset's inputs are {names}")
        parts = tuple(tensors[n] for n in names)
        q = int(parts[0].shape[0]) if parts and parts[0].dim() else 0
        for t, ref in zip(parts, self.inputs):
            if t.dtype != ref.dtype or t.dim() != ref.dim() or t.shape[1:] != ref.shape[1:] or t.shape[0] != q:
                raise ProbeError("the query file's tensors are not rows shaped as the dataset's, as many in each")
        return parts

    def _forward(self, x: tuple[Tensor, ...], profiles: Tensor) -> Tensor:
        out = self.module(x[0] if len(x) == 1 else x, profiles)
        leaves = [t for t in (out if isinstance(out, (list, tuple)) else [out])
                  if isinstance(t, Tensor) and t.is_floating_point()]
        if not leaves:
            raise ProbeError("the model program has no floating output")
        return leaves[0]

    def _query_grads(self, i: int, scale: Sequence[float]) -> list[Tensor]:
        x, rows = self.queries[i]  # type: ignore[misc]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(QUERY_SEED)
            ones = torch.ones((int(rows.shape[0]), self.n_bands), dtype=torch.float32)
            out = self._forward(x, ones)
            grads = example_grads(query_loss(self.loss, out, rows, self.loss_kw), self.params, retain_graph=False)
        return [g * f if f != 1.0 else g for g, f in zip(grads, scale)]

    def _run(self, method: str, work: Callable[[int, Terms], None]) -> None:
        for i, t in enumerate(self.terms):
            if t.error is not None or t.probe.method != method:
                continue
            try:
                work(i, t)
            except ProbeError as exc:
                t.error = str(exc)
            except (RuntimeError, ValueError, IndexError) as exc:
                t.error = f"{type(exc).__name__}: {exc}"

    def at_step(self, u: Mapping[str, Any], out: Tensor, index: Tensor, labels: Tensor) -> None:
        """Method ``replay`` (§4.1): the step's own forward ``out`` (graph kept for the step's backward)."""
        if not any(t.probe.method == "replay" and t.error is None for t in self.terms):
            return
        if "recipe" in u:
            def refuse(i: int, t: Terms) -> None:
                raise ProbeError(f"step {u['step']} records a recipe; the replay method re-creates plain steps only")
            self._run("replay", refuse)
            return
        with torch.enable_grad():
            each = self.loss(out, labels, **{**self.loss_kw, "reduction": "none"})
            train = example_grads(each, self.params, retain_graph=True)
        b = int(index.shape[0])
        w = band_weights(u["band_grad_norms"], u["routing"]["limits"])
        weights = torch.tensor([float(u["lr"]) * c / b for c in w], dtype=torch.float64).expand(b, -1)
        scale = lr_scale(u, self.groups)

        def work(i: int, t: Terms) -> None:
            t.add(index, train, self._query_grads(i, scale), self.band_of, weights, int(u["step"]))
        self._run("replay", work)

    def at_checkpoint(self, updates: Sequence[Mapping[str, Any]]) -> None:
        """Method ``checkpoints`` (§4.2), at the segment's first checkpoint (just restored)."""
        if not updates or not any(t.probe.method == "checkpoints" and t.error is None for t in self.terms):
            return
        n = int(self.labels.shape[0])
        weight = torch.zeros((n, self.n_bands), dtype=torch.float64)
        profile = torch.zeros((n, self.n_bands), dtype=torch.float32)
        for u in updates:
            per, clip = _example_weights(u)
            w = band_weights(u["band_grad_norms"], u["routing"]["limits"], clip)
            index = torch.tensor(u["batch"], dtype=torch.int64)
            weight.index_add_(0, index, torch.tensor([[float(u["lr"]) * p * c for c in w] for p in per],
                                                     dtype=torch.float64))
            profile[index] = torch.tensor([self.rule_profiles[r] for r in u["routing"]["rules"]], dtype=torch.float32)
        rows = torch.nonzero(weight.abs().sum(1)).flatten()
        scale = lr_scale(updates[0], self.groups)
        step = int(updates[0]["step"])

        def work(i: int, t: Terms) -> None:
            query = self._query_grads(i, scale)
            for lo in range(0, len(rows), CHUNK):
                index = rows[lo: lo + CHUNK]
                with torch.random.fork_rng(devices=[]), torch.enable_grad():
                    torch.default_generator.manual_seed(TRAIN_SEED)
                    out = self._forward(tuple(x[index] for x in self.inputs), profile[index])
                    each = self.loss(out, self.labels[index], **{**self.loss_kw, "reduction": "none"})
                    train = example_grads(each, self.params, retain_graph=False)
                t.add(index, train, query, self.band_of, weight[index], step)
        self._run("checkpoints", work)


def _classes(value: int | list[int], q: int, what: str) -> Tensor:
    """``target`` or ``against``: one class for every input, or one per input (checked against the model's
    classes where the loss reads them)."""
    if type(value) is int:
        return torch.full((q,), value, dtype=torch.int64)
    if not isinstance(value, list) or len(value) != q or any(type(c) is not int for c in value):
        raise ProbeError(f"the query's {what} is not a class or a list of one class per input ({q})")
    return torch.tensor(value, dtype=torch.int64)


def _example_weights(u: Mapping[str, Any]) -> tuple[list[float], float]:
    """§4: each batch position's weight in the step's loss (``1 / (micro-batch size * divisor)``) and the
    user's norm-clip factor (a clip by value counts as none)."""
    recipe = u.get("recipe") or {}
    # A step over ranks weighs each shard's mean by 1 / world (specs/distributed.md §3): a divisor of world.
    divisor = recipe.get("loss_divisor", len(recipe["ranks"]) if "ranks" in recipe else 1)
    sizes = recipe.get("micro", recipe.get("ranks", [len(u["batch"])]))
    per = [1.0 / (size * divisor) for size in sizes for _ in range(size)]
    clip = 1.0
    c = recipe.get("clip")
    if c is not None and c["kind"] == "norm":
        clip = min(c["max_norm"] / (c["total_norm"] + CLIP_EPS), 1.0)
    return per, clip
