"""A GovernedUpdate's ``recipe``: what the step did beyond the plain rule (specs/training.md §3.2).

Format 2 lets a step record gradient accumulation (``micro``, ``losses``), a loss divided by the number
of micro-batches (``loss_divisor``), autocast (``autocast``, ``loss_autocast``), the user's clip
(``clip``) and which output the loss used (``output``); format 7 the shards of a step trained over
torch.distributed ranks (``ranks``, specs/distributed.md). This module checks the recipe's shape;
replay (replay.py) applies it and compares what it recomputes. A recipe in a format-1 run, or any
field this text does not define, fails the step: nothing unrecorded can steer replay.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .privacy import check_form

__all__ = ["RecipeInvalid", "check_recipe", "micro_sizes", "shard_sizes", "trained_pieces"]

#: The autocast states replay can apply: CPU bf16 (this verifier's machine), CUDA bf16/fp16 where one is used.
AUTOCAST = {("cpu", "bfloat16"), ("cuda", "bfloat16"), ("cuda", "float16")}
FIELDS = frozenset({"micro", "losses", "loss_divisor", "autocast", "loss_autocast", "clip", "output", "ranks",
                    "privacy"})
#: Format 9: ``recipe.privacy``, a step under a policy with private rules (specs/privacy.md §4).
PRIVACY_FORMAT = 9
#: Format 7: ``recipe.ranks``, a step trained over torch.distributed ranks (specs/distributed.md).
RANKS_FORMAT = 7
CLIPS = {
    "norm": frozenset({"kind", "max_norm", "norm_type", "foreach", "total_norm"}),
    "value": frozenset({"kind", "clip_value", "foreach"}),
}


class RecipeInvalid(Exception):
    """The recipe is malformed, or names something its run's format does not allow."""


def _float(v: Any, nonneg: bool = True) -> bool:
    return type(v) is float and math.isfinite(v) and (v >= 0 or not nonneg)


def _uint(v: Any) -> bool:
    return type(v) is int and v >= 0


def micro_sizes(step: Mapping[str, Any]) -> list[int]:
    """The sizes of the step's micro-batches, in order (one micro-batch: the whole batch)."""
    recipe = step.get("recipe")
    if isinstance(recipe, dict) and "micro" in recipe:
        return list(recipe["micro"])
    return [len(step["batch"])]


def shard_sizes(batch: int, world: int) -> list[int]:
    """specs/distributed.md §2: a batch cut into ``world`` shards in rank order, the first ``batch % world`` one larger."""
    q, r = divmod(batch, world)
    return [q + 1 if i < r else q for i in range(world)]


def trained_pieces(step: Mapping[str, Any]) -> list[int]:
    """The sizes of what the step trained one after the other: its ranks' shards (format 7), its
    micro-batches (format 2), or the whole batch."""
    recipe = step.get("recipe")
    if isinstance(recipe, dict) and "ranks" in recipe:
        return list(recipe["ranks"])
    return micro_sizes(step)


