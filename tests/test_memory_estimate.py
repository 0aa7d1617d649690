"""The memory estimate per GPU (tuneplane.memory): against the measured peak of real training steps on CPU, on the
shipped recipes and their pool, and where it is shown and enforced (validate, admission)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.support.config import H100_NODE, REPO, bearer, platform_config
from tuneplane.api import create_app
from tuneplane.cli import app
from tuneplane.control.admission import policy_problems
from tuneplane.memory import KNOWN_SHAPES, ModelShape, checkpointing_enabled, estimate, find_shape, fits
from tuneplane.quantity import quantity_bytes
from tuneplane.spec import TuningSpec, load_spec, parse_spec

H100_BYTES = quantity_bytes(H100_NODE["gpu_memory"])
RECIPES = ["llama3-8b-lora-zero2.yaml", "llama3-70b-lora-zero3.yaml"]


def _recipe(name: str, max_seq_len: int | None = None, **model: Any) -> TuningSpec:
    """A shipped recipe, with `model` fields and `data.max_seq_len` changed."""
    raw = load_spec(REPO / "jobs" / name).to_dict()
    raw["model"].update(model)
    raw["data"]["max_seq_len"] = max_seq_len or raw["data"]["max_seq_len"]
    return parse_spec(raw)


@pytest.mark.parametrize(
    ("hidden", "layers", "method", "checkpointing"),
    [
        (128, 4, {"type": "full"}, False),
        (256, 2, {"type": "lora", "target_modules": "all-linear"}, True),
    ],
    ids=["h128-l4-full", "h256-l2-lora-checkpointed"],
)
def test_estimate_is_within_25_percent_of_a_measured_step(
    tmp_path: Path, tokenizer: Any, hidden: int, layers: int, method: dict, checkpointing: bool
) -> None:
    from transformers import AutoModelForCausalLM

    from tuneplane.devtools.tiny import build_model
    from tuneplane.train.builders import apply_method

    build_model(tmp_path, tokenizer, hidden_size=hidden, layers=layers)
    spec = parse_spec(
        {
            "name": "measured",
            "model": {"base": str(tmp_path), "dtype": "float32"},
            "data": {"sources": [{"uri": "/unused.jsonl", "format": "alpaca"}], "max_seq_len": 512},
            "method": method,
            "distributed": {"gpus_per_worker": 0, "num_workers": 1},
            "hyperparameters": {"micro_batch_size": 4},
        }
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    shape = ModelShape.from_config(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    if checkpointing:  # as train/builders.load_model does it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, spec).train()
    # Full rows without padding: no attention mask, so SDPA runs its flash kernel (no seq^2 scores), as on GPU.
    ids = torch.randint(8, len(tokenizer), (4, 512), generator=torch.Generator().manual_seed(0))
    from tuneplane.devtools.peak import training_step_peak
    from tuneplane.train.loss import causal_lm_loss

    batch = {"input_ids": ids, "labels": ids.clone()}
    measured = training_step_peak(model, lambda: causal_lm_loss(model, batch))

    found = estimate(spec, shape, 1, checkpointing=checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert found.parts["gradients"] == 4 * trainable  # fp32, ZeRO-0: the trainable count is exact
    assert found.parts["overhead"] == 0  # a CPU worker
    assert abs(found.total - measured) / measured <= 0.25, (found.summary(), measured / 2**20)


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_shipped_recipes_fit_their_pool(recipe: str) -> None:
    """The recipes' bases are object storage this machine cannot read: their shape comes from the table."""
    spec = _recipe(recipe)
    shape, source = find_shape(spec.model.base, may_read=False)
    assert shape is not None and source.startswith("well-known architecture llama-3-")
    world = spec.distributed.num_workers
    assert checkpointing_enabled(spec, shape, world, H100_BYTES)
    assert fits(estimate(spec, shape, world, checkpointing=True).total, H100_BYTES)
    # Without checkpointing neither would: 4 x 4096 and 1 x 8192 tokens of activations per GPU.
    assert not fits(estimate(spec, shape, world, checkpointing=False).total, H100_BYTES)


