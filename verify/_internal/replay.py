"""Replay a governed run from its checkpoints, segment by segment (specs/replay.md).

A *segment* runs from one Checkpoint of a run to the next: restore the first, replay every
recorded step between them through the run's exported program, and compare each step's loss
and band norms (the step's fingerprints) and finally the next checkpoint's digest. In exact
mode every comparison is bit for bit; in tolerance mode within the declared relative bounds.
The first difference names the step, the observation and what differed.

This follows specs/training.md and specs/routing.md, not the trainer's code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gradledger.ledger.errors import VerificationError

from .attribution import Probe, SegmentTracer
from .profiles import ProfileInvalid, segment_profiles
from .checkpoint import CheckpointError, digest_state, load_checkpoint
from .hyperparams import (
    VARYING, HyperParameterMismatch, apply_step, check_checkpoint_groups, check_description, check_loss, check_step,
    group_kwargs,
)
from .example_losses import ExampleLossesInvalid, check_example_losses, decode_example_losses
from .recipe import RecipeInvalid, check_recipe, trained_pieces
from .graph_routing import RoutingNotProven, mix
from .privacy import FACTOR_TOLERANCE, add_noise, factor_error, measured_factors
from .program import ProgramError, load_routed
from .settings import (SettingsMismatch, check_program, check_step0, distributed_world, micro_seed, program_columns,
                       step_seed, training_format)

CLIP_EPS = 1e-6  # specs/routing.md §5, the epsilon of torch.nn.utils.clip_grad_norm_

#: Tolerance mode: relative bound on each step's loss and band norms, and on every checkpoint
#: tensor (absolute floor ATOL for values near zero). Declared in every tolerance report.
RTOL = 1e-3
ATOL = 1e-6

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
LOSSES: dict[str, Callable[..., Tensor]] = {"cross_entropy": F.cross_entropy, "nll_loss": F.nll_loss}


class ReplayError(VerificationError):
    """A replayed step or checkpoint differs from the record."""

    def __init__(self, message: str, *, seq: int | None = None, step: int | None = None) -> None:
        super().__init__(message, seq=seq)
        self.step = step


@dataclass
class RunContext:
    """What every segment of one run needs besides its own records."""

    run_seq: int
    program: bytes  # digest of the program artifact
    inputs: bytes  # digest of the inputs artifact
    settings: dict[str, Any]
    labels: list[int]  # per dataset index
    rule_profiles: dict[int, list[float]]  # rule index (-1 default) -> binary64 multipliers
    environment: dict[str, Any]  # RunStarted.environment
    #: specs/dynamics.md §5: the held-out set whose depth profile each checkpoint of the run records
    #: (profiles.held_out_request), or None.
    held_out: dict[str, Any] | None = None
    #: specs/privacy.md §2: the policy's private rules, whose examples' clip factors replay re-measures.
    private_rules: list[int] = field(default_factory=list)

    def to_obj(self) -> dict[str, Any]:
        return {
            "run_seq": self.run_seq, "program": self.program, "inputs": self.inputs, "settings": self.settings,
            "labels": self.labels, "rule_profiles": {str(k): v for k, v in self.rule_profiles.items()},
            "environment": self.environment, "held_out": self.held_out, "private_rules": self.private_rules,
        }

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> "RunContext":
        return cls(obj["run_seq"], obj["program"], obj["inputs"], obj["settings"], obj["labels"],
                   {int(k): v for k, v in obj["rule_profiles"].items()}, obj["environment"], obj.get("held_out"),
                   list(obj.get("private_rules", [])))


@dataclass
class Segment:
    index: int
    start_seq: int
    start: dict[str, Any]  # Checkpoint body
    end_seq: int
    end: dict[str, Any]
    updates: list[tuple[int, dict[str, Any]]]  # (seq, GovernedUpdate body)

    def to_obj(self) -> dict[str, Any]:
        return {"index": self.index, "start_seq": self.start_seq, "start": self.start, "end_seq": self.end_seq,
                "end": self.end, "updates": [[s, b] for s, b in self.updates]}

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> "Segment":
        return cls(obj["index"], obj["start_seq"], obj["start"], obj["end_seq"], obj["end"],
                   [(s, b) for s, b in obj["updates"]])


@dataclass
class SegmentResult:
    index: int
    ok: bool
    steps: int
    seconds: float
    reason: str = ""
    seq: int | None = None
    step: int | None = None
    #: Largest relative deviation seen (tolerance mode; 0.0 when exact).
    max_deviation: float = 0.0
    #: The recorded traces' terms in this segment (attribution.Terms.to_obj), one per probe it was given.
    traces: list[Any] = field(default_factory=list)
    #: Depth profiles recomputed at the segment's checkpoints (specs/dynamics.md §5): ``[step, entropy,
    #: mean, slices]``, or ``[step, error]`` where the program's values cannot give one.
    profiles: list[Any] = field(default_factory=list)

    def to_obj(self) -> dict[str, Any]:
        return {"index": self.index, "ok": self.ok, "steps": self.steps, "seconds": self.seconds, "reason": self.reason,
                "seq": self.seq, "step": self.step, "max_deviation": self.max_deviation, "traces": self.traces,
                "profiles": self.profiles}

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> "SegmentResult":
        return cls(**obj)


@dataclass
class _Loaded:
    """One run's program module and inputs, loaded from the bundle being verified."""

    module: Any
    #: The program's inputs for every committed example: ``x``, or the parts in canonical order.
    inputs: list[Tensor]
    by_name: dict[str, Tensor]
    #: Digests of the weights the program stores, by checkpoint name (settings.check_program).
    weights: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ReplayCache:
    """What one verification (one ``run_jobs`` call, or one worker's task) has loaded, by digest.

    Never shared across verifications (issue 9): a program or inputs artifact is read from the
    bundle under verification, every time a new verification starts.
    """

    loaded: dict[tuple[bytes, bytes], _Loaded] = field(default_factory=dict)
    #: The held-out inputs of depth profiles (specs/dynamics.md §5), by digest: read once, not per checkpoint.
    held_out: dict[bytes, dict[str, Tensor]] = field(default_factory=dict)


