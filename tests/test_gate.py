"""The evaluation gate as a table: spec conditions x final metrics -> verdict, and the failure text with the
numbers that the job's message and the run's tags carry."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tuneplane.publishing.gate import base_key, check, fmt, headline
from tuneplane.spec import GateSpec

FINAL: dict[str, Any] = {
    "step": 100,
    "tokens": 5000,
    "eval_loss": 2.31,
    "eval_loss_base": 2.30,
    "zero_shot/arith": 0.42,
    "zero_shot_base/arith": 0.40,
    "zero_shot/general": 0.62,
    "zero_shot_base/general": 0.70,
    "zero_shot/mean": 0.52,
    "lm_eval/boolq": 0.81,
    "lm_eval_base/boolq": 0.75,
}


def _gate(**fields: Any) -> GateSpec:
    return GateSpec.model_validate(fields)


CASES = [
    # id, gate fields, metric overrides, passed, failure messages
    ("eval-loss-not-below", {"eval_loss_improves": True}, {}, False,
     ["eval loss 2.31 is not below the base's 2.30"]),
    ("eval-loss-below", {"eval_loss_improves": True}, {"eval_loss": 2.0}, True, []),
    ("eval-loss-equal-is-not-below", {"eval_loss_improves": True}, {"eval_loss": 2.30}, False,
     ["eval loss 2.30 is not below the base's 2.30"]),
    ("eval-loss-base-missing", {"eval_loss_improves": True}, {"eval_loss_base": None}, False,
     ["base eval loss: not measured"]),
    ("eval-loss-nan", {"eval_loss_improves": True}, {"eval_loss": math.nan}, False,
     ["eval loss: not measured"]),
    ("min-fails", {"tasks": {"arith": {"min": 0.6}}}, {}, False, ["zero_shot arith: 0.42 < min 0.60"]),
    ("min-passes-at-the-floor", {"tasks": {"arith": {"min": 0.42}}}, {}, True, []),
    ("min-gain-fails", {"tasks": {"arith": {"min_gain": 0.05}}}, {}, False,
     ["arith: gain 0.02 (0.40 -> 0.42) < min_gain 0.05"]),
    ("min-gain-passes", {"tasks": {"arith": {"min_gain": 0.02}}}, {}, True, []),
    ("min-and-gain-both-reported", {"tasks": {"arith": {"min": 0.5, "min_gain": 0.1}}}, {}, False,
     ["zero_shot arith: 0.42 < min 0.50", "arith: gain 0.02 (0.40 -> 0.42) < min_gain 0.10"]),
    ("lm-eval-task", {"tasks": {"boolq": {"min": 0.9}}}, {}, False, ["lm_eval boolq: 0.81 < min 0.90"]),
    ("lm-eval-gain", {"tasks": {"boolq": {"min_gain": 0.05}}}, {}, True, []),
    ("task-not-measured", {"tasks": {"arith": {"min": 0.1}}}, {"zero_shot/arith": None}, False,
     ["arith: not measured"]),
    ("gain-without-base", {"tasks": {"arith": {"min_gain": 0.0}}}, {"zero_shot_base/arith": None}, False,
     ["arith (base model): not measured"]),
    ("keep-over-budget", {"keep": {"general": 0.05}}, {}, False,
     ["keep general: dropped 0.08 from 0.70 to 0.62, budget 0.05"]),
    ("keep-exactly-at-budget", {"keep": {"general": 0.08}}, {}, True, []),
    ("keep-improved", {"keep": {"arith": 0.0}}, {}, True, []),
    ("keep-not-measured", {"keep": {"general": 0.05}}, {"zero_shot/general": None}, False,
     ["keep general: not measured"]),
    ("all-pass", {"eval_loss_improves": True, "tasks": {"arith": {"min": 0.4}}, "keep": {"general": 0.1}},
     {"eval_loss": 1.9}, True, []),
    ("one-of-three-fails", {"eval_loss_improves": True, "tasks": {"arith": {"min": 0.4}},
                            "keep": {"general": 0.01}}, {"eval_loss": 1.9}, False,
     ["keep general: dropped 0.08 from 0.70 to 0.62, budget 0.01"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "overrides", "passed", "failures"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_gate_table(
    fields: dict[str, Any], overrides: dict[str, Any], passed: bool, failures: list[str]
) -> None:
    final = {k: v for k, v in (FINAL | overrides).items() if v is not None}
    verdict = check(_gate(**fields), final)
    assert verdict.passed is passed
    assert verdict.status == ("passed" if passed else "failed")
    assert verdict.failures() == failures
    assert len(verdict.checks) == _conditions(fields)
    assert all(c.passed == (c.message not in failures) for c in verdict.checks)


def _conditions(fields: dict[str, Any]) -> int:
    tasks = sum(len(t) for t in fields.get("tasks", {}).values())
    return int(fields.get("eval_loss_improves", False)) + tasks + len(fields.get("keep", {}))


def test_no_gate_passes_with_no_checks() -> None:
    verdict = check(None, {})
    assert (verdict.passed, verdict.checks, verdict.status, verdict.failures()) == (True, [], "none", [])


def test_a_check_carries_value_base_and_threshold() -> None:
    (only,) = check(_gate(keep={"general": 0.05}), FINAL).checks
    assert (only.value, only.base, only.threshold, only.passed) == (0.62, 0.70, 0.05, False)
    assert "general" in only.condition


def test_legacy_base_scores_are_read() -> None:
    final = {"zero_shot/arith": 0.42, "base_zero_shot": {"arith": 0.30}}
    verdict = check(_gate(tasks={"arith": {"min_gain": 0.1}}), final)
    assert verdict.passed and verdict.checks[0].base == 0.30


def test_zero_shot_wins_when_a_name_is_both_kinds() -> None:
    final = {"zero_shot/x": 0.2, "lm_eval/x": 0.9}
    assert check(_gate(tasks={"x": {"min": 0.5}}), final).failures() == ["zero_shot x: 0.20 < min 0.50"]


def test_verdict_as_dict_round_trips_through_json() -> None:
    import json

    verdict = check(_gate(eval_loss_improves=True), FINAL)
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["status"] == "failed" and data["checks"][0]["value"] == 2.31


def test_headline_is_tuned_scores_only() -> None:
    others = {
        "eval_loss": math.nan,
        "zero_shot/bad": "x",
        "lm_eval/boolq/acc_norm": 0.8,
        "source_tokens/a": 9,
    }
    assert headline(FINAL | others) == {
        "zero_shot/arith": 0.42,
        "zero_shot/general": 0.62,
        "zero_shot/mean": 0.52,
        "lm_eval/boolq": 0.81,
    }
    assert [base_key(k) for k in ("eval_loss", "zero_shot/a", "lm_eval/b")] == [
        "eval_loss_base",
        "zero_shot_base/a",
        "lm_eval_base/b",
    ]


@pytest.mark.parametrize(
    ("value", "text"), [(0.6, "0.60"), (0.41666, "0.4167"), (2.0, "2.00"), (0.0, "0.00"), (-0.02, "-0.02")]
)
def test_fmt(value: float, text: str) -> None:
    assert fmt(value) == text
