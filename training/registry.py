"""The loss functions and optimizers a governed run may use, by name and settings.

Replay (the verifier, unlearning) must rebuild the exact update rule from the ledger alone, so
only rules with a fixed, documented meaning are accepted: a name plus plain settings, never a
pickled object. specs/training.md §3 lists the names and their torch equivalents.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .errors import GovernanceError

LossFn = Callable[[Tensor, Tensor], Tensor]

#: name -> default settings; every setting is passed to the torch functional of the same name.
LOSSES: dict[str, dict[str, Any]] = {
    "cross_entropy": {"reduction": "mean", "label_smoothing": 0.0},
    "nll_loss": {"reduction": "mean"},
}

#: name -> (class, the hyper-parameters recorded). Implementation switches (foreach, fused)
#: are recorded too: they select different kernels, which may round differently.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], tuple[str, ...]]] = {
    "sgd": (
        torch.optim.SGD,
        ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable", "fused"),
    ),
    "adam": (
        torch.optim.Adam,
        ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
         "fused", "decoupled_weight_decay"),
    ),
    "adamw": (
        torch.optim.AdamW,
        ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
         "fused"),
    ),
}


def loss_function(name: str, settings: Mapping[str, Any] | None = None) -> tuple[LossFn, dict[str, Any]]:
    """The loss callable ``(output, labels) -> scalar`` and its complete settings."""
    if name not in LOSSES:
        raise GovernanceError(f"loss {name!r} is not in the registry ({', '.join(LOSSES)})")
    full = dict(LOSSES[name])
    for key, value in (settings or {}).items():
        if key not in full:
            raise GovernanceError(f"loss {name!r} has no setting {key!r} (has {', '.join(full)})")
        full[key] = value
    if full["reduction"] != "mean":
        # Recorded losses and the gate's w_i = 1/B assume a batch mean.
        raise GovernanceError("governed losses use reduction 'mean'")
    fn = getattr(nn.functional, name)
    frozen = dict(full)
    return (lambda output, labels: fn(output, labels, **frozen)), full


def example_loss_function(name: str, settings: Mapping[str, Any]) -> LossFn:
    """The run's loss per example: the same torch functional and settings with ``reduction="none"``
    (what a format-4 GovernedUpdate records as ``example_losses``, specs/training.md §3.1)."""
    fn = getattr(nn.functional, name)
    frozen = {**settings, "reduction": "none"}
    return lambda output, labels: fn(output, labels, **frozen)


def _plain(value: Any) -> Any:
    # Settings go into CBOR: tuples become lists, 0-d tensors (a tensor lr) plain numbers.
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.item()
    return value


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    # Exact type: a subclass may override step() and change the update rule.
    for name, (cls, _) in OPTIMIZERS.items():
        if type(optimizer) is cls:
            return name
    raise GovernanceError(
        f"optimizer {type(optimizer).__name__} is not in the registry ({', '.join(OPTIMIZERS)}); "
        "replay could not rebuild its update rule"
    )


#: Hyper-parameters that the optimizer's name fixes, so the record need not state them
#: (specs/training.md §6): AdamW is Adam with decoupled weight decay.
IMPLIED: dict[str, dict[str, Any]] = {"adamw": {"decoupled_weight_decay": True}}


#: Format 2: the hyper-parameters a step may change (an LR scheduler, a momentum cycle). Each
#: GovernedUpdate records them and replay sets them before the step; every other one is fixed for
#: the run (specs/training.md §6).
VARYING: frozenset[str] = frozenset({"lr", "momentum", "betas"})
#: What torch's LR schedulers keep in a param group for themselves. ``optimizer.step()`` never reads
#: them, so they change no arithmetic: neither recorded nor checkpointed.
SCHEDULER_KEYS: frozenset[str] = frozenset({"initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum",
                                            "base_momentum"})


def checkpoint_skips(optimizer: torch.optim.Optimizer) -> frozenset[str]:
    """The param-group keys a format-2 checkpoint leaves out: the per-step ones and every key the
    registry does not name for this optimizer (a scheduler's bookkeeping)."""
    _, keys = OPTIMIZERS[optimizer_name(optimizer)]
    present = {k for g in optimizer.param_groups for k in g if k != "params"}
    return frozenset(VARYING | (present - set(keys) - set(IMPLIED.get(optimizer_name(optimizer), {}))))


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per parameter group, the registry's hyper-parameters as plain values, in group order.

    A scheduler's bookkeeping (``SCHEDULER_KEYS``) is left out: the optimizer never reads it. A group
    holding a number, flag or tensor under any other key (a setting of a newer torch) is refused:
    it may change the arithmetic, and no record would state it (specs/replay.md §3).
    """
    name = optimizer_name(optimizer)
    _, keys = OPTIMIZERS[name]
    implied = IMPLIED.get(name, {})
    for g, group in enumerate(optimizer.param_groups):
        for k, v in group.items():
            if k in keys or k == "params" or k in SCHEDULER_KEYS or not isinstance(v, (bool, int, float, Tensor)):
                continue
            if k not in implied or _plain(v) != implied[k]:
                raise GovernanceError(
                    f"optimizer param group {g} holds {k}={_plain(v)!r}, a hyper-parameter the record "
                    f"of a {name} run cannot state; replay would not reproduce it")
    return [{k: _plain(group[k]) for k in keys if k in group} for group in optimizer.param_groups]


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"name", "groups": [settings per group]}``: what RunStarted and GovernedUpdate record."""
    return {"name": optimizer_name(optimizer), "groups": group_settings(optimizer)}


def build_optimizer(description: Mapping[str, Any], groups: Iterable[Iterable[nn.Parameter]]) -> torch.optim.Optimizer:
    """Rebuild a recorded optimizer over ``groups`` (one parameter list per recorded group)."""
    name = description.get("name")
    if name not in OPTIMIZERS:
        raise GovernanceError(f"optimizer {name!r} is not in the registry ({', '.join(OPTIMIZERS)})")
    cls, keys = OPTIMIZERS[name]
    settings = list(description["groups"])
    params = [list(g) for g in groups]
    if len(params) != len(settings):
        raise GovernanceError(f"{len(params)} parameter groups for {len(settings)} recorded groups")
    built = []
    for ps, s in zip(params, settings):
        unknown = set(s) - set(keys)
        if unknown:
            raise GovernanceError(f"optimizer {name!r}: unknown settings {sorted(unknown)}")
        built.append({"params": ps, **{k: tuple(v) if k == "betas" else v for k, v in s.items()}})
    return cls(built)


__all__ = [
    "IMPLIED",
    "LOSSES",
    "SCHEDULER_KEYS",
    "VARYING",
    "checkpoint_skips",
    "OPTIMIZERS",
    "build_optimizer",
    "describe_optimizer",
    "example_loss_function",
    "group_settings",
    "loss_function",
    "optimizer_name",
]
