"""The step recorder: what the user's own loop did in one optimizer step, recorded, or the step refused
(specs/training.md §3; the rule "record what was done or refuse the step").

The user's loop runs unchanged: ``x, y`` from the governed loader, the user's model call, the user's
loss and ``loss.backward()``, the user's ``clip_grad_norm_``, an LR scheduler, autocast, gradient
accumulation, and the user's own ``optimizer.step()``. The recorder sees it all through hooks,
the way Opacus's ``GradSampleModule`` and ``DPOptimizer`` do:

- the governed loader tells it each batch drawn (``drew``), and the governed model each forward
  (``before_forward`` / ``after_forward``: the micro-batch, its seed, the autocast state, and a hook
  that captures the gradient reaching the output);
- every band parameter's post-accumulate-grad hook stamps the gradient's version counter, so any
  change made to a gradient after backward is seen;
- torch's clip functions report to it while a run is active (``clipping.py``);
- the optimizer's own step pre- and post-hooks close the step: the recorder recognizes the loss
  whose gradient reached the output (the run's loss of the committed labels, possibly divided by
  the number of micro-batches, inside or outside autocast), checks nothing else touched the
  gradients, replays the step once from the exported program whenever the step's recipe is new,
  clips the bands, lets the optimizer step, measures and hands the record to the run.

Anything it cannot record so that replay reproduces it bit for bit is refused at that step, before
the optimizer steps, with the cause and the remedy.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from . import clipping
from .bands import ResolvedBands
from .errors import GovernanceError
from .gate import clip_bands
from .loss_grad import direct_loss_grads
from .distributed import RankRefused, shards
from .order import micro_seed
from .privacy import NormTaps, add_noise, batch_factors, mix_factors
from .registry import LossFn
from .updates import delta_norms

__all__ = ["Micro", "StepRecorder", "StepRefused", "recipe_signature"]


class StepRefused(GovernanceError):
    """A step the ledger could not record so that replay reproduces it; nothing was stepped or recorded."""


@dataclass
class Micro:
    """One batch drawn within the current optimizer step (several under gradient accumulation)."""

    batch: Any  # trainer.Batch
    seed: int
    output: list[Tensor] | None = None  # the float leaves of the routed output, in pytree order
    grads: dict[int, Tensor] = field(default_factory=dict)  # leaf index -> gradient that reached it
    autocast: tuple[str, str] | None = None  # (device type, dtype name) when the forward ran under autocast
    example_losses: Tensor | None = None  # float32, one per example: the run's loss with reduction "none"
    handles: list[RemovableHandle] = field(default_factory=list)
    #: specs/privacy.md §2: per example, the clip factor its output was mixed by (1.0: not private); or None.
    factors: list[float] | None = None


def recipe_signature(recipe: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two steps' recipes the same kind of step (a new kind is replayed once by the trainer)."""
    clip = recipe.get("clip")
    return (len(recipe.get("micro", recipe.get("ranks", [0]))), recipe.get("loss_divisor", 1), recipe.get("loss_autocast", True),
            tuple(sorted((recipe.get("autocast") or {}).items())), None if clip is None else clip["kind"],
            recipe.get("output", 0), "privacy" in recipe)


def _autocast_state() -> tuple[str, str] | None:
    # CPU autocast is what this machine trains with; CUDA where a device is in use.
    for device in ("cpu", "cuda"):
        if device == "cuda" and not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            continue
        if torch.is_autocast_enabled(device):
            return device, str(torch.get_autocast_dtype(device)).removeprefix("torch.")
    return None


@contextlib.contextmanager
def autocast(state: tuple[str, str] | None) -> Iterator[None]:
    """Run under the recorded autocast state (or with autocast off, when ``state`` is None)."""
    if state is None:
        if not torch.is_autocast_enabled("cpu"):
            yield  # already off: entering torch.autocast(enabled=False) would cost a few microseconds a call
            return
        with torch.autocast("cpu", enabled=False):
            yield
        return
    device, dtype = state
    with torch.autocast(device, dtype=getattr(torch, dtype)):
        yield


def float_leaves(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict, ModelOutput), in pytree order."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]


