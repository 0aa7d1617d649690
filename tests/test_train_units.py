"""The recipe's pure parts: methods, DeepSpeed config and ZeRO stage, LR schedule (and its clock across an
elastic resize), the empty-adapter guard, loading a LoRA checkpoint without its frozen base, MLflow params, and
the generation prompt shared by evaluation and the served model."""

from __future__ import annotations

import pytest
import torch

from tuneplane.errors import CheckpointError, SpecError
from tuneplane.spec import effective_zero_stage, parse_spec
from tuneplane.tracking.run import flatten
from tuneplane.train.builders import ScheduleClock, apply_method, deepspeed_config, lr_lambda
from tuneplane.train.checkpointing import check_not_empty
from tuneplane.train.metrics import ParamCounts, flops_per_token


def _spec(**extra):
    data = {
        "name": "u",
        "model": {"base": "/m"},
        "data": {"sources": [{"uri": "a.jsonl", "format": "alpaca"}]},
    }
    data.update(extra)
    return parse_spec(data)


@pytest.fixture
def llama(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir))


def test_partial_trains_only_the_last_layers_norm_and_head(llama) -> None:
    model = apply_method(llama, _spec(method={"type": "partial", "last_n_layers": 1}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm", "lm_head")) for n in trainable)
    assert any(n.startswith("model.layers.1.") for n in trainable)
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in trainable)


def test_partial_rejects_more_layers_than_the_model_has(llama) -> None:
    with pytest.raises(SpecError, match="last_n_layers=5 but the model has 2 layers") as info:
        apply_method(llama, _spec(method={"type": "partial", "last_n_layers": 5}))
    assert info.value.problems[0][0] == "method.last_n_layers"


def test_lora_makes_only_adapter_weights_trainable(llama) -> None:
    model = apply_method(
        llama, _spec(method={"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_follows_the_spec(stage) -> None:
    spec = _spec(
        distributed={"zero_stage": stage, "offload_optimizer": stage > 0, "offload_params": stage == 3},
        hyperparameters={"micro_batch_size": 3, "gradient_accumulation_steps": 5, "max_grad_norm": 0.5},
    )
    gpu, cpu = (
        deepspeed_config(spec, on_gpu=True, world_size=4),
        deepspeed_config(spec, on_gpu=False, world_size=4),
    )
    assert gpu["zero_optimization"]["stage"] == stage
    assert gpu["train_micro_batch_size_per_gpu"] == 3 and gpu["gradient_accumulation_steps"] == 5
    assert gpu["gradient_clipping"] == 0.5
    assert gpu["bf16"]["enabled"] and not cpu["bf16"]["enabled"]  # dtype auto: bf16 on GPU, fp32 on CPU
    assert ("offload_optimizer" in gpu["zero_optimization"]) == (stage > 0)
    assert ("offload_param" in gpu["zero_optimization"]) == (stage == 3)


@pytest.mark.parametrize(
    ("distributed", "world", "stage"),
    [
        ({"zero_stage": 3}, 1, 0),  # one rank: nothing to partition
        ({"zero_stage": 2}, 1, 0),
        ({"zero_stage": 2, "offload_optimizer": True}, 1, 2),  # offload needs its stage
        ({"zero_stage": 3, "offload_params": True}, 1, 3),
        ({"zero_stage": 3}, 2, 3),
        ({"zero_stage": 0}, 4, 0),
    ],
)
def test_the_effective_zero_stage(distributed, world, stage) -> None:
    spec = _spec(distributed=distributed)
    assert effective_zero_stage(spec.distributed, world) == stage
    assert deepspeed_config(spec, False, world_size=world)["zero_optimization"]["stage"] == stage


def test_lr_schedule_warms_up_then_decays() -> None:
    spec = _spec(hyperparameters={"warmup_steps": 10, "lr_scheduler": "cosine"})
    f = lr_lambda(spec, total_steps=110)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-9)
    linear = lr_lambda(_spec(hyperparameters={"lr_scheduler": "linear"}), total_steps=100)
    assert linear(50) == pytest.approx(0.5)
    assert lr_lambda(_spec(hyperparameters={"lr_scheduler": "constant"}), 100)(99) == 1.0


def test_an_elastic_resize_keeps_the_lr_schedule_continuous_and_ends_it_at_the_runs_end() -> None:
    """An `epochs` run planned as 100 steps on 4 workers resumes at step 40 on 2: the 60 steps of data left
    take 120 steps now (run ends at 160). Rebuilding the schedule for the new world's own total (200 steps)
    moved the cosine factor from 0.65 to 0.90 at the resume and left it at 0.10 at the run's end; the stretched
    clock keeps 0.65 at step 40 and reaches 0 at step 160."""
    import math

    spec = _spec(hyperparameters={"warmup_steps": 0, "lr_scheduler": "cosine"})
    clock = ScheduleClock(100)
    f = lr_lambda(spec, 100, clock)
    at_resume = f(40)
    assert at_resume == pytest.approx(0.5 * (1 + math.cos(0.4 * math.pi)))  # 0.6545
    rebuilt = lr_lambda(spec, 200)  # what a resume computed before: the 2-worker total, the step kept
    assert rebuilt(41) - at_resume == pytest.approx(0.2459, abs=1e-3)  # the jump
    assert rebuilt(160) == pytest.approx(0.0955, abs=1e-3)  # and the end, short of 0

    clock.stretch(40, 160)
    assert f(40) == pytest.approx(at_resume)  # no jump
    assert f(41) == pytest.approx(0.5 * (1 + math.cos(0.405 * math.pi)))  # half a planned step per step
    assert f(100) == pytest.approx(0.5 * (1 + math.cos(0.7 * math.pi)))
    assert f(160) == pytest.approx(0.0, abs=1e-9)
    factors = [f(step) for step in range(40, 161)]
    assert factors == sorted(factors, reverse=True)
    clock.stretch(100, 130)  # a second resize (back to 4 workers) goes on from where the first left it
    assert f(100) == pytest.approx(0.5 * (1 + math.cos(0.7 * math.pi))) and f(130) == pytest.approx(0.0)


def test_flops_per_token_is_6n_full_and_4n_lora() -> None:
    counts = ParamCounts(total=1000, trainable=10)
    assert flops_per_token(_spec(method={"type": "full"}), counts) == 6000
    assert flops_per_token(_spec(), counts) == 4000


def test_an_empty_adapter_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file(
        {"a.lora_A.weight": torch.ones(2, 2), "a.lora_B.weight": torch.empty(0)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"tensor a\.lora_B\.weight is empty"):
        check_not_empty(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        check_not_empty(tmp_path / "nothing")


def test_a_lora_checkpoint_loads_without_the_frozen_base_but_not_without_a_trained_weight(tiny_dir) -> None:
    """What a LoRA checkpoint holds (DeepSpeed's module state without frozen parameters) loads onto a fresh
    model, the base keeping its own weights; a trained weight missing, or a key the model lacks, is refused."""
    from transformers import AutoModelForCausalLM

    from tuneplane.train.checkpointing import _load_module

    spec = _spec(method={"type": "lora", "r": 4, "target_modules": ["q_proj"]})
    saved = apply_method(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), spec)
    with torch.no_grad():
        for name, param in saved.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    state = {n: p.detach().clone() for n, p in saved.named_parameters() if p.requires_grad}
    assert state and all("lora_" in name for name in state)

    fresh = apply_method(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), spec)
    _load_module(state, fresh)
    loaded = dict(fresh.named_parameters())
    assert all(torch.equal(loaded[name], value) for name, value in state.items())
    lora_b = next(name for name in state if "lora_B" in name)
    with pytest.raises(CheckpointError, match="missing"):
        _load_module({k: v for k, v in state.items() if k != lora_b}, fresh)
    with pytest.raises(CheckpointError, match="unexpected"):
        _load_module(state | {"base_model.model.extra.weight": torch.ones(1)}, fresh)


def test_mlflow_params_are_the_flattened_spec() -> None:
    params = flatten(_spec(method={"type": "lora", "r": 8}).to_dict())
    assert params["method.r"] == "8"
    assert params["data.sources.0.uri"] == "a.jsonl"
    assert params["distributed.zero_stage"] == "2"
    assert all(len(v) <= 6000 for v in params.values())


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama3"])
def test_the_served_prompt_is_the_evaluated_prompt(tokenizer, template) -> None:
    """The served model renders a placeholder answer; evaluation renders the real one: both must give the
    model the same tokens, and those tokens are exactly the training prompt (everything before the answer)."""
    from tuneplane.data.formats import Conversation, Message
    from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer, render
    from tuneplane.generation import prompt_ids, stop_token_ids

    def conversation(answer: str) -> Conversation:
        return Conversation((Message("user", "Is 41 even or odd?", "think"), Message("assistant", answer)))

    served = prompt_ids(conversation("x"), template, tokenizer)
    evaluated = prompt_ids(conversation("odd"), template, tokenizer)
    assert served == evaluated and served
    ids, labels = SegmentTokenizer(tokenizer).encode([render(conversation("odd"), template, tokenizer)])[0]
    assert ids[: len(served)].tolist() == served and labels[len(served)] != IGNORE_INDEX
    assert (labels[: len(served)] == IGNORE_INDEX).all()
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer)
