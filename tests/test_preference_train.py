"""Preference tuning for real: Ray Train (2 workers, gloo) + DeepSpeed ZeRO + PEFT + MLflow, on CPU, with the
tiny DPO job (jobs/tiny-dpo.yaml): it learns the held-out preference, registers an adapter that generates in
the chosen style, and resumes exactly after a worker is killed under ZeRO-3."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import REPO
from tests.test_train import _settings, clean_and_killed_runs, ray_local  # noqa: F401
from tests.test_train import _spec as train_spec
from tuneplane.devtools.synth_prefs import CURT, POLITE
from tuneplane.spec import TuningSpec
from tuneplane.train import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]  # test_train's Ray, one per module


def _spec(tiny_dir: Path, **overrides: Any) -> TuningSpec:
    return train_spec(tiny_dir, "tiny-dpo.yaml", **overrides)


def test_dpo_learns_the_heldout_preference_and_registers_an_adapter_that_replies_politely(
    tiny_dir, tmp_path
) -> None:
    import mlflow

    settings = _settings(tmp_path, "dpo")
    result = run(_spec(tiny_dir), settings)
    m = result.metrics
    assert m["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its own reference
    assert m["eval/rewards/accuracy"] >= 0.85, m  # from 0.5 (every pair tied) before training
    assert m["eval_loss"] < 0.3 and result.gate is not None and result.gate["status"] == "passed"
    assert result.model_uri == "models:/tiny-dpo-adapter/1"

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    for key in ("rewards/margin", "rewards/accuracy", "rewards/chosen", "rewards/rejected", "loss"):
        history = client.get_metric_history(result.run_id or "", key)
        assert [h.step for h in history][-1] == 120, key
    margins = client.get_metric_history(result.run_id or "", "rewards/margin")
    assert margins[-1].value > margins[0].value > 0

    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    held_out = [
        json.loads(line) for line in (REPO / "jobs/data/prefs-tone-eval.jsonl").read_text().splitlines()
    ]
    prompts = [p["prompt"] for p in held_out if "prompt" in p][:12]
    replies = model.predict(prompts)
    polite = [r for r in replies if r.startswith(tuple(t.split(" {}")[0].split("!")[0] for t in POLITE))]
    curt = [r for r in replies if r.startswith(tuple(t.split(" ")[0] for t in CURT))]
    assert len(polite) >= 0.75 * len(replies) and not curt, replies


def test_dpo_under_zero3_resumes_after_a_killed_worker_without_repeating_a_pair(tiny_dir, tmp_path) -> None:
    overrides = {
        "distributed.zero_stage": 3,
        "distributed.max_failures": 2,
        "hyperparameters.max_steps": 30,
        "checkpointing.every_n_steps": 10,
        "tracking.log_every_n_steps": 1,
        "eval.gate": None,
    }
    spec = _spec(tiny_dir, **copy.deepcopy(overrides))
    clean, faulty, clean_trace, faulty_trace = clean_and_killed_runs(spec, tmp_path)
    assert faulty_trace == clean_trace  # the same pairs at every step, after the resume too
    flat = [k for keys in faulty_trace.values() for k in keys]
    assert len(flat) == 2 * len(set(flat))  # each pair's key twice (its two sides), no pair seen again
    assert faulty.metrics["eval_loss"] == pytest.approx(clean.metrics["eval_loss"], rel=1e-4)


ORPO_LORA = {
    "type": "orpo",
    "beta": 0.5,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
}


def test_orpo_then_dpo_from_its_adapter_and_full_dpo_under_zero3_each_start_at_their_reference(
    tiny_dir, tmp_path
) -> None:
    """Every reference kind end to end (train/reference.py). ORPO (no reference) learns the preference and
    registers an adapter; DPO continuing that adapter by `model.adapter` scores against it (the SFT-model
    reference: eval loss exactly ln 2 before training, which the adapter-disabled base would not give) and
    records its parent; full DPO under ZeRO-3 holds a frozen partitioned copy (ln 2 again) and learns."""
    import mlflow

    from tuneplane.tracking.tags import PARENT_TAG

    short = {"hyperparameters.max_steps": 40, "checkpointing.every_n_steps": 1000, "eval.gate": None}
    settings = _settings(tmp_path, "orpo")
    orpo = run(
        _spec(tiny_dir, method=ORPO_LORA, **short, **{"tracking.registered_model_name": "orpo"}), settings
    )
    assert (
        orpo.metrics["eval/rewards/accuracy"] >= 0.85
        and orpo.metrics["eval_loss"] < 0.8 * orpo.metrics["eval_loss_base"]
    ), orpo.metrics
    assert orpo.model_uri == "models:/orpo/1"

    dpo_lora = {"type": "dpo", "beta": 0.1, "lora": ORPO_LORA["lora"]}
    from_orpo = short | {
        "model.adapter": orpo.model_uri,
        "hyperparameters.max_steps": 5,
        "tracking.registered_model_name": "dpo",
    }
    continued = run(_spec(tiny_dir, method=dpo_lora, **from_orpo), _settings(tmp_path, "dpo-after-orpo"))
    assert continued.metrics["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-6)
    version = mlflow.MlflowClient(tracking_uri=settings.tracking_uri).get_model_version("dpo", "1")
    assert version.tags[PARENT_TAG] == orpo.model_uri

    full = run(
        _spec(
            tiny_dir, method={"type": "dpo", "beta": 0.1, "sft_weight": 0.5, "base": "full"}, **short,
            **{"distributed.zero_stage": 3, "hyperparameters.learning_rate": 0.0005,
               "tracking.registered_model_name": "dpo-full"},
        ),
        _settings(tmp_path, "dpo-full"),
    )  # fmt: skip
    assert full.metrics["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-6)
    assert full.metrics["eval/rewards/accuracy"] >= 0.85 and full.metrics["eval_loss"] < 0.5, full.metrics
    assert full.model_uri == "models:/dpo-full/1"