def _load(ctx: RunContext, artifact: Callable[[bytes], bytes | None], cache: ReplayCache | None) -> _Loaded:
    from safetensors.torch import load

    key = (ctx.program, ctx.inputs)
    if cache is not None and key in cache.loaded:
        return cache.loaded[key]
    raw = artifact(ctx.program)
    if raw is None:
        raise ReplayError("the model program artifact is not in the bundle", seq=ctx.run_seq)
    try:
        # The program is run with the verifier's own routing (specs/routing.md §6): the cut is
        # proved here, batch independence before the first forward of each batch shape.
        module = load_routed(raw, ctx.settings)
    except ProgramError as exc:
        raise ReplayError(f"the model program named by RunStarted is refused: {exc.args[0]}", seq=ctx.run_seq) from None
    except RoutingNotProven as exc:
        raise ReplayError(f"routing cannot be applied to the model program named by RunStarted: {exc.args[0]}",
                          seq=ctx.run_seq) from None
    try:  # specs/verification.md §6 settings, item 5: what only the program confirms
        weights = check_program(module.program, ctx.settings, ctx.run_seq)
    except SettingsMismatch as exc:
        raise ReplayError(exc.args[0], seq=ctx.run_seq) from None
    data = artifact(ctx.inputs)
    if data is None:
        raise ReplayError("the dataset inputs are not in the bundle (export it --with-data)", seq=ctx.run_seq)
    try:
        cols = program_columns(ctx.settings)
    except ValueError as exc:
        raise ReplayError(f"RunStarted {ctx.run_seq}: {exc}", seq=ctx.run_seq) from None
    tensors = load(data)
    if set(tensors) != {c.tensor for c in cols}:
        raise ReplayError(f"the dataset inputs hold {sorted(tensors)[:4]}, the program takes "
                          f"{[c.tensor for c in cols]}", seq=ctx.run_seq)
    loaded = _Loaded(module, [tensors[c.tensor] for c in cols], dict(module.named_parameters()), weights)
    if cache is not None:
        cache.loaded[key] = loaded
    return loaded


def _l2_of_norms(norms: Sequence[Tensor]) -> Tensor:
    # specs/routing.md §5: the per-parameter L2s (in the parameter's dtype), then their L2 in float64.
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms]), 2)


