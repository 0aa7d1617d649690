"""Evaluation: held-out loss, zero-shot tasks, lm-evaluation-harness tasks, and the gate a result must pass
before it reaches the registry."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from tuneplane.spec._fields import MAX_SOURCES, MAX_STEPS, MAX_URI, _check_uri, _Strict
from tuneplane.spec.data import SourceSpec

_TaskName = Annotated[str, Field(min_length=1, max_length=128)]


class TaskGate(_Strict):
    """What one evaluation task must reach: a floor, a gain over the base model, or both."""

    min: float | None = Field(None, ge=0, le=1, description="The tuned model's score must be at least this.")
    min_gain: float | None = Field(
        None, ge=-1, le=1, description="The tuned score minus the base model's must be at least this."
    )

    @model_validator(mode="after")
    def _says_something(self) -> TaskGate:
        if self.min is None and self.min_gain is None:
            raise ValueError("give `min`, `min_gain` or both")
        return self


class GateSpec(_Strict):
    """Conditions on the final evaluation. A run that misses one still finishes (SUCCEEDED) but its model is
    not registered; the job's status says which condition failed, with the numbers."""

    eval_loss_improves: bool = Field(
        False, description="The tuned model's eval loss must be below the base model's (needs eval data)."
    )
    tasks: dict[_TaskName, TaskGate] = Field(
        default_factory=dict,
        max_length=MAX_SOURCES,
        description="Per zero-shot task (source name) or lm-eval task: `min` and/or `min_gain` over the base.",
    )
    keep: dict[_TaskName, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict,
        max_length=MAX_SOURCES,
        description="Forgetting budget: held-out general tasks whose score may drop at most this much below "
        "the base model's.",
    )


class LmEvalSpec(_Strict):
    """Tasks of EleutherAI's lm-evaluation-harness (the optional `eval` extra), defined in local YAML files."""

    tasks_dir: str = Field(
        max_length=MAX_URI,
        description="Folder (local or object storage) with the task YAML files and the data files they name; "
        "a relative `data_files` path in a YAML is relative to this folder.",
    )
    tasks: list[_TaskName] = Field(min_length=1, max_length=64, description="Task names to run.")
    limit: int | None = Field(None, ge=1, le=100_000, description="Examples per task (default: all).")
    num_fewshot: int = Field(0, ge=0, le=64)

    _uri = model_validator(mode="after")(lambda self: (_check_uri(self.tasks_dir), self)[1])


class EvalSpec(_Strict):
    every_n_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Eval loss cadence; default: at the end only."
    )
    max_batches: int | None = Field(None, ge=1, le=MAX_STEPS)
    zero_shot_sources: list[SourceSpec] = Field(
        default_factory=list,
        max_length=MAX_SOURCES,
        description="Held-out *tasks* (never trained on) scored by exact-match generation.",
    )
    max_examples: int = Field(200, ge=1, le=100_000, description="Examples per zero-shot task.")
    max_new_tokens: int = Field(32, ge=1, le=4096)
    lm_eval: LmEvalSpec | None = Field(
        None, description="lm-evaluation-harness tasks run on the base and the tuned model after training."
    )
    gate: GateSpec | None = Field(None, description="Conditions the result must meet to be registered.")

    def task_names(self) -> set[str]:
        """Every task name a gate may refer to: zero-shot sources and lm-eval tasks."""
        names = {s.display_name for s in self.zero_shot_sources}
        return names | set(self.lm_eval.tasks if self.lm_eval else [])

    @model_validator(mode="after")
    def _gate_names_known(self) -> EvalSpec:
        if self.gate is None:
            return self
        known = self.task_names()
        for group in ("tasks", "keep"):
            for name in getattr(self.gate, group):
                if name not in known:
                    shown = ", ".join(sorted(known)) or "none"
                    raise ValueError(
                        f"gate.{group}.{name}: no zero-shot source or lm_eval task is named '{name}' "
                        f"(known: {shown})"
                    )
        return self
