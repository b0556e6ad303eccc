"""The governed run's self-check: a step's gradient replayed from the exported program (specs/training.md §3.3).

Why here and not at verification: a loop can train and record a step that replay will not reproduce
(a loss term that bypasses the model's output, a gradient hook, a model that computes otherwise than
its export). The run replays the first step of every new recipe the way the verifier will (the
strict program loader and its interpreter, never ``torch.export.load``) and refuses the step when
the gradients differ: what is recorded is what was done, or the step does not happen.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from gradledger.ledger.program import Program, ProgramError, ProgramModule

from . import clipping
from .distributed import divide_gradients
from .gate import GatedModel
from .privacy import mix_factors
from .inputs import InputStructure
from .recorder import Micro, StepRefused, autocast, float_leaves
from .registry import LossFn

__all__ = ["replay_gradients"]


def replay_gradients(program: Program, gated: GatedModel, micros: Sequence[Micro], recipe: Mapping[str, Any], *,
                     step: int, inputs: InputStructure, loss_fn: LossFn, trainable: Sequence[str]) -> None:
    """Replay this step's gradient from the run's exported ``program`` (read back from its stored bytes by
    the strict loader, weights not read: ``load_program(data, weights=False)``), as the verifier will, and refuse the step when it differs from what the user's loop left on ``gated``'s parameters
    (specs/training.md §3.3). ``trainable``: the model's trainable parameter names, in its order.

    Run whenever a step's recipe is new to the run: it catches what no hook sees (a loss term that
    does not pass through the model's output, a gradient hook, a model that computes otherwise than
    its export, an op autocast treats differently in the program).
    """
    # Read back with the strict loader and run by its interpreter, the verifier's own path: never
    # torch.export.load, which would execute what the archive carries (specs/replay.md §2). On the live
    # weights: its parameters share their storage (the program only reads them), its buffers are copies.
    try:
        live = {"model." + n: t for n, t in gated.model.state_dict(keep_vars=True).items()}
        module = ProgramModule(program, weights=live)
    except ProgramError as exc:
        raise StepRefused(f"step {step}: the run's exported program cannot be replayed: {exc.args[0]}") from None
    params = dict(module.named_parameters())
    divisor = recipe.get("loss_divisor", 1)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for m in micros:
            torch.default_generator.manual_seed(m.seed)
            with autocast(m.autocast):
                out = module(*inputs.flatten(m.batch.inputs), m.batch.profiles)
            if m.factors is not None:  # specs/privacy.md §2: the private examples' clip factors at the output
                out = mix_factors(out, m.factors)
            leaf = float_leaves(out)[recipe.get("output", 0)]
            with autocast(m.autocast if recipe.get("loss_autocast", True) else None):
                loss = loss_fn(leaf, m.batch.labels)
            (loss / divisor if divisor != 1 else loss).backward()
    if "ranks" in recipe:  # the shards' gradients, summed in rank order above, divided by the world size
        divide_gradients(params.values(), len(recipe["ranks"]))
    if "clip" in recipe:
        order = [params["model." + n] for n in trainable if params["model." + n].grad is not None]
        clipping.replay_clip(order, recipe["clip"])
    for name, p in gated.named_parameters():
        mine = params.get(name)
        want = None if mine is None else mine.grad
        got = p.grad
        if (want is None) != (got is None) or (got is not None and not torch.equal(got, want)):
            raise StepRefused(
                f"step {step}: replaying this step from the exported program gives another gradient for "
                f"{name.removeprefix('model.')!r} than the training loop did: something outside the recorded "
                "recipe changed the gradient (a loss term that does not pass through the model's output, a "
                "gradient hook, a gradient edit), or the model computes differently than its export "
                "(e.g. under autocast); replay could not reproduce the step; step refused")