def _band_norm(grads: Sequence[Tensor]) -> Tensor:
    return _l2_of_norms(torch._foreach_norm(list(grads), 2) if grads else [])


def _close(a: float, b: float, exact: bool) -> tuple[bool, float]:
    if exact:
        return a == b or (math.isnan(a) and math.isnan(b)), 0.0
    dev = abs(a - b) / max(abs(b), ATOL)
    return abs(a - b) <= ATOL or dev <= RTOL, dev


def _optimizer(ctx: RunContext, params: Mapping[str, Tensor]) -> torch.optim.Optimizer:
    """The run's optimizer, built from RunStarted ``settings.optimizer`` alone (specs/replay.md §3 step 2)."""
    settings = ctx.settings
    try:
        check_description(settings["optimizer"], "RunStarted settings.optimizer")
    except HyperParameterMismatch as exc:
        raise ReplayError(str(exc), seq=ctx.run_seq) from None
    recorded = settings["optimizer"]
    names = settings["param_groups"]
    if len(names) != len(recorded["groups"]):
        raise ReplayError("the recorded optimizer groups do not match the recorded parameter groups", seq=ctx.run_seq)
    built = []
    for ns, kwargs in zip(names, group_kwargs(recorded)):
        try:
            ps = [params["model." + n] for n in ns]
        except KeyError as exc:
            raise ReplayError(f"parameter {exc.args[0]!r} is not in the model program", seq=ctx.run_seq) from None
        built.append({"params": ps, **kwargs})
    return OPTIMIZERS[recorded["name"]](built)


def _restore(module: Any, opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], scalars: Mapping[str, str],
             recorded: Mapping[str, Any], fmt: int) -> None:
    """Load the model and the optimizer's per-parameter state; the checkpoint's hyper-parameters are
    checked against ``recorded`` (RunStarted ``settings.optimizer``), never loaded (specs/replay.md §3)."""
    def value(name: str) -> Any:
        kind = scalars.get(name)
        return {"bool": bool, "int": int, "float": float}[kind](tensors[name].item()) if kind else tensors[name]

    check_checkpoint_groups(recorded, tensors, fmt)
    state = {n: value(n) for n in tensors if n.startswith("model.")}
    module.load_state_dict(state, strict=True)
    opt_state: dict[int, dict[str, Any]] = {}
    for name in tensors:
        parts = name.split(".", 3)
        if parts[0] == "optim" and parts[1] == "state":
            opt_state.setdefault(int(parts[2]), {})[parts[3]] = value(name)
    opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})


def _flatten(module: Any, opt: torch.optim.Optimizer, fmt: int) -> dict[str, Tensor]:
    # specs/training.md §4 names; the program's state_dict keys already carry the "model." prefix.
    # Format 2 checkpoints leave out the hyper-parameters each step states.
    skip = VARYING if fmt >= 2 else frozenset()
    out: dict[str, Tensor] = {}

    def put(name: str, v: Any) -> None:
        if isinstance(v, Tensor):
            out[name] = v.detach()
        elif type(v) is bool:
            out[name] = torch.tensor(v, dtype=torch.bool)
        elif type(v) is int:
            out[name] = torch.tensor(v, dtype=torch.int64)
        elif type(v) is float:
            out[name] = torch.tensor(v, dtype=torch.float64)

    for k, v in module.state_dict().items():
        put(k, v)
    state = opt.state_dict()
    for i, entries in state["state"].items():
        for k, v in entries.items():
            put(f"optim.state.{i}.{k}", v)
    for g, group in enumerate(state["param_groups"]):
        for k, v in group.items():
            if k != "params" and k not in skip:
                put(f"optim.group.{g}.{k}", v)
    return out