class StepRecorder:
    """Hooks on the user's model, parameters and optimizer; one GovernedUpdate body per optimizer step.

    ``run`` is the governed run (``trainer.Governance``); the recorder reads its public plan
    (bands, seed, loss, step) and hands each finished step to ``run.record_step``.
    """

    def __init__(self, run: Any, model: nn.Module, bands: ResolvedBands, optimizer: torch.optim.Optimizer,
                 loss_fn: LossFn, param_order: Sequence[nn.Parameter]) -> None:
        self.run, self.model, self.bands, self.optimizer, self.loss_fn = run, model, bands, optimizer, loss_fn
        self.flat = [p for ps in bands.params for p in ps]
        self._governed = {id(p) for p in self.flat}  # what a clip call is told apart by (another model's or ours)
        self.sizes = [len(ps) for ps in bands.params]
        self.param_order = list(param_order)
        self.pending: list[Micro] = []
        self.clips: list[tuple[dict[str, Any], float | None]] = []
        self._stamps: dict[int, tuple[Tensor, int]] = {}
        self._checked: set[tuple[Any, ...]] = set()
        self._snapshot: list[Tensor] | None = None
        self._measured: tuple[dict[str, Any], list[float]] | None = None
        #: Every shard of the step being taken (a distributed step, on rank 0), else this process's micro-batches.
        self._global: list[Micro] = []
        self._handles: list[RemovableHandle] = []
        #: Over torch.distributed ranks: the gradients' all-gather, started during backward (distributed.py).
        self._gather = run.ranks.gradient_gather(self.flat, run.gather_group) if run.ranks is not None else None
        #: Over ranks, once the step's gradients are reduced (at the user's clip, else at the step): the
        #: step's recipe before any clip and every rank's facts (_reduce).
        self._reduced: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
        #: specs/privacy.md §2: Opacus's ghost norms on the private bands' layers, where the policy has private rules.
        self._taps = NormTaps(model, bands.params, run.privacy) if run.privacy is not None else None
        for p in self.flat:
            self._handles.append(p.register_post_accumulate_grad_hook(self._backward_left))
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        clipping.listen(self)

    def detach(self) -> None:
        """Remove every hook (the run is closed, or failed to start)."""
        clipping.unlisten(self)
        if self._taps is not None:
            self._taps.remove()
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.pending:
            for h in m.handles:
                h.remove()
        self.pending = []

    # -- the loader and the model -------------------------------------------------------------

    def drew(self, batch: Any) -> None:
        """A batch was drawn for the current step (micro-batch ``len(pending)``)."""
        if self.pending:
            last = self.pending[-1]
            if last.output is None:
                raise StepRefused(f"step {self.run.step}: a batch was drawn before the previous one went through "
                                  "the model: call model(x), loss.backward() for each batch drawn")
            if not last.grads:
                raise StepRefused(f"step {self.run.step}: a batch was drawn before loss.backward() of the previous "
                                  "one: each batch drawn must be trained (forward and backward) before the next")
        ranks = self.run.ranks
        if ranks is not None and self.pending:
            raise StepRefused(f"step {self.run.step}: gradient accumulation over torch.distributed ranks is not "
                              "recorded yet: draw one batch per optimizer step on every rank (a larger per-rank "
                              "batch size trains the same examples per step)")
        # Shard r of a distributed step is its micro-batch r: seeded as such (specs/distributed.md §2).
        j = ranks.rank if ranks is not None else len(self.pending)
        self.pending.append(Micro(batch, micro_seed(self.run.seed, self.run.step, j)))

    def current(self) -> Micro:
        """The micro-batch the next training forward must be of."""
        if not self.pending or self.pending[-1].output is not None:
            raise GovernanceError("a training forward needs a batch drawn from the governed loader, "
                                  "one forward per batch")
        return self.pending[-1]

    def before_forward(self, micro: Micro) -> None:
        """Check the run's state for this forward, then seed it (dropout replays from the seed)."""
        if len(self.pending) == 1:
            self._fresh_gradients()
            if self._gather is not None:
                self._gather.discard()  # what an abandoned step started (every rank started it too)
        micro.autocast = _autocast_state()
        first = self.pending[0].autocast if len(self.pending) > 1 else micro.autocast
        if micro.autocast != first:
            raise StepRefused(f"step {self.run.step}: micro-batches of one step ran under different autocast "
                              "states; keep one autocast state per optimizer step")
        if self._taps is not None:
            self._taps.clear()
        torch.default_generator.manual_seed(micro.seed)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(micro.seed)

    def after_forward(self, micro: Micro, out: Any) -> Any:
        """Capture the gradient that will reach each floating output of this forward (after the private
        examples' clip factors, specs/privacy.md §2, where the policy has private rules)."""
        leaves = float_leaves(out)
        if not leaves:
            raise GovernanceError("the model output has no floating-point tensor to train on")
        if self.run.privacy is not None:
            out = self._clip_private(micro, out, leaves[0])
            leaves = float_leaves(out)
        micro.output = leaves
        for i, leaf in enumerate(leaves):
            if leaf.requires_grad:
                micro.handles.append(leaf.register_hook(self._grad_catcher(micro, i)))
        return out

    def _clip_private(self, micro: Micro, out: Any, leaf: Tensor) -> Any:
        """specs/privacy.md §2: each private example's clip factor, measured through this forward, mixed into
        the output (forward value unchanged, its gradient scaled), so the user's backward is the clipped sum."""
        plan, step = self.run.privacy, self.run.step
        assert plan is not None
        if micro.autocast is not None or len(self.pending) > 1:
            raise StepRefused(f"step {step}: a run under a privacy policy does not record autocast or gradient "
                              "accumulation yet (specs/privacy.md §8); train in float32, one batch per step")
        if not leaf.requires_grad or leaf.dim() == 0 or leaf.shape[0] != len(micro.batch):
            raise StepRefused(f"step {step}: under a privacy policy the loss is computed from the model's first "
                              "floating output, one row per example (specs/privacy.md §8); this output is not that "
                              "(for a HuggingFace model, call it without labels and compute the loss from .logits)")
        micro.factors = batch_factors(leaf, micro.batch.labels, self.run.example_loss_fn, micro.batch.rules,
                                      self.bands.params, plan, self._taps)
        if self._taps is not None:
            self._taps.clear()  # the layers' inputs and outputs: not held past the measurement
        return mix_factors(out, micro.factors)

    @staticmethod
    def _grad_catcher(micro: Micro, i: int) -> Callable[[Tensor], None]:
        def catch(grad: Tensor) -> None:
            if i in micro.grads:
                raise StepRefused("the output of one forward was backpropagated twice: one backward per batch")
            micro.grads[i] = grad.detach()
        return catch

    def _fresh_gradients(self) -> None:
        # A step's gradient is what its own backward(s) produce. Zeros left by zero_grad(set_to_none=False)
        # are dropped (None): bit for bit the same sum except for the sign of zero, which replay could not know.
        stale = [p for p in self.flat if p.grad is not None]
        if not stale:
            return
        norms = torch._foreach_norm([p.grad for p in stale], 2)
        if any(bool(n != 0) for n in norms):
            raise StepRefused(f"step {self.run.step}: gradients from before this step are still there: call "
                              "optimizer.zero_grad() before the step's first forward")
        for p in stale:
            p.grad = None

    # -- gradients ------------------------------------------------------------------------

    def _backward_left(self, p: Tensor) -> None:
        self._stamp(p)
        if self._gather is not None and p.grad is not None:
            self._gather.ready(p)

    def _stamp(self, p: Tensor) -> None:
        if p.grad is not None:
            self._stamps[id(p)] = (p.grad, p.grad._version)

    def _ours(self, params: list[Tensor]) -> bool:
        return any(id(p) in self._governed for p in params)

    def clipping(self, params: list[Tensor]) -> None:
        """torch's clip function is about to run over ``params`` (clipping.py). Over torch.distributed ranks the
        step's gradients are reduced first (specs/distributed.md §3), as DDP has reduced them by then: the clip
        sees, on every rank alike, the gradient one process replays (the shards' sum over the world size)."""
        if self.run.ranks is None or self._reduced is not None or not self._ours(params):
            return
        self._reduce(self.pending, None)

    def clipped(self, params: list[Tensor], call: dict[str, Any], total_norm: float | None) -> None:
        """torch's clip function ran over ``params`` (clipping.py): record it, or note it cannot be."""
        if not self._ours(params):
            return  # another model's parameters
        with_grad = [p for p in params if p.grad is not None]
        order = [p for p in self.param_order if p.grad is not None]
        if len(with_grad) != len(order) or any(a is not b for a, b in zip(with_grad, order)):
            call = dict(call, unrecordable="it clipped a subset of the model's parameters, or another order; clip "
                                           "model.parameters() as a whole, or use the policy's band limits")
        self.clips.append((call, total_norm))
        for p in with_grad:
            self._stamp(p)

    # -- the optimizer's step ------------------------------------------------------------------

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        step = self.run.step
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:  # args[0] is the optimizer
            raise StepRefused(f"step {step}: a governed optimizer takes no closure: one governed step is the "
                              "forward(s) and backward(s) of the batches drawn for it")
        if not self.run.started or self.run.closed:
            raise GovernanceError("the run is not active")
        # The last checkpoint reads the parameters and optimizer state in place: not stepped before it has.
        self.run.await_checkpoint_read()
        self.run.check_recording()  # a record the thread could not append ends the run here, before the step
        micros = self.pending
        if not micros or any(m.output is None for m in micros):
            raise StepRefused(f"step {step}: optimizer.step() needs a forward of the batch drawn for it through "
                              "the governed model")
        if any(not m.grads for m in micros):
            raise StepRefused(f"step {step}: optimizer.step() before loss.backward() of every batch drawn for it")
        if self.run.ranks is not None:
            recipe, losses = self._distributed(optimizer, micros)
        else:
            self.run.check_hyperparameters(optimizer)
            recipe, losses = self._recipe(micros)
            self._check_gradients(recipe)
            if self.run.privacy is not None:
                recipe["privacy"] = self._privacy(micros, recipe)
            signature = recipe_signature(recipe)
            if signature not in self._checked:
                self.run.self_check(micros, recipe)
                self._checked.add(signature)
            self._global = micros
            if self.run.privacy is not None:  # after the self-check, which replays the clipped sum only
                add_noise(self.bands.params, self.run.privacy, self.run.seed, step, len(micros[0].batch))
        grad_norms = clip_bands(self.model, self.bands, self.run.limits(micros))
        loss = math.fsum(losses) / len(losses)
        if not math.isfinite(loss) or not all(math.isfinite(n) for n in grad_norms):
            raise StepRefused(f"step {step}: non-finite loss or band gradient norm; step refused")
        if self._snapshot is None:
            # Reused step to step (no allocation, no page faults); dropped at checkpoints.
            self._snapshot = [torch.empty_like(p) for p in self.flat]
        with torch.no_grad():
            torch._foreach_copy_(self._snapshot, self.flat)
        self._measured = ({"recipe": recipe, "loss": loss}, grad_norms)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert self._measured is not None and self._snapshot is not None
        (facts, grad_norms), self._measured = self._measured, None
        with torch.no_grad():
            update_norms = delta_norms(self.flat, self._snapshot, self.sizes)
        micros, self.pending, self.clips = self.pending, [], []
        for m in micros:
            for h in m.handles:
                h.remove()
        self._stamps.clear()
        if not all(math.isfinite(n) for n in update_norms):
            raise GovernanceError(f"step {self.run.step}: non-finite update; the run cannot continue")
        # Every rank's shard (a distributed step), else this process's micro-batches.
        everyone, self._global = self._global, []
        self.run.record_step(everyone, facts["recipe"], facts["loss"], grad_norms, update_norms, optimizer)

    def _distributed(self, optimizer: torch.optim.Optimizer, micros: list[Micro]) -> tuple[dict[str, Any], list[float]]:
        """A step over torch.distributed ranks (specs/distributed.md §3): the gradients reduced in rank order
        (here, or already at the user's clip); every rank's hyper-parameters and recipe (its clip included)
        agreed; the self-check on rank 0, agreed by all. Every rank decides alike from the same exchanged
        facts, so all refuse or none; every rank runs the same collectives in the same order."""
        run, ranks, step = self.run, self.run.ranks, self.run.step
        assert ranks is not None and self._gather is not None
        early = self._reduced is not None  # reduced at the user's clip: its gradients may have changed since
        if not early:
            self._reduce(micros, optimizer)
        assert self._reduced is not None
        (pre, shared), self._reduced = self._reduced, None
        recipe: dict[str, Any] | None = dict(pre)
        if any(f["at_clip"] for f in shared):
            # Some rank reduced at its clip: what the clip did, and the hyper-parameters the step then runs
            # with, are known only now, so every rank (those that did not clip too) agrees them in a second
            # exchange. Without a clip on any rank the first exchange carried both, and the step needs one.
            why, hyper = None, None
            try:
                hyper = run.check_hyperparameters(optimizer)
                clip = self._clip(step)
                if clip is not None:
                    recipe["clip"] = clip
                if early:
                    self._check_gradients(recipe)
            except GovernanceError as exc:
                why, recipe = str(exc), None
            everyone = ranks.exchange((why, recipe, hyper))
            ranks.verdict([w for w, _, _ in everyone], f"step {step}")
            agreed = [(r, h) for _, r, h in everyone]
        else:
            agreed = [(f["recipe"], f["hyper"]) for f in shared]
        for r, (theirs, hyper) in enumerate(agreed):
            mine = " (this rank)" if r == ranks.rank else ""
            if theirs != agreed[0][0]:
                raise RankRefused(f"step {step}: rank {r}{mine}: its step did {theirs}, rank 0's did "
                                  f"{agreed[0][0]}; every rank runs one recipe (clip on every rank, or on none)")
            if hyper != agreed[0][1]:
                raise RankRefused(f"step {step}: rank {r}{mine}: its optimizer is {hyper}, rank 0's is {agreed[0][1]}; "
                                  "every rank steps with the same hyper-parameters (one scheduler, stepped alike)")
        recipe = agreed[0][0]
        assert recipe is not None
        cut = shards(run.step_indices, ranks.world)
        losses = [f["loss"] for f in shared]
        recipe = {**recipe, "ranks": [len(f["indices"]) for f in shared], "losses": losses}
        if ranks.writer:
            everything = []
            for r, f in enumerate(shared):
                m = micros[0] if r == 0 else Micro(run.shard_batch(step, cut[r], micros[0].batch.limits),
                                                   micro_seed(run.seed, step, r), autocast=micros[0].autocast)
                m.example_losses = torch.tensor(f["example_losses"], dtype=torch.float32)
                everything.append(m)
            self._global = everything
        signature = recipe_signature(recipe)
        if signature not in self._checked:
            why = None
            if ranks.writer:
                try:
                    run.self_check(self._global, recipe)
                except GovernanceError as exc:
                    why = str(exc)
            ranks.agree(why, f"step {step}")
            self._checked.add(signature)
        return recipe, losses

    def _reduce(self, micros: list[Micro], optimizer: torch.optim.Optimizer | None) -> None:
        """Every rank's own checks of what its backward left, agreed by all, its shard checked against the
        step's cut; then the gradients reduced in rank order (distributed.GradientGather). ``optimizer`` is
        None at the user's clip; at the step, the hyper-parameters are checked and exchanged here too."""
        run, ranks, step = self.run, self.run.ranks, self.run.step
        assert ranks is not None and self._gather is not None
        why, facts, pre = None, None, None
        try:
            if not micros or any(not m.grads for m in micros):
                raise StepRefused(f"step {step}: a gradient clip before loss.backward() of the batch drawn for it")
            hyper = None if optimizer is None else run.check_hyperparameters(optimizer)
            pre, losses = self._recipe(micros)
            self._check_gradients(pre)
            unsupported = sorted(set(pre) - {"autocast", "loss_autocast", "output"})
            if unsupported:
                raise StepRefused(f"step {step}: recipe.{unsupported[0]} over torch.distributed ranks is not recorded "
                                  "yet (loss scaling, accumulation); backpropagate each rank's own loss once a step")
            m = micros[0]
            assert m.example_losses is not None
            facts = {"recipe": pre, "loss": losses[0], "indices": m.batch.indices,
                     "example_losses": m.example_losses.detach().reshape(-1).tolist(),
                     "grads": [p.grad is not None for p in self.flat], "at_clip": optimizer is None, "hyper": hyper}
        except GovernanceError as exc:
            why = str(exc)
        everyone = ranks.exchange((why, facts))
        try:
            ranks.verdict([w for w, _ in everyone], f"step {step}")
        except RankRefused:
            self._gather.discard()
            raise
        shared = [f for _, f in everyone]
        cut = shards(run.step_indices, ranks.world)
        for r, (f, want) in enumerate(zip(shared, cut)):
            problem = None
            if f["indices"] != want:
                problem = f"it trained examples {f['indices'][:8]}, the run's shard {r} of step {step} is {want[:8]}"
            elif f["recipe"] != shared[0]["recipe"]:  # before the gradients are touched (its clip comes later)
                problem = f"its step did {f['recipe']}, rank 0's did {shared[0]['recipe']}; every rank runs one recipe"
            elif f["grads"] != shared[0]["grads"]:
                problem = "a parameter has a gradient on some ranks and none on others"
            if problem is not None:
                self._gather.discard()
                raise RankRefused(f"step {step}: rank {r}: {problem}")
        self._gather.reduce([p for p, has in zip(self.flat, shared[0]["grads"]) if has])
        for p in self.flat:  # the reduction is recorded (recipe.ranks): a later edit is not
            self._stamp(p)
        assert pre is not None
        self._reduced = (pre, shared)

    def _privacy(self, micros: list[Micro], recipe: Mapping[str, Any]) -> dict[str, Any]:
        """``recipe.privacy`` (specs/privacy.md §4), or a refusal of what it cannot record yet."""
        plan, step = self.run.privacy, self.run.step
        assert plan is not None
        other = sorted(set(recipe) - {"output"})
        if other or recipe.get("output", 0) != 0 or micros[0].factors is None:
            why = f"recipe.{other[0]}" if other else "a loss on another output than the first"
            raise StepRefused(f"step {step}: a run under a privacy policy does not record {why} yet (specs/privacy.md "
                              "§8): use the policy's band limits instead of a clip, and the model's first output")
        return plan.record(micros[0].factors, len(micros[0].batch) / self.run.dataset.count)

    def drop_snapshot(self) -> None:
        """Free the snapshot buffers (a checkpoint is about to copy the state)."""
        self._snapshot = None

    # -- what the step did ------------------------------------------------------------------

    def _recipe(self, micros: list[Micro]) -> tuple[dict[str, Any], list[float]]:
        """The step's recipe (specs/training.md §3.2) and each micro-batch's loss; refuse what has none."""
        step, k = self.run.step, len(micros)
        recipe: dict[str, Any] = {}
        outputs = {i for m in micros for i in m.grads}
        if len(outputs) != 1:
            raise StepRefused(f"step {step}: the loss used {len(outputs)} of the model's outputs; a governed loss is "
                              "computed from one output tensor (for a HuggingFace model, outputs.logits)")
        (leaf,) = outputs
        if leaf:
            recipe["output"] = leaf
        losses, kinds = [], set()
        for j, m in enumerate(micros):
            value, divisor, inside = self._recognize(m, leaf, k, step, j)
            losses.append(value)
            kinds.add((divisor, inside))
        if len(kinds) != 1:
            raise StepRefused(f"step {step}: the micro-batches of one step were scaled differently; divide every "
                              "micro-batch's loss by the same number of micro-batches")
        ((divisor, inside),) = kinds
        if k > 1:
            recipe["micro"] = [len(m.batch) for m in micros]
            recipe["losses"] = losses
        if divisor != 1:
            recipe["loss_divisor"] = divisor
        if micros[0].autocast is not None:
            device, dtype = micros[0].autocast
            recipe["autocast"] = {"device": device, "dtype": dtype}
            if not inside:
                recipe["loss_autocast"] = False
        clip = self._clip(step)
        if clip is not None:
            recipe["clip"] = clip
        return recipe, losses

    def _recognize(self, m: Micro, leaf: int, k: int, step: int, j: int) -> tuple[float, int, bool]:
        """Which recordable loss sent ``m``'s output gradient: (its value, divisor, computed under autocast)."""
        got = m.grads[leaf]
        assert m.output is not None
        labels = m.batch.labels
        divisors = [1, k] if k > 1 else [1]
        run = self.run
        if m.autocast is None:
            # The plain case without the autograd engine: the same kernels, bit for bit (loss_grad.py).
            direct = direct_loss_grads(run.loss_name, run.loss_settings, m.output[leaf], labels, divisors)
            if direct is not None:
                loss, wants, each = direct
                for d, want in zip(divisors, wants):
                    if want.dtype == got.dtype and want.shape == got.shape and torch.equal(want, got):
                        m.example_losses = each.to(torch.float32)
                        return float(loss), d, False
                self._refuse_loss(k, step, j)
        out = m.output[leaf].detach().requires_grad_()
        places = [m.autocast, None] if m.autocast is not None else [None]
        with torch.enable_grad():
            for place in places:
                with autocast(place):
                    loss = self.loss_fn(out, labels)
                for d in divisors:
                    (want,) = torch.autograd.grad(loss / d if d != 1 else loss, out, retain_graph=True)
                    if want.dtype == got.dtype and want.shape == got.shape and torch.equal(want, got):
                        # Each example's loss from the same output, where the loss ran (specs/training.md §3.1).
                        with torch.no_grad(), autocast(place):
                            m.example_losses = run.example_loss_fn(out.detach(), labels).to(torch.float32)
                        return float(loss.detach()), d, place is not None
        self._refuse_loss(k, step, j)

    def _refuse_loss(self, k: int, step: int, j: int) -> NoReturn:
        run = self.run
        scaled = f", nor of it divided by the {k} micro-batches" if k > 1 else ""
        raise StepRefused(
            f"step {step}: the gradient that reached the model's output (batch {j} of the step) is not that of the "
            f"run's loss {run.loss_name} {dict(run.loss_settings)} of the committed labels{scaled}; replay could not "
            "reproduce it. Compute the loss with the loss the run declares (govern(..., loss=..., loss_settings=...): "
            f"{', '.join(run.loss_names)}) from the labels the governed loader yields, on one output tensor, and "
            "backpropagate it (or it divided by the number of micro-batches)")

    def _clip(self, step: int) -> dict[str, Any] | None:
        if not self.clips:
            return None
        if len(self.clips) > 1:
            raise StepRefused(f"step {step}: the gradients were clipped {len(self.clips)} times; a governed step "
                              "records one clip (clip once, after the last backward, before optimizer.step())")
        call, total = self.clips[0]
        if "unrecordable" in call:
            raise StepRefused(f"step {step}: a gradient clip cannot be recorded: {call['unrecordable']}")
        if call["kind"] == "norm":
            if call["error_if_nonfinite"] or not math.isfinite(total or 0.0):
                raise StepRefused(f"step {step}: the clipped gradient norm is not finite; step refused")
            return {**{k: v for k, v in call.items() if k != "error_if_nonfinite"}, "total_norm": total}
        return dict(call)

    def _check_gradients(self, recipe: Mapping[str, Any]) -> None:
        # Every gradient must be as backward (and a recorded clip) left it: the version counter of a
        # tensor moves with every in-place change, so an edit made any other way is seen here.
        for p in self.flat:
            if p.grad is None:
                continue
            stamp = self._stamps.get(id(p))
            if stamp is None or stamp[0] is not p.grad or stamp[1] != p.grad._version:
                name = self.run.name_of(p)
                raise StepRefused(
                    f"step {self.run.step}: the gradient of {name!r} changed after backward by something the ledger "
                    "does not record (a hand edit, a hook, or a clip function imported before the run started); "
                    "clip with torch.nn.utils.clip_grad_norm_ / clip_grad_value_ called through torch.nn.utils, or "
                    "leave clipping to the policy's band limits; step refused")
