"""The three ways a trace reads the ledger (specs/forensics.md §4): ``replay`` (every recorded step's
weights re-created by replay, the influence summed step by step), ``checkpoints`` (the same sum with
each step's weights taken as its segment's stored checkpoint, TracInCP-style), ``loss-trace`` (the
recorded per-example losses alone)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from gradledger.ledger.ledger import Ledger

from ..replayer import Replayer, ReplayError, program_inputs
from ..runtime import torch_deterministic
from ..updates import example_loss_values
from .influence import Accumulator, BandParams, ExampleGrads, band_weights, query_band_grads
from .lineage import Lineage, TraceDiverged, TraceError
from .query import Query, label_rows, query_loss

__all__ = ["METHODS", "Influence", "checkpoints_influence", "loss_trace", "replay_influence", "replayer"]

METHODS = ("replay", "checkpoints", "loss-trace")
#: The seed of the query's forward (and of the checkpoint method's training forwards): fixed, so a
#: trace is a function of the ledger and the query (dropout in a training-mode program draws from it).
QUERY_SEED = 0
#: Per-example gradients are taken this many examples at a time.
CHUNK = 256
#: The checkpoints method's ``vmap`` gradients (a program that draws no random numbers) are taken for as
#: many whole chunks at once as fit this many bytes of gradients: each ``vmap(grad)`` call costs a fixed
#: ~4 ms (the program interpreted under vmap, its backward), against ~1 ms of work for a chunk of a small
#: model. Each example's gradient is its own, whatever else shares the call: the same values.
BLOCK_GRAD_BYTES = 64 << 20
#: A replayed step whose loss differs from the record by more than this (relative) stops the trace.
LOSS_RTOL = 1e-3
#: Memory a trace may give the query's per-example gradients (Q x parameters x 8 bytes).
MAX_QUERY_GRAD_BYTES = 4 << 30


@dataclass
class Influence:
    """What a method found: the sums of ``Accumulator``, whether the figures are approximate and why,
    how many steps were replayed bit for bit."""

    acc: Accumulator
    notes: list[str] = field(default_factory=list)
    approximate: bool = False
    exact_steps: int = 0
    steps: int = 0


def replayer(ledger: Ledger, lin: Lineage) -> Replayer:
    """The lineage's program, optimizer and routing, ready to restore and step."""
    try:
        return Replayer(ledger, lin.run, lin.dataset, lin.fields)
    except ReplayError as exc:
        raise TraceError(str(exc)) from None


def _setup(rep: Replayer) -> tuple[BandParams, ExampleGrads]:
    """The band parameters and the per-example gradients of the run's loss (``query_loss`` rows: training
    rows by ``label_rows``, query rows by ``Query.rows()``)."""
    group_of = {id(p): g for g, group in enumerate(rep.optimizer.param_groups) for p in group["params"]}
    bands = [list(ps) for ps in rep.bands.params]
    names = [["model." + n for n in ns] for ns in rep.bands.param_names]
    params = BandParams(bands, [[group_of[id(p)] for p in ps] for ps in bands], names)
    return params, ExampleGrads(rep.module, params, query_loss(rep.example_loss_fn))


def _lr_scale(update: Mapping[str, Any], groups: list[list[int]]) -> list[list[float]]:
    """Per band parameter, its param group's learning rate at the step over group 0's (which the
    examples' weights hold)."""
    recorded = update.get("optimizer", {}).get("groups")
    lrs = [float(g["lr"]) for g in recorded] if recorded else [float(update["lr"])]
    base = lrs[0] if lrs[0] != 0 else 1.0
    return [[(lrs[g] if g < len(lrs) else lrs[0]) / base for g in band] for band in groups]


def _check_query_memory(q: int, params: BandParams) -> None:
    n = sum(p.numel() for ps in params.bands for p in ps)
    if q * n * 8 > MAX_QUERY_GRAD_BYTES:
        raise TraceError(f"the query's {q} examples x {n} parameters need {q * n * 8 >> 20} MiB of gradients "
                         f"(at most {MAX_QUERY_GRAD_BYTES >> 20}); use fewer query examples (inputs.limit)")