def replay_segment(
    ctx: RunContext, seg: Segment, artifact: Callable[[bytes], bytes | None], *, exact: bool,
    cache: ReplayCache | None = None, probes: Sequence[Probe] = (),
) -> SegmentResult:
    """Replay one segment; never raises for a mismatch, reports it. ``cache``: the verification's own.
    ``probes``: recorded traces whose terms this segment also computes (attribution.py)."""
    started = time.perf_counter()
    traces: list[Any] = []
    profiles: list[Any] = []
    try:
        dev = _replay(ctx, seg, artifact, exact, cache, probes, traces, profiles)
    except (ReplayError, CheckpointError, VerificationError) as exc:
        return SegmentResult(seg.index, False, len(seg.updates), time.perf_counter() - started,
                             str(exc.args[0]), exc.seq, getattr(exc, "step", None))
    return SegmentResult(seg.index, True, len(seg.updates), time.perf_counter() - started, max_deviation=dev,
                         traces=traces, profiles=profiles)


def _profile(ctx: RunContext, module: Any, artifact: Callable[[bytes], bytes | None], step: int,
             cache: ReplayCache | None) -> list[Any]:
    """specs/dynamics.md §5: the depth profile of the module's weights now, at checkpoint ``step``."""
    from safetensors.torch import load

    assert ctx.held_out is not None
    digest = ctx.held_out["inputs"]
    tensors = cache.held_out.get(digest) if cache is not None and digest is not None else None
    if tensors is None:
        data = None if digest is None else artifact(digest)
        if data is None:
            return [step, "the held-out dataset's inputs are not in the bundle (committed without them, or exported "
                          "without data)"]
        tensors = load(data)
        if cache is not None:
            cache.held_out[digest] = tensors
    names = [c.tensor for c in program_columns(ctx.settings)]
    if set(tensors) != set(names):
        return [step, f"the held-out inputs hold {sorted(tensors)[:4]}, the program takes {names}"]
    try:
        entropy, mean, slices = segment_profiles(module, [tensors[n] for n in names], ctx.held_out)
    except ProfileInvalid as exc:
        return [step, str(exc)]
    return [step, entropy, mean, slices]