def test_dpo_counts_its_reference_copy_of_the_starting_model() -> None:
    """A full fine-tune's frozen reference is a whole copy (1/N of it under ZeRO-3); continuing an SFT adapter
    holds that adapter twice; a fresh adapter is switched off for the reference and costs nothing."""
    shape = KNOWN_SHAPES["llama-3-8b"][1]
    raw = load_spec(REPO / "jobs" / "llama3-8b-dpo.yaml").to_dict()
    lora_reference = estimate(parse_spec(raw), shape, 8, checkpointing=True).parts["reference"]
    r, hidden, kv = 16, shape.hidden, shape.kv_heads * shape.head_dim  # all-linear, rank 16, bf16
    adapter = shape.layers * r * (4 * hidden + 2 * (hidden + kv) + 3 * (hidden + shape.intermediate))
    assert lora_reference == 2 * adapter
    del raw["model"]["adapter"]
    assert estimate(parse_spec(raw), shape, 8, checkpointing=True).parts["reference"] == 0
    for stage, share in [(2, 1), (3, 8)]:
        distributed = raw["distributed"] | {"zero_stage": stage}
        full = parse_spec(raw | {"method": {"type": "dpo", "base": "full"}, "distributed": distributed})
        parts = estimate(full, shape, 8, checkpointing=True).parts
        assert parts["reference"] == 2 * shape.params // share, stage


def test_the_table_holds_the_published_parameter_counts() -> None:
    published = {
        "llama-3-8b": 8_030_261_248,
        "llama-3-70b": 70_553_706_496,
        "llama-2-7b": 6_738_415_616,
        "llama-2-13b": 13_015_864_320,
        "mistral-7b": 7_248_023_552,  # v0.3
        "qwen2.5-7b": 7_615_616_512,
    }
    assert {name: shape.params for name, (_, shape) in KNOWN_SHAPES.items()} == published
    assert find_shape("meta-llama/Meta-Llama-3.1-70B-Instruct")[1] == "well-known architecture llama-3-70b"
    shape, why = find_shape("org/some-new-model")
    assert shape is None and "matches no well-known architecture" in why
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelShape.from_config({"num_local_experts": 8, "hidden_size": 4096})


def test_checkpointing_follows_the_spec_and_auto_needs_a_known_device() -> None:
    shape = KNOWN_SHAPES["llama-3-8b"][1]
    for mode, device, expected in [("on", None, True), ("off", H100_BYTES, False), ("auto", None, False)]:
        spec = _recipe(RECIPES[0], activation_checkpointing=mode)
        assert checkpointing_enabled(spec, shape, 8, device) is expected, mode
    assert checkpointing_enabled(_recipe(RECIPES[0]), shape, 8, H100_BYTES)  # the recipe's `auto`
    short_rows = _recipe(RECIPES[0], max_seq_len=256)  # fits without: `auto` leaves it off
    assert not checkpointing_enabled(short_rows, shape, 8, H100_BYTES)


def test_admission_refuses_a_job_its_pool_cannot_hold_naming_what_to_change(tmp_path: Path) -> None:
    config = platform_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'db'}",
        backend={"type": "kuberay", "api_server": "http://127.0.0.1:9"},
    )
    off = dict(policy_problems(_recipe(RECIPES[1], activation_checkpointing="off"), "alpha", config))
    message = off["model.activation_checkpointing"]
    assert "over the 72.0 GiB usable of the pool's 80.0 GiB GPUs" in message
    assert "data.max_seq_len: lower it from 8192" in message
    assert "estimated" not in " ".join(dict(policy_problems(_recipe(RECIPES[1]), "alpha", config)).values())
    unknown = _recipe(RECIPES[1], activation_checkpointing="off", base="s3://models/in-house/decoder-v7")
    assert "estimated" not in " ".join(dict(policy_problems(unknown, "alpha", config)).values())


def test_validate_shows_the_estimate_in_the_cli_and_the_api(tmp_path: Path) -> None:
    config = tmp_path / "platform.yaml"
    config.write_text(json.dumps({"backend": {"type": "kuberay"}, "gpu_pools": {"h100": H100_NODE}}))
    runner = CliRunner()
    shown = runner.invoke(
        app, ["validate", str(REPO / "jobs" / RECIPES[0]), "--spec-only", "--config", str(config)]
    )
    assert shown.exit_code == 0, shown.output
    assert "of 80.0 GiB: fits" in " ".join(shown.output.split())
    too_long = tmp_path / "long.json"
    too_long.write_text(json.dumps(_recipe(RECIPES[0], max_seq_len=65536).to_dict()))
    refused = runner.invoke(app, ["validate", str(too_long), "--spec-only", "--config", str(config)])
    assert refused.exit_code == 1 and "does not fit" in refused.output

    tiny = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()  # local backend: its config.json is read
    with TestClient(
        create_app(platform_config(tmp_path, f"sqlite:///{tmp_path / 'db'}"), run_reconciler=False)
    ) as api:
        report = api.post("/v1/validate?max_records=5", json=tiny, headers=bearer("tok-alpha")).json()
    memory = report["memory"]
    assert memory["shape_source"].endswith("tiny-llama/config.json")
    assert memory["total_bytes"] == sum(memory["parts_bytes"].values()) > 0
    assert memory["activation_checkpointing"] is False and "device_bytes" not in memory  # CPU workers
