"""The verifier's recipe check (specs/training.md §3.2): every well-formed recipe passes, every
mutation either stays well formed or is refused naming a field, and a format-1 run has none."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.verify._internal.recipe import RecipeInvalid, check_recipe, micro_sizes

VALID: list[dict[str, Any]] = [
    {"micro": [4, 4, 2], "losses": [2.3, 2.2, 2.1], "loss_divisor": 3},
    {"autocast": {"device": "cpu", "dtype": "bfloat16"}, "loss_autocast": False},
    {"clip": {"kind": "norm", "max_norm": 1.0, "norm_type": 2.0, "foreach": None, "total_norm": 3.5}},
    {"clip": {"kind": "value", "clip_value": 0.01, "foreach": True}, "output": 1},
]


def step(recipe: Any, batch: int = 10) -> dict[str, Any]:
    return {"step": 0, "batch": list(range(batch)), "recipe": recipe}


@pytest.mark.parametrize("recipe", VALID)
def test_valid_recipes_pass_in_format_2_and_fail_in_format_1(recipe: dict[str, Any]) -> None:
    check_recipe(step(recipe), 2)
    with pytest.raises(RecipeInvalid, match="format 1"):
        check_recipe(step(recipe), 1)


def test_micro_sizes() -> None:
    assert micro_sizes(step(VALID[0])) == [4, 4, 2]
    assert micro_sizes({"batch": [1, 2, 3]}) == [3]


@pytest.mark.parametrize(("recipe", "field"), [
    ({"micro": [10]}, "micro"),
    ({"micro": [5, 4], "losses": [1.0, 1.0]}, "add up"),
    ({"micro": [5, 5], "losses": [1.0]}, "losses"),
    ({"micro": [5, 5], "losses": [1.0, 1.0], "loss_divisor": 3}, "loss_divisor"),
    ({"loss_divisor": 2}, "loss_divisor"),
    ({"autocast": {"device": "cpu", "dtype": "float16"}}, "autocast"),
    ({"loss_autocast": False}, "loss_autocast"),
    ({"output": 0}, "output"),
    ({"clip": {"kind": "norm", "max_norm": -1.0, "norm_type": 2.0, "foreach": None, "total_norm": 1.0}}, "max_norm"),
    ({"clip": {"kind": "norm", "max_norm": 1.0, "norm_type": math.nan, "foreach": None, "total_norm": 1.0}},
     "norm_type"),
    ({"clip": {"kind": "other"}}, "clip"),
    ({"seed": 3}, "seed"),
    ({}, "non-empty"),
])
def test_malformed_recipes_are_refused_naming_the_field(recipe: dict[str, Any], field: str) -> None:
    with pytest.raises(RecipeInvalid, match=field):
        check_recipe(step(recipe), 2)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths(v, prefix + (k,))] + [prefix]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _paths(v, prefix + (i,))] + [prefix]
    return [prefix]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mutation_is_well_formed_or_refused_never_a_crash(data: st.DataObject) -> None:
    recipe = copy.deepcopy(data.draw(st.sampled_from(VALID)))
    path = data.draw(st.sampled_from([p for p in _paths(recipe) if p]))
    value = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True),
                                st.text(max_size=5), st.lists(st.integers(0, 12), max_size=4),
                                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
    target = recipe
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        check_recipe(step(recipe), 2)
    except RecipeInvalid as exc:
        assert str(exc).startswith("recipe")
