"""The model-family table (tuneplane.families): all-linear adapts each family's language-model layers and nothing
else, on the real transformers classes; a named layer the family lacks is refused at submit and by `tuneplane
validate`, naming the field, instead of failing in every worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from tests.support.config import REPO, platform_config
from tests.test_train import SHORT, _settings, _spec, ray_local  # noqa: F401 - ray_local is a fixture
from tuneplane.cli import app
from tuneplane.control.admission import policy_problems
from tuneplane.devtools.tiny import FAMILY_PRESETS, build_model, family_config
from tuneplane.families import ALL_LINEAR, family_of, lora_problems, lora_target_modules, spec_problems
from tuneplane.spec import load_spec, parse_spec


def _linear_layers(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _adapted(model: torch.nn.Module) -> set[str]:
    """The modules PEFT put a LoRA adapter on, by their path in the base model."""
    return {
        name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
        for name, _ in model.named_parameters()
        if ".lora_A." in name
    }


@pytest.mark.parametrize("preset", sorted(FAMILY_PRESETS))
def test_all_linear_adapts_the_language_models_linear_layers_only(preset: str, tokenizer: Any) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = family_config(preset, tokenizer, hidden_size=32, layers=2)
    assert family_of(config.to_dict()) is not None, f"{preset}: no family for {config.model_type}"
    model = AutoModelForCausalLM.from_config(config)
    language_model = {
        name
        for name in _linear_layers(model)
        if name != "lm_head" and "vision_tower" not in name and "multi_modal_projector" not in name
    }
    targets = lora_target_modules(ALL_LINEAR, config.to_dict())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
    assert _adapted(peft_model) == language_model
    assert language_model, preset


def _config(model_type: str, **extra: Any) -> dict[str, Any]:
    return {"model_type": model_type, **extra}


@pytest.mark.parametrize(
    ("targets", "config", "refused"),
    [
        (ALL_LINEAR, _config("gpt_neox"), None),
        (["q_proj", "k_proj", "v_proj", "o_proj"], _config("gpt_neox"), "q_proj, k_proj, v_proj, o_proj"),
        (["query_key_value", "dense"], _config("gpt_neox"), None),
        (["q_proj", "o_proj"], _config("phi3"), "q_proj"),  # phi3 fuses q, k and v into qkv_proj
        (["model.layers.0.self_attn.q_proj", "lm_head"], _config("llama"), None),
        (["q_proj", "mlp.w1"], _config("mixtral"), "mlp.w1"),
        # A family not in the table: names as given, all-linear by module type; but not on a multimodal model.
        (["in_proj"], _config("mamba"), None),
        (ALL_LINEAR, _config("mamba"), None),
        (ALL_LINEAR, _config("llava", vision_config={"model_type": "clip"}), "vision tower"),
    ],
)
def test_targets_a_family_cannot_take_are_refused_naming_the_field(
    targets: list[str] | str, config: dict[str, Any], refused: str | None
) -> None:
    problems = lora_problems(targets, config, "method.target_modules")
    if refused is None:
        assert problems == []
    else:
        ((field, message),) = problems
        assert field == "method.target_modules" and refused in message, message


def test_a_preference_method_names_its_lora_section() -> None:
    raw = {
        "name": "p",
        "model": {"base": "/m"},
        "data": {"sources": [{"uri": "a.jsonl", "format": "preference"}]},
        "method": {"type": "dpo", "lora": {"target_modules": ["q_proj"]}},
    }
    ((field, message),) = spec_problems(parse_spec(raw), _config("gpt_neox"))
    assert field == "method.lora.target_modules" and "query_key_value" in message
    assert spec_problems(parse_spec(raw | {"method": {"type": "dpo"}}), _config("gpt_neox")) == []


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tokenizer: Any) -> Path:
    """A tiny GPT-NeoX checkpoint with the tiny tokenizer."""
    out = tmp_path_factory.mktemp("tiny-gpt-neox")
    tokenizer.save_pretrained(str(out))
    build_model(out, tokenizer, hidden_size=32, family="gpt-neox")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt_neox"
    return out


def _neox_job(tmp_path: Path, neox_dir: Path, targets: str) -> Path:
    text = (REPO / "jobs" / "tiny-cpu.yaml").read_text().replace("../build/tiny-llama", str(neox_dir))
    text = text.replace("uri: data/", f"uri: {REPO}/jobs/data/").replace(
        "tasks_dir: evals", f"tasks_dir: {REPO}/jobs/evals"
    )
    text = text.replace("target_modules: all-linear", f"target_modules: {targets}")
    (tmp_path / "neox.yaml").write_text(text)
    return tmp_path / "neox.yaml"


def test_a_gpt_neox_job_with_llama_targets_is_refused_before_it_runs(tmp_path: Path, neox_dir: Path) -> None:
    """The reported case: Llama's q/k/v/o on a GPT-NeoX checkpoint passed validation, then failed in every
    worker with PEFT's NoMatchingPeftModuleError. Now `validate` and the API's admission refuse it, and
    all-linear takes the family's own layers."""
    job = _neox_job(tmp_path, neox_dir, "[q_proj, k_proj, v_proj, o_proj]")
    result = CliRunner().invoke(app, ["validate", str(job), "--spec-only"])
    assert result.exit_code == 2, result.output
    assert "method.target_modules" in result.output and "query_key_value" in result.output
    config = platform_config(tmp_path, f"sqlite:///{tmp_path / 'tp.db'}")
    problems = dict(policy_problems(load_spec(job), "alpha", config))
    assert "query_key_value" in problems["method.target_modules"]
    job = _neox_job(tmp_path, neox_dir, "all-linear")
    assert "method.target_modules" not in dict(policy_problems(load_spec(job), "alpha", config))
    result = CliRunner().invoke(app, ["validate", str(job), "--spec-only"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("preset", ["mixtral", "qwen3-moe", "granite-moe"])
def test_a_mixture_of_experts_trains_in_full_under_zero3_without_hanging(
    preset: str, tokenizer: Any, tmp_path: Path
) -> None:
    """Two ranks route their tokens to different experts; each MoE block is a ZeRO-3 leaf (gathered whole), so
    the run finishes instead of waiting on gathers (the timeout fails a hang) and saves full, non-empty
    weights, experts included."""
    from tuneplane.train import run

    base = tmp_path / preset
    tokenizer.save_pretrained(str(base))
    build_model(base, tokenizer, hidden_size=32, family=preset)
    overrides = {
        **SHORT,
        "method": {"type": "full"},
        "distributed.zero_stage": 3,
        "hyperparameters.max_steps": 3,
        "checkpointing.every_n_steps": 100,
        "data.max_seq_len": 64,
    }
    result = run(_spec(base, **overrides), _settings(tmp_path, f"moe-{preset}", tracking=False))
    assert result.metrics["step"] == 3
    from transformers import AutoModelForCausalLM

    tuned, info = AutoModelForCausalLM.from_pretrained(result.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    experts = [m for m in tuned.modules() if type(m).__name__.endswith(("Experts", "MoE"))]
    assert experts and all(p.numel() > 0 for m in experts for p in m.parameters())
