"""Builders the recipe calls: the base model with the tuning method applied, the optimizer and LR schedule,
and the DeepSpeed config (with the one rule for which ZeRO stage really runs)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from tuneplane.errors import SpecError
from tuneplane.families import family_of, lora_target_modules
from tuneplane.memory import checkpointing_enabled
from tuneplane.pretrained import from_pretrained
from tuneplane.spec import (
    FullMethod,
    LoraMethod,
    PartialMethod,
    TuningSpec,
    effective_zero_stage,
)


def torch_dtype(spec: TuningSpec, on_gpu: bool) -> torch.dtype:
    name = spec.model.dtype
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(
    spec: TuningSpec, on_gpu: bool, world_size: int | None = None, adapter: Path | None = None
) -> torch.nn.Module:
    """The base model (from a folder, object storage or the hub) with activation checkpointing as the spec
    decides and its method applied, starting from `adapter` (`model.adapter`, fetched by the caller) if given.
    `world_size` (default: the process group's) feeds the `auto` decision."""
    from transformers import AutoModelForCausalLM

    attn = "flash_attention_2" if on_gpu and _has_flash_attn() else "sdpa"
    model = from_pretrained(
        AutoModelForCausalLM,
        spec.model.base,
        spec.model.revision,
        dtype=torch_dtype(spec, on_gpu),
        attn_implementation=attn,
        **_quantization(spec, on_gpu),
    )
    model.config.use_cache = False
    if _quantized(spec):
        from peft import prepare_model_for_kbit_training

        # Freezes the base, upcasts what is not quantized; checkpointing is set below as for every method.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing_enabled(spec, model.config, world_size or _world_size(), _device_memory(on_gpu)):
        # Non-reentrant: recomputes layer by layer inside the one backward, so LoRA needs no input-grad hack, ZeRO
        # reduces each gradient once, and packed rows' position_ids reach the recomputed attention unchanged.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers also makes the embeddings' output require grad, which only reentrant checkpointing needs;
        # with `partial` it would run the backward through every frozen layer. (PEFT adds it back for LoRA.)
        model.disable_input_require_grads()
    if effective_zero_stage(spec.distributed, world_size or _world_size()) == 3:
        _moe_blocks_as_leaves(model)
    return apply_method(model, spec, adapter)


def _moe_blocks_as_leaves(model: torch.nn.Module) -> None:
    """Under ZeRO-3 each sparse mixture-of-experts block (tuneplane.families) is one leaf, gathered whole as its
    forward starts: ZeRO-3 otherwise gathers a module's parameters as it is called, and the router calls only the
    experts its tokens chose, which differ between ranks, so ranks wait on each other's gathers (DeepSpeed's
    known MoE hang)."""
    family = family_of(model.config.to_dict())
    if family is None or not family.moe_blocks:
        return
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in model.modules() if type(m).__name__ in family.moe_blocks}
    if classes:
        set_z3_leaf_modules(model, sorted(classes, key=lambda c: c.__name__))


def _world_size() -> int:
    group = torch.distributed
    return group.get_world_size() if group.is_available() and group.is_initialized() else 1


def _device_memory(on_gpu: bool) -> int | None:
    """This worker's GPU memory in bytes; None on CPU, where `auto` checkpointing stays off."""
    if not (on_gpu and torch.cuda.is_available()):
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def _quantized(spec: TuningSpec) -> bool:
    return isinstance(spec.method, LoraMethod) and spec.method.quantize == "4bit"


