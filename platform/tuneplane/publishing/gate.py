"""The evaluation gate: does a finished run's result meet the spec's `eval.gate`? (anchor: Ray Train v2's
policies: facts in, a decision out, no I/O; `tuneplane.publishing.publish` carries it out).

It also owns the vocabulary of the final metrics it reads, which the model card and the registry tags share:
`eval_loss` / `eval_loss_base`, `zero_shot/<task>` / `zero_shot_base/<task>`, `lm_eval/<task>` /
`lm_eval_base/<task>`. A value that was not measured (absent, not a number, NaN) fails any condition on it:
a gate that cannot be checked must not let a model through.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tuneplane.spec import GateSpec

EVAL_LOSS = "eval_loss"
TASK_KINDS = ("zero_shot", "lm_eval")  # a gate's task name resolves to the first kind that measured it
_EPS = 1e-9  # 0.70 - 0.62 is 0.08000000000000007: a drop exactly at the budget passes

GateStatus = Literal["passed", "failed", "none"]


@dataclass(frozen=True)
class GateCheck:
    condition: str  # what was required, e.g. "zero_shot arith >= min 0.60"
    value: float | None  # the tuned model's score (None: not measured)
    base: float | None  # the base model's score, where the condition compares with it
    threshold: float | None  # the floor, gain or drop budget (None for eval_loss_improves)
    passed: bool
    message: str  # why it failed, with the numbers; what it checked when it passed


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)
    gated: bool = False  # whether the spec had a gate at all

    @property
    def status(self) -> GateStatus:
        return "none" if not self.gated else "passed" if self.passed else "failed"

    def failures(self) -> list[str]:
        return [c.message for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "passed": self.passed,
            "failures": self.failures(),
            "checks": [asdict(c) for c in self.checks],
        }


def check(gate: GateSpec | None, final: dict[str, Any]) -> GateVerdict:
    """The verdict of `gate` on the final metrics; no gate passes with no checks."""
    if gate is None:
        return GateVerdict(passed=True)
    checks = [_eval_loss_check(final)] if gate.eval_loss_improves else []
    for name, task in gate.tasks.items():
        if task.min is not None:
            checks.append(_min_check(final, name, task.min))
        if task.min_gain is not None:
            checks.append(_gain_check(final, name, task.min_gain))
    checks += [_keep_check(final, name, budget) for name, budget in gate.keep.items()]
    return GateVerdict(passed=all(c.passed for c in checks), checks=checks, gated=True)


# -- the metric vocabulary ---------------------------------------------------------------------------------


def number(final: dict[str, Any], key: str) -> float | None:
    """A measured value, or None (absent, not a number, NaN)."""
    value = final.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def base_key(key: str) -> str:
    """The base model's counterpart of a tuned metric: eval_loss -> eval_loss_base, zero_shot/x ->
    zero_shot_base/x, lm_eval/x -> lm_eval_base/x."""
    kind, sep, task = key.partition("/")
    return f"{kind}_base{sep}{task}"


def base_number(final: dict[str, Any], key: str) -> float | None:
    found = number(final, base_key(key))
    legacy = final.get("base_zero_shot")  # older runs kept the base scores in one dict
    if found is None and key.startswith("zero_shot/") and isinstance(legacy, dict):
        found = number(legacy, key.removeprefix("zero_shot/"))
    return found


def task_key(final: dict[str, Any], name: str) -> str | None:
    """The metric a gate's task name means: zero_shot/<name> or lm_eval/<name>, whichever was measured."""
    return next((f"{k}/{name}" for k in TASK_KINDS if number(final, f"{k}/{name}") is not None), None)


def headline(final: dict[str, Any]) -> dict[str, float]:
    """The tuned model's evaluation scores (eval loss, every zero-shot and lm-eval task, the zero-shot mean):
    what the registry shows next to a version and the model card tabulates. Only each task's main metric:
    `lm_eval/<task>/<metric>` (acc_norm, stderr, ...) stays in the run."""
    tasks = [k for k in final if k.count("/") == 1 and k.partition("/")[0] in TASK_KINDS]
    keys = [EVAL_LOSS, *sorted(tasks)]
    return {k: v for k in keys if (v := number(final, k)) is not None}


def fmt(value: float) -> str:
    """At least two decimals, up to four: 0.6 -> 0.60, 0.41666 -> 0.4167."""
    text = f"{value:.4f}".rstrip("0")
    return text + "0" * max(0, 2 - len(text.partition(".")[2]))


# -- one check per condition -----------------------------------------------------------------------------


def _eval_loss_check(final: dict[str, Any]) -> GateCheck:
    value, base = number(final, EVAL_LOSS), number(final, base_key(EVAL_LOSS))
    condition = "eval loss below the base model's"
    if value is None or base is None:
        missing = "eval loss" if value is None else "base eval loss"
        return GateCheck(condition, value, base, None, False, f"{missing}: not measured")
    passed = value < base
    verb = "is below" if passed else "is not below"
    return GateCheck(
        condition, value, base, None, passed, f"eval loss {fmt(value)} {verb} the base's {fmt(base)}"
    )


def _min_check(final: dict[str, Any], name: str, floor: float) -> GateCheck:
    key = task_key(final, name)
    condition = f"{name} >= min {fmt(floor)}"
    if key is None:
        return GateCheck(condition, None, None, floor, False, f"{name}: not measured")
    value = number(final, key)
    assert value is not None  # task_key found it measured
    label = key.replace("/", " ", 1)
    passed = value >= floor - _EPS
    sign = ">=" if passed else "<"
    return GateCheck(condition, value, None, floor, passed, f"{label}: {fmt(value)} {sign} min {fmt(floor)}")


def _gain_check(final: dict[str, Any], name: str, min_gain: float) -> GateCheck:
    condition = f"{name} gain over the base >= {fmt(min_gain)}"
    value, base, label = _with_base(final, name)
    if value is None or base is None:
        return GateCheck(condition, value, base, min_gain, False, f"{label}: not measured")
    gain = value - base
    passed = gain >= min_gain - _EPS
    sign = ">=" if passed else "<"
    message = f"{name}: gain {fmt(gain)} ({fmt(base)} -> {fmt(value)}) {sign} min_gain {fmt(min_gain)}"
    return GateCheck(condition, value, base, min_gain, passed, message)


def _keep_check(final: dict[str, Any], name: str, budget: float) -> GateCheck:
    condition = f"keep {name}: drop <= {fmt(budget)}"
    value, base, label = _with_base(final, name)
    if value is None or base is None:
        return GateCheck(condition, value, base, budget, False, f"keep {label}: not measured")
    drop = base - value
    passed = drop <= budget + _EPS
    message = (
        f"keep {name}: dropped {fmt(drop)} from {fmt(base)} to {fmt(value)}, budget {fmt(budget)}"
        if drop > 0
        else f"keep {name}: no drop ({fmt(base)} -> {fmt(value)}), budget {fmt(budget)}"
    )
    return GateCheck(condition, value, base, budget, passed, message)


def _with_base(final: dict[str, Any], name: str) -> tuple[float | None, float | None, str]:
    """Tuned and base score of a task, and what to call it when one is missing."""
    key = task_key(final, name)
    if key is None:
        return None, None, name
    value, base = number(final, key), base_number(final, key)
    return value, base, name if base is not None else f"{name} (base model)"
