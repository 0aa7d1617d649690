"""The method registry: every method type the spec accepts has a recipe, and each method class states the facts
the rest of the platform asks (objective, data kind, trained weights, reference model) in one place."""

from __future__ import annotations

import pytest

from tuneplane.spec import (
    METHOD_CLASSES,
    METHOD_TYPES,
    DpoMethod,
    FullMethod,
    LoraMethod,
    OrpoMethod,
    PartialMethod,
    format_kind,
)
from tuneplane.spec._fields import FormatName
from tuneplane.train.preference_recipe import PreferenceTuningRecipe
from tuneplane.train.recipe import InstructionTuningRecipe
from tuneplane.train.recipes import RECIPES


def test_every_method_type_has_exactly_one_recipe() -> None:
    assert set(RECIPES) == set(METHOD_TYPES)
    assert len(METHOD_TYPES) == len(set(METHOD_TYPES)) == len(METHOD_CLASSES)


@pytest.mark.parametrize(
    ("method", "objective", "data_kind", "weights", "recipe"),
    [
        (LoraMethod(), "next_token", "instruction", LoraMethod, InstructionTuningRecipe),
        (FullMethod(), "next_token", "instruction", FullMethod, InstructionTuningRecipe),
        (PartialMethod(last_n_layers=1), "next_token", "instruction", PartialMethod, InstructionTuningRecipe),
        (DpoMethod(), "preference", "preference", LoraMethod, PreferenceTuningRecipe),
        (DpoMethod(base="full"), "preference", "preference", FullMethod, PreferenceTuningRecipe),
        (OrpoMethod(), "preference", "preference", LoraMethod, PreferenceTuningRecipe),
        (OrpoMethod(base="full"), "preference", "preference", FullMethod, PreferenceTuningRecipe),
    ],
)
def test_each_method_states_its_facts(method, objective, data_kind, weights, recipe) -> None:
    assert method.objective == objective and method.data_kind == data_kind
    assert type(method.trained_weights()) is weights
    assert RECIPES[method.type] is recipe


def test_format_kinds_cover_every_format() -> None:
    from typing import get_args

    kinds = {fmt: format_kind(fmt) for fmt in get_args(FormatName)}
    assert kinds.pop("preference") == "preference"
    assert set(kinds.values()) == {"instruction"}