def _n_steps(lin: Lineage) -> int:
    return 1 + max((u["step"] for _, u in lin.run.updates), default=0)


def replay_influence(ledger: Ledger, lin: Lineage, rep: Replayer, query: Query, *, self_influence: bool = False,
                     progress: Callable[[int], None] | None = None) -> Influence:
    """Replay every recorded step from the first checkpoint and sum each batch example's influence on the
    query at the step's own weights (TracIn's ideal form; specs/forensics.md §4.1)."""
    params, grads = _setup(rep)
    qrows = query.rows()
    _check_query_memory(len(query), params)
    recipes = [u["step"] for _, u in lin.run.updates if "recipe" in u]
    if recipes:
        raise TraceError(f"step {recipes[0]} records a recipe (accumulation, a clip, autocast); the replay method "
                         "re-creates plain steps only: use --method checkpoints or loss-trace")
    acc = Accumulator(lin.dataset.count, len(query), rep.n_bands, _n_steps(lin), self_influence)
    result = Influence(acc)
    _approximations(lin, result)
    qx = program_inputs(query.inputs)
    ones = torch.ones((len(query), rep.n_bands), dtype=torch.float32)
    branch_start = next((c for _, c in lin.run.checkpoints if c["step"] == lin.rewind_step), None)
    with torch_deterministic():
        rep.restore(ledger, lin.run.checkpoints[0][1])
        for _, u in lin.run.updates:
            if branch_start is not None and u["step"] == lin.rewind_step:
                rep.restore(ledger, branch_start)  # the branch goes on from its own recorded state
            # Group 0's lr in the weights, the other groups' relative to it on the query's gradients.
            scale = _lr_scale(u, params.groups)
            seen: dict[str, list[list[Tensor]]] = {}

            def inspect(out: Tensor, labels: Tensor, index: Tensor) -> None:
                # The batch and the query in one vmap where the program is deterministic, else apart.
                rows = rep.rows(index)
                both = grads.functional_grads(
                    [torch.cat([a, b]) for a, b in zip(rows, qx)], torch.cat([rep.profiles[index], ones]),
                    torch.cat([label_rows(labels), qrows]))
                if both is not None:
                    b = len(index)
                    seen["train"] = [[g[:b] for g in band] for band in both]
                    seen["query"] = [[g[b:] * f if f != 1.0 else g[b:] for g, f in zip(band, fs)]
                                     for band, fs in zip(both, scale)]
                    return
                seen["train"] = grads(rows, rep.profiles[index], label_rows(labels), out=out)
                seen["query"] = query_band_grads(grads, qx, qrows, rep.n_bands, scale, QUERY_SEED)

            try:
                body = rep.step(u, list(u["batch"]), inspect)
            except ReplayError as exc:
                raise TraceError(str(exc)) from None
            if body["loss"] == u["loss"]:
                result.exact_steps += 1
            elif abs(body["loss"] - u["loss"]) > LOSS_RTOL * max(abs(u["loss"]), 1e-6):
                raise TraceDiverged(f"replay diverged from the record at step {u['step']}: loss {body['loss']!r} "
                                    f"replayed, {u['loss']!r} recorded (another machine's kernels? use --method "
                                    "checkpoints)")
            result.steps += 1
            b = len(u["batch"])
            w = band_weights(u["band_grad_norms"], u["routing"]["limits"])
            lr = float(u["lr"])
            weights = torch.tensor([lr * c / b for c in w], dtype=torch.float64).expand(b, -1)
            acc.add(torch.tensor(u["batch"], dtype=torch.int64), seen["train"], seen["query"], weights, u["step"])
            if progress is not None:
                progress(u["step"])
    if result.exact_steps != result.steps:
        result.notes.append(f"{result.steps - result.exact_steps} of {result.steps} steps replayed within "
                            f"{LOSS_RTOL} of the recorded loss, not bit for bit")
    return result