def _replay(ctx: RunContext, seg: Segment, artifact: Callable[[bytes], bytes | None], exact: bool,
            cache: ReplayCache | None, probes: Sequence[Probe] = (), traces: list[Any] | None = None,
            profiles: list[Any] | None = None) -> float:
    settings = ctx.settings
    loaded = _load(ctx, artifact, cache)
    module, inputs, params = loaded.module, loaded.inputs, loaded.by_name
    tensors, scalars = load_checkpoint(artifact(seg.start["artifact"]), seg.start, seg.start_seq)
    if seg.start["step"] == 0:  # the program's weights are the step-0 state it was exported with
        try:
            check_step0(loaded.weights, seg.start, seg.start_seq, ctx.run_seq)
        except SettingsMismatch as exc:
            raise ReplayError(exc.args[0], seq=ctx.run_seq) from None
    fmt = training_format(settings)
    world = distributed_world(settings)
    opt = _optimizer(ctx, params)
    try:
        _restore(module, opt, tensors, scalars, settings["optimizer"], fmt)
    except HyperParameterMismatch as exc:
        raise ReplayError(f"Checkpoint for step {seg.start['step']}: {exc}", seq=seg.start_seq,
                          step=seg.start["step"]) from None
    del tensors
    if ctx.held_out is not None and profiles is not None and seg.start["step"] == 0:
        profiles.append(_profile(ctx, module, artifact, 0, cache))
    bands = [[params["model." + n] for n in ns] for ns in settings["band_params"]]
    flat = [p for ps in bands for p in ps]
    sizes = [len(ps) for ps in bands]
    # specs/training.md §3.2: a recorded clip walks the model's trainable parameters in its own order.
    ordered = [params["model." + n] for n in settings.get("parameters", [])] if fmt >= 2 else []
    loss_spec = settings["loss"]
    try:  # specs/training.md §6: a registered loss, only its settings, reduction "mean"
        check_loss(loss_spec)
    except HyperParameterMismatch as exc:
        raise ReplayError(str(exc), seq=ctx.run_seq) from None
    loss_fn = LOSSES[loss_spec["name"]]
    loss_kw = dict(loss_spec["settings"])
    labels_all = torch.tensor(ctx.labels, dtype=torch.int64)
    run_seed = settings["seed"]
    n_bands = len(bands)
    tracer = None
    if probes:
        tracer = SegmentTracer(probes, module=module, inputs=inputs, by_name=params, settings=settings,
                               labels=ctx.labels, rule_profiles=ctx.rule_profiles, loss=loss_fn, loss_kw=loss_kw,
                               artifact=artifact)
        tracer.at_checkpoint([u for _, u in seg.updates])
    worst = 0.0  # the program was exported in training mode (dropout active); it has no train()
    before: list[Tensor] | None = None
    for seq, u in seg.updates:
        step = u["step"]

        def fail(what: str) -> ReplayError:
            return ReplayError(f"step {step}: {what}", seq=seq, step=step)

        if u["seeds"]["step"] != step_seed(run_seed, step) or u["seeds"]["run"] != run_seed:
            raise fail("the recorded seed does not follow the run's seed rule")
        try:  # the optimizer was built from RunStarted; each step states its values, format 2 its lr too
            check_step(settings["optimizer"], u, fmt)
            check_recipe(u, fmt, world)
            check_example_losses(u, fmt)
        except (HyperParameterMismatch, RecipeInvalid, ExampleLossesInvalid) as exc:
            raise fail(str(exc)) from None
        recipe = u.get("recipe", {})
        if fmt >= 2:
            apply_step(opt, u)
        try:
            profiles_all = torch.tensor([ctx.rule_profiles[r] for r in u["routing"]["rules"]], dtype=torch.float32)
        except KeyError as exc:
            raise fail(f"routing rule {exc.args[0]} is not in the policy") from None
        if profiles_all.shape != (len(u["batch"]), n_bands):
            raise fail("the recorded routing does not cover the batch")
        opt.zero_grad(set_to_none=True)
        private = None
        if "privacy" in recipe:  # specs/privacy.md §2: the recorded factors, re-measured here before they are used
            private = _Private(recipe["privacy"], [i for i, r in enumerate(u["routing"]["rules"])
                                                   if r in ctx.private_rules], bands, loss_fn, loss_kw, fail)
        losses, each = _forward_backward(module, inputs, labels_all, profiles_all, u, recipe, run_seed, loss_fn,
                                         loss_kw, fail, None if tracer is None else tracer.at_step, private)
        if private is not None:  # §3: the noise, before the band norms are measured
            add_noise(bands, recipe["privacy"], run_seed, step, len(u["batch"]))
        if "example_losses" in u:  # specs/training.md §3.1: every example's loss, value by value
            replayed = torch.cat(each).to(torch.float32).tolist()  # each binary32 as its exact float
            for i, (a, b) in enumerate(zip(replayed, decode_example_losses(u["example_losses"]))):
                ok, d = _close(a, b, exact)
                worst = max(worst, d)
                if not ok:
                    raise fail(f"the loss of example {u['batch'][i]} (batch position {i}{_rank_of(recipe, i)}) is "
                               f"{a!r} replayed, {b!r} recorded")
        recorded = recipe.get("losses", [u["loss"]])
        for j, (a, b) in enumerate(zip(losses, recorded)):
            ok, d = _close(a, b, exact)
            worst = max(worst, d)
            if not ok:
                where = f" of rank {j}" if "ranks" in recipe else f" of micro-batch {j}" if len(losses) > 1 else ""
                raise fail(f"loss{where} {a!r} replayed, {b!r} recorded")
        ok, d = _close(math.fsum(losses) / len(losses), u["loss"], exact)
        worst = max(worst, d)
        if not ok:
            raise fail(f"loss {math.fsum(losses) / len(losses)!r} replayed (the mean of the micro-batches' losses), "
                       f"{u['loss']!r} recorded")
        if "clip" in recipe:
            worst = max(worst, _clip(ordered, recipe["clip"], exact, fail))
        grads = [[p.grad.detach() for p in ps if p.grad is not None] for ps in bands]
        norms = torch.stack([_band_norm(gs) for gs in grads]).tolist()
        for k, (a, b) in enumerate(zip(norms, u["band_grad_norms"])):
            ok, d = _close(a, b, exact)
            worst = max(worst, d)
            if not ok:
                raise fail(f"band {k} gradient norm {a!r} replayed, {b!r} recorded")
        for gs, norm, limit in zip(grads, norms, u["routing"]["limits"]):
            if limit is not None and gs:
                coef = float(limit) / (norm + CLIP_EPS)
                if coef < 1.0:
                    torch._foreach_mul_(gs, coef)
        with torch.no_grad():
            # One buffer per parameter, reused step after step (as the trainer's snapshot is), rather than
            # a fresh clone of every parameter at every step; the difference and its norms are the same.
            if before is None:
                before = [torch.empty_like(p) for p in flat]
            if before:
                torch._foreach_copy_(before, flat)
            opt.step()
            if before:
                torch._foreach_sub_(before, flat)
            per = torch._foreach_norm(before, 2) if before else []
            updates, pos = [], 0
            for size in sizes:
                updates.append(_l2_of_norms(per[pos : pos + size]))
                pos += size
        for k, (a, b) in enumerate(zip(torch.stack(updates).tolist(), u["band_update_norms"])):
            ok, d = _close(a, b, exact)
            worst = max(worst, d)
            if not ok:
                raise fail(f"band {k} update norm {a!r} replayed, {b!r} recorded")
    worst = max(worst, _compare_end(module, opt, seg, artifact, exact, fmt))
    if ctx.held_out is not None and profiles is not None:
        profiles.append(_profile(ctx, module, artifact, seg.end["step"], cache))
    if tracer is not None and traces is not None:
        traces.extend(t.to_obj() for t in tracer.terms)
    return worst