def _quantization(spec: TuningSpec, on_gpu: bool) -> dict[str, Any]:
    """`from_pretrained` arguments for QLoRA's 4-bit NF4 base; refused, naming the field, where it cannot run."""
    if not _quantized(spec):
        return {}
    if not (on_gpu and torch.cuda.is_available()):
        raise SpecError([("method.quantize", "'4bit' (QLoRA) needs a CUDA GPU, and this worker has none")])
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SpecError([("method.quantize", "'4bit' (QLoRA) needs bitsandbytes, which this image lacks")])
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(spec, on_gpu),
    )
    # bitsandbytes quantizes as the weights land on the GPU: load them straight onto this worker's device.
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def apply_method(model: torch.nn.Module, spec: TuningSpec, adapter: Path | None = None) -> torch.nn.Module:
    method = spec.method.trained_weights()
    if adapter is not None:
        from peft import PeftModel

        if isinstance(method, LoraMethod):  # go on training it, with its own rank and targets
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        # Folded into plain weights, which PEFT left frozen: the method below decides what trains.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().requires_grad_(True)
    if isinstance(method, LoraMethod):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=lora_target_modules(method.target_modules, model.config.to_dict()),
            modules_to_save=method.modules_to_save or None,
            use_dora=method.use_dora,
            use_rslora=method.use_rslora,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    if isinstance(method, PartialMethod):
        _train_last_layers(model, method)
        return model
    assert isinstance(method, FullMethod)
    return model


def _train_last_layers(model: torch.nn.Module, method: PartialMethod) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SpecError(
            [("method.type", "'partial' needs a decoder with model.layers (Llama, Mistral, Qwen...)")]
        )
    if method.last_n_layers > len(layers):
        raise SpecError(
            [
                (
                    "method.last_n_layers",
                    f"last_n_layers={method.last_n_layers} but the model has {len(layers)} layers",
                )
            ]
        )
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = list(layers[-method.last_n_layers :])
    norm = getattr(getattr(model, "model", model), "norm", None)
    if norm is not None:
        trainable.append(norm)
    if method.train_lm_head:
        trainable.append(model.get_output_embeddings())
    for module in trainable:
        for param in module.parameters():
            param.requires_grad_(True)


@dataclass
class ScheduleClock:
    """Where each optimizer step lies on the LR schedule, whose own axis runs from 0 to `length` (the run's total
    steps as first planned). The identity until an elastic resize of an `epochs` run changes how many steps the
    rest of the run takes (the new world size packs the remaining data into more or fewer steps): `stretch`
    then spreads what is left of the schedule over the new remaining steps. Without it the LR would jump at the
    resume (the schedule rebuilt for the new world's total while the restored scheduler keeps its step) and end
    the run short of, or past, its end. Mutable: the scheduler's lambda reads it at every step."""

    length: int
    anchor_step: int = 0  # from this step on, the schedule advances `rate` positions per step
    anchor_position: float = 0.0
    rate: float = 1.0

    def position(self, step: int) -> float:
        return self.anchor_position + (step - self.anchor_step) * self.rate

    def stretch(self, step: int, total_steps: int) -> None:
        """From `step` (where the schedule stays: no jump), reach the schedule's end at `total_steps`."""
        here = self.position(step)
        self.anchor_step, self.anchor_position = step, here
        self.rate = max(0.0, self.length - here) / max(1, total_steps - step)


def build_optimizer(
    model: torch.nn.Module, spec: TuningSpec, total_steps: int, clock: ScheduleClock | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, and the spec's warmup + decay schedule (over `clock` if given)."""
    hp = spec.hyperparameters
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate, weight_decay=hp.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps, clock))


def deepspeed_config(spec: TuningSpec, on_gpu: bool, world_size: int) -> dict[str, Any]:
    dist, hp = spec.distributed, spec.hyperparameters
    zero: dict[str, Any] = {"stage": effective_zero_stage(dist, world_size)}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    dtype = torch_dtype(spec, on_gpu)
    return {
        "train_micro_batch_size_per_gpu": hp.micro_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # A torch optimizer is passed in; with offload DeepSpeed would otherwise insist on its own CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(
    spec: TuningSpec, total_steps: int, clock: ScheduleClock | None = None
) -> Callable[[int], float]:
    """The LR factor at an optimizer step; with a `clock`, at the step's position on it (read at every call: a
    resume restores or stretches the clock after the scheduler is built)."""
    hp = spec.hyperparameters

    def factor(at: int) -> float:
        step, length = (clock.position(at), clock.length) if clock is not None else (at, total_steps)
        warmup = min(hp.warmup_steps, max(length - 1, 0))
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if hp.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, length - warmup))
        if hp.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