def check_recipe(step: Mapping[str, Any], fmt: int, world: int | None = None) -> None:
    """Raise ``RecipeInvalid`` naming the field when the step's recipe is not one specs/training.md §3.2 allows.
    ``world``: the run's ``settings.distributed.world`` (specs/distributed.md), None for a run on one process."""
    if world is not None and "ranks" not in (step.get("recipe") or {}):
        raise RecipeInvalid(f"the run trains over {world} ranks, and the step records no recipe.ranks")
    if "recipe" not in step:
        return
    recipe = step["recipe"]
    if fmt < 2:
        raise RecipeInvalid("recipe is recorded, but the run is training format 1, which has none")
    if not isinstance(recipe, dict) or not recipe:
        raise RecipeInvalid("recipe is not a non-empty map")
    extra = sorted(set(recipe) - FIELDS)
    if extra:
        raise RecipeInvalid(f"recipe.{extra[0]} is not a field the spec defines")
    batch = len(step["batch"])
    k = 1
    if "micro" in recipe:
        micro = recipe["micro"]
        if type(micro) is not list or len(micro) < 2 or not all(_uint(n) and n >= 1 for n in micro):
            raise RecipeInvalid("recipe.micro is not a list of at least two positive sizes")
        if sum(micro) != batch:
            raise RecipeInvalid(f"recipe.micro sizes add up to {sum(micro)}, the batch has {batch} indices")
        k = len(micro)
        losses = recipe.get("losses")
        if type(losses) is not list or len(losses) != k or not all(_float(v) for v in losses):
            raise RecipeInvalid(f"recipe.losses is not one finite loss per micro-batch ({k})")
    elif "ranks" in recipe:
        _check_ranks(recipe, batch, fmt, world)
    elif "losses" in recipe:
        raise RecipeInvalid("recipe.losses without recipe.micro")
    if "loss_divisor" in recipe and (recipe["loss_divisor"] != k or k < 2 or type(recipe["loss_divisor"]) is not int):
        raise RecipeInvalid(f"recipe.loss_divisor {recipe['loss_divisor']!r} is not the step's {k} micro-batches")
    if "autocast" in recipe:
        ac = recipe["autocast"]
        if not isinstance(ac, dict) or set(ac) != {"device", "dtype"} or not all(
                type(v) is str for v in ac.values()) or (ac["device"], ac["dtype"]) not in AUTOCAST:
            raise RecipeInvalid(f"recipe.autocast {ac!r} is not one of {sorted(AUTOCAST)}")
    if "loss_autocast" in recipe and (recipe["loss_autocast"] is not False or "autocast" not in recipe):
        raise RecipeInvalid("recipe.loss_autocast is only ever false, and only with recipe.autocast")
    if "output" in recipe and not (_uint(recipe["output"]) and recipe["output"] >= 1):
        raise RecipeInvalid("recipe.output is not a positive output index (0 is left out)")
    if "clip" in recipe:
        _check_clip(recipe["clip"])
    if "privacy" in recipe:
        if fmt < PRIVACY_FORMAT:
            raise RecipeInvalid(f"recipe.privacy is a format-{PRIVACY_FORMAT} field, in a run of format {fmt}")
        other = sorted(set(recipe) - {"privacy"})
        if other:  # specs/privacy.md §8: nothing else is recorded with it yet
            raise RecipeInvalid(f"recipe.{other[0]} is not recorded with recipe.privacy (specs/privacy.md §8)")
        why = check_form(recipe["privacy"], batch)
        if why is not None:
            raise RecipeInvalid(why)


def _check_ranks(recipe: Mapping[str, Any], batch: int, fmt: int, world: int | None) -> None:
    if fmt < RANKS_FORMAT:
        raise RecipeInvalid(f"recipe.ranks is a format-{RANKS_FORMAT} field, in a run of format {fmt}")
    if world is None:
        raise RecipeInvalid("recipe.ranks is recorded, but the run's settings declare no torch.distributed ranks")
    ranks = recipe["ranks"]
    if type(ranks) is not list or ranks != shard_sizes(batch, world) or 0 in ranks:
        raise RecipeInvalid(f"recipe.ranks {ranks!r} is not the batch of {batch} cut into the run's {world} shards "
                            f"({shard_sizes(batch, world)}, specs/distributed.md §2)")
    losses = recipe.get("losses")
    if type(losses) is not list or len(losses) != world or not all(_float(v) for v in losses):
        raise RecipeInvalid(f"recipe.losses is not one finite loss per rank ({world})")
    extra = sorted(set(recipe) & {"micro", "loss_divisor"})  # a clip applies to the reduced gradient
    if extra:
        raise RecipeInvalid(f"recipe.{extra[0]} is not recorded with recipe.ranks (specs/distributed.md §3)")


def _check_clip(clip: Any) -> None:
    if not isinstance(clip, dict) or type(clip.get("kind")) is not str or clip["kind"] not in CLIPS or \
            set(clip) != CLIPS[clip["kind"]]:
        raise RecipeInvalid(f"recipe.clip {clip!r} is not a clip the spec defines")
    if clip["foreach"] is not None and type(clip["foreach"]) is not bool:
        raise RecipeInvalid("recipe.clip.foreach is not null or a bool")
    if clip["kind"] == "norm":
        if not (_float(clip["max_norm"]) and _float(clip["total_norm"])):
            raise RecipeInvalid("recipe.clip.max_norm and total_norm are not finite numbers >= 0")
        nt = clip["norm_type"]
        if type(nt) is not float or not (nt > 0 or nt == -math.inf) or math.isnan(nt):
            raise RecipeInvalid(f"recipe.clip.norm_type {nt!r} is not a norm order")
    elif not _float(clip["clip_value"]):
        raise RecipeInvalid("recipe.clip.clip_value is not a finite number >= 0")