def _rank_of(recipe: Mapping[str, Any], position: int) -> str:
    """", rank r" for a batch position of a step trained over ranks (specs/distributed.md §2), else ""."""
    if "ranks" not in recipe:
        return ""
    end = 0
    for r, size in enumerate(recipe["ranks"]):
        end += size
        if position < end:
            return f", rank {r}"
    return ""


def _autocast(recipe: Mapping[str, Any], for_loss: bool = False) -> Any:
    """The recorded autocast state (specs/training.md §3.2), or autocast off."""
    ac = recipe.get("autocast")
    if ac is None or (for_loss and recipe.get("loss_autocast", True) is False):
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(ac["device"], dtype=getattr(torch, ac["dtype"]))


def _forward_backward(module: Any, inputs: Sequence[Tensor], labels_all: Tensor, profiles_all: Tensor, u: Mapping[str, Any],
                      recipe: Mapping[str, Any], run_seed: int, loss_fn: Callable[..., Tensor],
                      loss_kw: Mapping[str, Any], fail: Callable[[str], ReplayError],
                      inspect: Callable[[Mapping[str, Any], Tensor, Tensor, Tensor], None] | None = None,
                      private: "_Private | None" = None) -> tuple[list[float], list[Tensor]]:
    """specs/training.md §3 steps 2-5 for each micro-batch in order: seed, forward through the routed
    program (under the recorded autocast), the run's loss of the output the recipe names, backward of
    it (divided by the recorded divisor); gradients add up across micro-batches. Returns the losses and,
    per micro-batch, each example's loss (the same loss with reduction "none", where the loss ran).
    ``inspect(u, output, index, labels)`` sees each micro-batch's forward before its backward."""
    divisor = recipe.get("loss_divisor", 1)
    leaf = recipe.get("output", 0)
    losses, each, pos = [], [], 0
    for j, size in enumerate(trained_pieces(u)):
        index = torch.tensor(u["batch"][pos:pos + size], dtype=torch.int64)
        profiles = profiles_all[pos:pos + size]
        pos += size
        torch.default_generator.manual_seed(micro_seed(run_seed, u["step"], j))
        try:
            with _autocast(recipe):
                out = module(inputs[0][index] if len(inputs) == 1 else tuple(t[index] for t in inputs), profiles)
        except RoutingNotProven as exc:
            raise fail(f"routing cannot be applied to the model program: {exc.args[0]}") from None
        leaves = [t for t in (out if isinstance(out, (list, tuple)) else [out])
                  if isinstance(t, Tensor) and t.is_floating_point()]
        if leaf >= len(leaves):
            raise fail(f"recipe.output {leaf} names no floating output of the model program ({len(leaves)})")
        if private is not None:
            leaves = list(leaves)
            leaves[leaf] = private.clip(leaves[leaf], labels_all[index])
        with _autocast(recipe, for_loss=True):
            loss = loss_fn(leaves[leaf], labels_all[index], **loss_kw)
            if "example_losses" in u:
                with torch.no_grad():
                    each.append(loss_fn(leaves[leaf].detach(), labels_all[index], **{**loss_kw, "reduction": "none"}))
        if inspect is not None:
            inspect(u, leaves[leaf], index, labels_all[index])
        (loss / divisor if divisor != 1 else loss).backward()
        losses.append(float(loss.detach()))
    if "ranks" in recipe:  # specs/distributed.md §3: the shards' sum (accumulated in rank order) over the world size
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(len(recipe["ranks"]))
    return losses, each


