"""Which recipe trains which method: the method registry's runtime half (its spec half is
`tuneplane.spec.method.Method`), and the per-worker entry point Ray Train starts.

A new method adds its spec class to `Method`, its recipe (a subclass of `InstructionTuningRecipe` overriding the
hooks it trains differently with) and its loss module, and one line here. tests/test_methods.py fails while a
method type has no recipe.
"""

from __future__ import annotations

from typing import Any

from tuneplane.files import confine_process
from tuneplane.spec import parse_spec
from tuneplane.train.preference_recipe import PreferenceTuningRecipe
from tuneplane.train.recipe import InstructionTuningRecipe

RECIPES: dict[str, type[InstructionTuningRecipe]] = {
    "lora": InstructionTuningRecipe,
    "full": InstructionTuningRecipe,
    "partial": InstructionTuningRecipe,
    "dpo": PreferenceTuningRecipe,
    "orpo": PreferenceTuningRecipe,
}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: the method's recipe, set up, trained, evaluated and saved."""
    spec = parse_spec(config["spec"])
    confine_process(config["settings"].confinement)  # before any file of the team is opened
    recipe = RECIPES[spec.method.type](spec, config["settings"])
    if not recipe.setup():
        return  # a re-run of a job that already finished: its result was handed back
    recipe.train()
    recipe.save_final(recipe.evaluate())
    recipe.cleanup()
