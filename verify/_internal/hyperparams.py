"""Recorded optimizer hyper-parameters, the only thing replay builds an optimizer from.

specs/replay.md §3 (hyper-parameters) and specs/training.md §6: a run's hyper-parameters are
those of ``RunStarted.settings.optimizer``. Every step's ``optimizer`` and ``lr`` must state the
same values, and every ``optim.group.<g>.<key>`` a checkpoint carries must be a value the record
states. The checkpoint's group state is checked, never loaded: a value that only the checkpoint
holds would otherwise steer replay while every record says something else.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Mapping

import torch
from torch import Tensor

#: name -> (required keys, optional keys): specs/training.md §6. The required keys change the
#: arithmetic of every step; the optional ones are kernel switches some torch versions lack.
KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "sgd": (frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"}),
            frozenset({"foreach", "differentiable", "fused"})),
    "adam": (frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"}),
             frozenset({"foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"})),
    "adamw": (frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"}),
              frozenset({"foreach", "capturable", "differentiable", "fused"})),
}
#: Values that the optimizer's name fixes (AdamW *is* Adam with decoupled weight decay): a record
#: need not state them, and a checkpoint that carries them must carry exactly these.
IMPLIED: dict[str, dict[str, Any]] = {"adamw": {"decoupled_weight_decay": True}}

#: Format 2: the hyper-parameters each step states for itself (an LR scheduler, a momentum cycle) and
#: replay sets before the step; checkpoints leave them out (specs/training.md §4, §6).
VARYING = frozenset({"lr", "momentum", "betas"})

_NUMBERS = frozenset({"lr", "momentum", "dampening", "weight_decay", "eps"})
_FLAGS = frozenset({"nesterov", "maximize", "amsgrad", "differentiable", "capturable", "decoupled_weight_decay"})
_SWITCHES = frozenset({"foreach", "fused"})  # bool, or null for torch's choice


class HyperParameterMismatch(Exception):
    """A recorded hyper-parameter is malformed, or two records (or a record and a checkpoint) disagree."""


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


def _check_value(key: str, v: Any, where: str) -> None:
    if key in _NUMBERS:
        ok = _number(v)
    elif key in _FLAGS:
        ok = type(v) is bool
    elif key in _SWITCHES:
        ok = v is None or type(v) is bool
    elif key == "betas":
        ok = type(v) is list and len(v) == 2 and all(_number(b) for b in v)
    else:
        ok = False
    if not ok:
        raise HyperParameterMismatch(f"{where}.{key} = {v!r} is not a valid value")


def check_description(desc: Any, where: str) -> None:
    """``{"name", "groups"}`` as specs/training.md §6 defines it: known name, required keys, plain values."""
    if not isinstance(desc, dict) or set(desc) != {"name", "groups"}:
        raise HyperParameterMismatch(f"{where} is not {{name, groups}}")
    name, groups = desc["name"], desc["groups"]
    if name not in KEYS:
        raise HyperParameterMismatch(f"{where}.name {name!r} is not an optimizer the spec defines")
    required, optional = KEYS[name]
    implied = IMPLIED.get(name, {})
    if type(groups) is not list or not groups:
        raise HyperParameterMismatch(f"{where}.groups is not a non-empty array")
    for g, group in enumerate(groups):
        at = f"{where}.groups[{g}]"
        if not isinstance(group, dict):
            raise HyperParameterMismatch(f"{at} is not a map")
        missing = sorted(required - set(group))
        if missing:
            raise HyperParameterMismatch(f"{at} does not state {', '.join(missing)}")
        extra = sorted(set(group) - required - optional - set(implied))
        if extra:
            raise HyperParameterMismatch(f"{at} states {', '.join(extra)}, which {name} does not have")
        for key, v in group.items():
            _check_value(key, v, at)
            if key in implied and not same(v, implied[key]):
                raise HyperParameterMismatch(f"{at}.{key} = {v!r}, but {name} means {implied[key]!r}")


def same(a: Any, b: Any) -> bool:
    """Equal as recorded values: same CBOR kind, and floats bit for bit (0.0 is not -0.0, 1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def check_step(run: Mapping[str, Any], step: Mapping[str, Any], fmt: int = 1) -> None:
    """One GovernedUpdate states the run's hyper-parameters: ``optimizer`` equal to RunStarted's, field
    for field (in format 2, every field but the ``VARYING`` ones, which need only be valid values), and
    ``lr`` equal to group 0's learning rate. The message names the first differing field."""
    if "optimizer" not in step:
        raise HyperParameterMismatch("the GovernedUpdate does not record its optimizer")
    check_description(step["optimizer"], "optimizer")
    desc = step["optimizer"]
    if desc["name"] != run["name"]:
        raise HyperParameterMismatch(f"optimizer.name is {desc['name']!r}, the run's (RunStarted) is {run['name']!r}")
    if len(desc["groups"]) != len(run["groups"]):
        raise HyperParameterMismatch(
            f"optimizer has {len(desc['groups'])} groups, the run's (RunStarted) has {len(run['groups'])}")
    for g, (mine, theirs) in enumerate(zip(desc["groups"], run["groups"])):
        for key in sorted(set(mine) | set(theirs)):
            if fmt >= 2 and key in VARYING and key in mine and key in theirs:
                continue  # stated by the step itself, checked valid by check_description
            if key not in mine or key not in theirs or not same(mine[key], theirs[key]):
                raise HyperParameterMismatch(
                    f"optimizer.groups[{g}].{key} is {mine.get(key, 'absent')!r}, "
                    f"the run's (RunStarted settings.optimizer) is {theirs.get(key, 'absent')!r}")
    lr = step.get("lr")
    if type(lr) is not float or lr != float(desc["groups"][0]["lr"]):
        raise HyperParameterMismatch(f"lr is {lr!r}, but optimizer.groups[0].lr is {desc['groups'][0]['lr']!r}")


def _tensor_value(t: Tensor) -> Any:
    if t.dim() != 0:
        return t  # not a scalar: never equal to a recorded value
    if t.dtype == torch.bool:
        return bool(t.item())
    if t.dtype == torch.int64:
        return int(t.item())
    if t.dtype.is_floating_point:
        return float(t.item())
    return t


def check_checkpoint_groups(run: Mapping[str, Any], tensors: Mapping[str, Tensor], fmt: int = 1) -> None:
    """Every ``optim.group.<g>.<key>`` of a checkpoint is a value the run's record states (or its
    optimizer name implies), and every number or flag the record states is in the checkpoint. In
    format 2 the ``VARYING`` hyper-parameters are in no checkpoint (each step states its own).

    A Python int, float or bool is stored as an int64, float64 or bool 0-d tensor
    (specs/training.md §4); a float-valued tensor (a tensor learning rate) compares by value.
    """
    groups = run["groups"]
    implied = IMPLIED.get(run["name"], {})
    seen: set[tuple[int, str]] = set()
    for name, t in tensors.items():
        if not name.startswith("optim.group."):
            continue
        g_text, _, key = name[len("optim.group."):].partition(".")
        if not g_text.isdigit() or str(int(g_text)) != g_text or int(g_text) >= len(groups) or not key:
            raise HyperParameterMismatch(f"checkpoint tensor {name!r} names no recorded optimizer group")
        g = int(g_text)
        stated = groups[g].get(key, implied.get(key))
        if fmt >= 2 and key in VARYING:
            raise HyperParameterMismatch(f"checkpoint carries {name!r}, which a format-2 checkpoint leaves to the "
                                         "steps' records")
        if key not in groups[g] and key not in implied:
            raise HyperParameterMismatch(f"checkpoint carries {name!r}, which the record does not state")
        got = _tensor_value(t)
        want = float(stated) if type(got) is float and type(stated) is float else stated
        if not same(got, want):
            raise HyperParameterMismatch(
                f"checkpoint {name!r} is {got!r}, the run's record (RunStarted settings.optimizer) states {stated!r}")
        seen.add((g, key))
    for g, group in enumerate(groups):
        for key, v in group.items():
            if type(v) in (bool, int, float) and (g, key) not in seen and not (fmt >= 2 and key in VARYING):
                raise HyperParameterMismatch(f"checkpoint lacks 'optim.group.{g}.{key}', which the record states")


#: specs/training.md §6: the loss settings a run may record (every one changes the loss).
LOSS_SETTINGS: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset({"reduction", "label_smoothing"}),
    "nll_loss": frozenset({"reduction"}),
}