def _example_weights(u: Mapping[str, Any]) -> tuple[list[float], float, str | None]:
    """Each batch position's weight in the step's loss, the user's clip factor, and what is approximated."""
    recipe = u.get("recipe", {})
    # A step over ranks weighs each shard's mean by 1 / world (specs/distributed.md §3): a divisor of world.
    divisor = recipe.get("loss_divisor", len(recipe["ranks"]) if "ranks" in recipe else 1)
    sizes = recipe.get("micro", recipe.get("ranks", [len(u["batch"])]))
    per = [1.0 / (size * divisor) for size in sizes for _ in range(size)]
    clip, note = 1.0, None
    if "clip" in recipe:
        c = recipe["clip"]
        if c["kind"] == "norm":
            f = c["max_norm"] / (c["total_norm"] + 1e-6)
            clip = f if f < 1.0 else 1.0
        else:
            note = "a clip by value is not a factor: its steps are counted unclipped"
    if "autocast" in recipe:
        note = "steps under autocast are taken in full precision at the checkpoint"
    return per, clip, note


def checkpoints_influence(ledger: Ledger, lin: Lineage, rep: Replayer, query: Query, *,
                          self_influence: bool = False, progress: Callable[[int], None] | None = None) -> Influence:
    """Sum each example's influence over the stored checkpoints only: every step of a segment is taken at
    the segment's first checkpoint, each example weighted by the lr, clip and routing its steps recorded
    (TracInCP with the ledger's exact schedule; specs/forensics.md §4.2). Approximate by construction."""
    params, grads = _setup(rep)
    qrows = query.rows()
    _check_query_memory(len(query), params)
    acc = Accumulator(lin.dataset.count, len(query), rep.n_bands, _n_steps(lin), self_influence)
    result = Influence(acc, approximate=True)
    result.notes.append("each step's weights are taken as its segment's first checkpoint (TracInCP)")
    _approximations(lin, result)
    starts = [c for _, c in lin.run.checkpoints]
    qx = program_inputs(query.inputs)
    block = _block_rows(params)
    with torch_deterministic():
        for ci, start in enumerate(starts):
            end = starts[ci + 1]["step"] if ci + 1 < len(starts) else None
            seg = [u for _, u in lin.run.updates if u["step"] >= start["step"] and (end is None or u["step"] < end)]
            if not seg:
                continue
            weight = _segment_weights(seg, lin.dataset.count, rep.n_bands, result.notes)
            rep.restore(ledger, start)
            # Other groups' learning rates, relative to group 0's (which the weights hold), at the segment's start.
            scale = _lr_scale(seg[0], params.groups)
            rows = torch.nonzero(weight.abs().sum(1)).flatten()
            before = float(acc.examples.sum())
            for index, train, query_grads in _checkpoint_grads(rep, grads, rows, qx, qrows, scale, block):
                acc.add(index, train, query_grads, weight[index], None)
            acc.steps[seg[0]["step"]] += (float(acc.examples.sum()) - before) / max(1, len(query))
            result.steps += len(seg)
            if progress is not None:
                progress(seg[-1]["step"])
    return result


def _segment_weights(seg: list[Mapping[str, Any]], n: int, n_bands: int, notes: list[str]) -> Tensor:
    """``W_c(z, k)``: per example and band, the sum over the segment's steps of its weight in the step (lr,
    position weight, clip factor, band clip coefficient), added step by step in the segment's order."""
    index: list[int] = []
    terms: list[list[float]] = []
    for u in seg:
        per, clip, note = _example_weights(u)
        if note and note not in notes:
            notes.append(note)
        if len(per) != len(u["batch"]):
            raise TraceError(f"step {u['step']}: its recipe's micro-batches do not add up to its batch")
        lr = float(u["lr"])
        w = band_weights(u["band_grad_norms"], u["routing"]["limits"], clip)
        index += u["batch"]
        terms += [[lr * p * c for c in w] for p in per]
    weight = torch.zeros((n, n_bands), dtype=torch.float64)
    if not index:
        return weight
    # One index_add_ adds its rows in index order: the same sums, in the same order, as one call per step.
    weight.index_add_(0, torch.tensor(index, dtype=torch.int64), torch.tensor(terms, dtype=torch.float64))
    return weight