class _Private:
    """specs/privacy.md §2 in replay: each private example's recorded clip factor against the one re-measured
    through the replayed forward, then the factors mixed into the output as the trainer mixed them."""

    def __init__(self, record: Mapping[str, Any], rows: list[int], bands: Sequence[Sequence[Tensor]],
                 loss_fn: Callable[..., Tensor], loss_kw: Mapping[str, Any], fail: Callable[[str], ReplayError]) -> None:
        self.record, self.rows, self.bands, self.fail = record, rows, bands, fail
        self.example_loss = lambda out, labels: loss_fn(out, labels, **{**loss_kw, "reduction": "none"})

    def clip(self, leaf: Tensor, labels: Tensor) -> Tensor:
        recorded = self.record["factors"]
        measured = measured_factors(leaf, labels, self.example_loss, self.rows, self.bands, self.record["clip"])
        for i, m in zip(self.rows, measured):
            want = min(1.0, m)
            if factor_error(recorded[i], want) > FACTOR_TOLERANCE:
                raise self.fail(f"the clip factor of batch position {i} is {recorded[i]!r} recorded, {want!r} "
                                "re-measured from its gradient norms (specs/privacy.md §2)")
        return mix(leaf, torch.tensor(recorded, dtype=torch.float32))


def _clip(ordered: Sequence[Tensor], clip: Mapping[str, Any], exact: bool, fail: Callable[[str], ReplayError]) -> float:
    """The recorded user clip (specs/training.md §3.2), with torch's own function, over the trainable
    parameters that have a gradient, in the model's order; the norm it returns is compared."""
    with_grad = [p for p in ordered if p.grad is not None]
    if clip["kind"] == "value":
        torch.nn.utils.clip_grad.clip_grad_value_(with_grad, clip["clip_value"], clip["foreach"])
        return 0.0
    total = float(torch.nn.utils.clip_grad.clip_grad_norm_(with_grad, clip["max_norm"], clip["norm_type"], False,
                                                            clip["foreach"]))
    ok, d = _close(total, clip["total_norm"], exact)
    if not ok:
        raise fail(f"clip total norm {total!r} replayed, {clip['total_norm']!r} recorded")
    return d


def _compare_end(module: Any, opt: torch.optim.Optimizer, seg: Segment, artifact: Callable[[bytes], bytes | None],
                 exact: bool, fmt: int) -> float:
    state = _flatten(module, opt, fmt)
    digests, digest = digest_state(state)
    if digest == seg.end["digest"]:
        return 0.0
    expected = seg.end["tensors"]
    differing = sorted(n for n in set(digests) | set(expected) if digests.get(n) != expected.get(n))
    if exact:
        raise ReplayError(
            f"checkpoint for step {seg.end['step']} differs from the replayed state in {len(differing)} tensors "
            f"(first: {differing[0]!r})",
            seq=seg.end_seq, step=seg.end["step"],
        )
    recorded, _ = load_checkpoint(artifact(seg.end["artifact"]), seg.end, seg.end_seq)
    worst = 0.0
    for name in differing:
        a, b = state.get(name), recorded.get(name)
        if a is None or b is None or a.shape != b.shape:
            raise ReplayError(f"checkpoint tensor {name!r} is missing or has another shape", seq=seg.end_seq,
                              step=seg.end["step"])
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        if not torch.allclose(a64, b64, rtol=RTOL, atol=ATOL):
            raise ReplayError(f"checkpoint tensor {name!r} is outside the declared tolerance", seq=seg.end_seq,
                              step=seg.end["step"])
        worst = max(worst, float(((a64 - b64).abs() / b64.abs().clamp_min(ATOL)).max()) if a.numel() else 0.0)
    return worst