def check_loss(loss: Any) -> None:
    """``settings.loss`` is ``{"name", "settings"}`` with a registered name, reduction ``"mean"`` (the
    gate's 1/B weights assume it) and no setting the registry does not define."""
    if not isinstance(loss, dict) or set(loss) != {"name", "settings"} or not isinstance(loss["settings"], dict):
        raise HyperParameterMismatch("RunStarted settings.loss is not {name, settings}")
    name, settings = loss["name"], loss["settings"]
    if name not in LOSS_SETTINGS:
        raise HyperParameterMismatch(f"RunStarted settings.loss.name {name!r} is not a loss the spec defines")
    extra = sorted(set(settings) - LOSS_SETTINGS[name])
    if extra:
        raise HyperParameterMismatch(f"RunStarted settings.loss.settings states {', '.join(extra)}, which {name} "
                                     "does not have in the registry")
    if settings.get("reduction") != "mean":
        raise HyperParameterMismatch(
            f"RunStarted settings.loss.settings.reduction is {settings.get('reduction')!r}, not 'mean'")
    smoothing = settings.get("label_smoothing", 0.0)
    if type(smoothing) is not float or not 0.0 <= smoothing <= 1.0:
        raise HyperParameterMismatch(
            f"RunStarted settings.loss.settings.label_smoothing {smoothing!r} is not in [0, 1]")


def apply_step(opt: torch.optim.Optimizer, step: Mapping[str, Any]) -> None:
    """Format 2: set each group's ``VARYING`` hyper-parameters to the values the step states (checked
    valid and otherwise equal to the run's by ``check_step``) before replaying it."""
    for group, stated in zip(opt.param_groups, step["optimizer"]["groups"]):
        for key in VARYING & set(stated):
            group[key] = tuple(stated[key]) if key == "betas" else stated[key]


def group_kwargs(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Constructor arguments per group, from the record alone (``betas`` as a tuple)."""
    return [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in run["groups"]]