def _block_rows(params: BandParams) -> int:
    """How many training rows one ``vmap`` call takes: whole chunks, as many as ``BLOCK_GRAD_BYTES`` hold."""
    row = sum(p.numel() * p.element_size() for ps in params.bands for p in ps)
    return max(1, BLOCK_GRAD_BYTES // max(1, row) // CHUNK) * CHUNK


def _checkpoint_grads(rep: Replayer, grads: ExampleGrads, rows: Tensor, qx: list[Tensor], qrows: Tensor,
                      scale: list[list[float]], block: int) -> Iterator[tuple[Tensor, list[list[Tensor]],
                                                                               list[list[Tensor]]]]:
    """At the restored checkpoint, ``CHUNK`` training rows at a time in index order: the rows, their band
    gradients and the query's (scaled by ``scale``). A program that draws no random numbers gives them by
    ``vmap`` a block of chunks at a time, the query in the first block's call; otherwise each chunk's forward
    runs under a generator seeded ``QUERY_SEED + 1`` and the query's under ``QUERY_SEED``, each forked."""
    query_grads: list[list[Tensor]] | None = None
    for lo in range(0, len(rows), block):
        index = rows[lo : lo + block]
        found = None
        if grads.functional:
            xs, profiles, targets = rep.rows(index), rep.profiles[index], label_rows(rep.labels[index])
            if query_grads is None:
                xs = [torch.cat([a, b]) for a, b in zip(xs, qx)]
                profiles = torch.cat([profiles, torch.ones((len(qrows), rep.n_bands), dtype=profiles.dtype)])
                targets = torch.cat([targets, qrows])
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(QUERY_SEED + 1)
                found = grads.functional_grads(xs, profiles, targets)
            if found is not None and query_grads is None:
                b = len(index)
                query_grads = [[g[b:] * f if f != 1.0 else g[b:] for g, f in zip(band, fs)]
                               for band, fs in zip(found, scale)]
                found = [[g[:b] for g in band] for band in found]
        if query_grads is None:
            query_grads = query_band_grads(grads, qx, qrows, rep.n_bands, scale, QUERY_SEED)
        for c in range(0, len(index), CHUNK):
            sub = index[c : c + CHUNK]
            if found is not None:
                yield sub, [[g[c : c + CHUNK] for g in band] for band in found], query_grads
                continue
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(QUERY_SEED + 1)
                train = grads(rep.rows(sub), rep.profiles[sub], label_rows(rep.labels[sub]))
            yield sub, train, query_grads


def _approximations(lin: Lineage, result: Influence) -> None:
    opt = lin.run.settings["optimizer"]
    name = opt["name"]
    groups = opt["groups"]
    if name in ("adam", "adamw"):
        result.approximate = True
        result.notes.append(f"{name}: each step's update is taken as lr x gradient (Adam's per-parameter scaling "
                            "and moments are not applied)")
    elif any(g.get("momentum", 0) for g in groups):
        result.approximate = True
        result.notes.append("SGD with momentum: each step's update is taken as lr x gradient (the momentum that "
                            "carries a gradient into later steps is not followed)")
    if any(g.get("weight_decay", 0) for g in groups):
        result.notes.append("weight decay moves every weight at every step; it is nobody's label and is not attributed")
    if any("privacy" in u.get("recipe", {}) for _, u in lin.run.updates[:1]):
        result.approximate = True
        result.notes.append("a private run (specs/privacy.md): the private examples' clip factors and the noise added to "
                            "their bands are not in the influence weights")


def loss_trace(lin: Lineage) -> tuple[Tensor, Tensor]:
    """Per training example: the mean of its recorded losses and how many times it was recorded
    (format 4's ``example_losses``; specs/forensics.md §4.3)."""
    if lin.run.settings.get("format", 1) < 4:
        raise TraceError(f"run {lin.run.run_id!r} is training format {lin.run.settings.get('format', 1)}, which "
                         "records no per-example losses (format 4 and later): use --method replay or checkpoints")
    total = torch.zeros(lin.dataset.count, dtype=torch.float64)
    count = torch.zeros(lin.dataset.count, dtype=torch.float64)
    for _, u in lin.run.updates:
        values = torch.tensor(example_loss_values(u["example_losses"]), dtype=torch.float64)
        index = torch.tensor(u["batch"], dtype=torch.int64)
        total.index_add_(0, index, values)
        count.index_add_(0, index, torch.ones_like(values))
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
    return mean, count
