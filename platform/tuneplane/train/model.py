"""The model side of a recipe: load the base checkpoint, apply the tuning method, build the DeepSpeed config."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tuneplane.pretrained import local_copy
from tuneplane.spec import FullMethod, LoraMethod, PartialMethod, TuningSpec, is_local_path

# Dense bf16 peak of common training GPUs (FLOP/s), for MFU. Unknown devices report MFU as 0.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def torch_dtype(spec: TuningSpec, on_gpu: bool) -> torch.dtype:
    name = spec.model.dtype
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def checkpoint_path(spec: TuningSpec) -> str:
    """A local folder holding the base checkpoint (object storage is copied once per node)."""
    base = spec.model.base
    if is_local_path(base) and not base.startswith(("/", ".", "~")):
        return base  # a hub id: from_pretrained resolves it (online clusters only)
    return str(local_copy(base))


def load_model(spec: TuningSpec, on_gpu: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    attn = "flash_attention_2" if on_gpu and _has_flash_attn() else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_path(spec),
        revision=spec.model.revision,
        dtype=torch_dtype(spec, on_gpu),
        attn_implementation=attn,
    )
    model.config.use_cache = False
    return apply_method(model, spec)


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def apply_method(model: torch.nn.Module, spec: TuningSpec) -> torch.nn.Module:
    method = spec.method
    if isinstance(method, LoraMethod):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            modules_to_save=method.modules_to_save or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    if isinstance(method, PartialMethod):
        layers = _decoder_layers(model)
        if method.last_n_layers > len(layers):
            raise ValueError(
                f"method.last_n_layers={method.last_n_layers} but the model has {len(layers)} layers"
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
        return model
    assert isinstance(method, FullMethod)
    return model


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError("method 'partial' needs a decoder with model.layers (Llama, Mistral, Qwen...)")
    return layers


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int


def count_params(model: torch.nn.Module) -> ParamCounts:
    total = trainable = 0
    for param in model.parameters():
        n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return ParamCounts(total, trainable)


def flops_per_token(spec: TuningSpec, params: ParamCounts) -> float:
    """6N for full training (forward 2N + backward 4N); with frozen base weights the weight-gradient half of
    the backward is skipped: 4N."""
    return (4.0 if isinstance(spec.method, LoraMethod) else 6.0) * params.total


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), 0.0)


def deepspeed_config(spec: TuningSpec, on_gpu: bool, world_size: int) -> dict[str, Any]:
    dist, hp = spec.distributed, spec.hyperparameters
    # ZeRO partitions across data-parallel ranks; with one rank there is nothing to partition and stages 1-3 only
    # add buffer copies (measured: ZeRO-2 at 0.73x the tokens/s of ZeRO-0 on one CPU worker). Offload still
    # needs a ZeRO stage, so it keeps the requested one.
    single = world_size == 1 and not (dist.offload_optimizer or dist.offload_params)
    zero: dict[str, Any] = {"stage": 0 if single else dist.zero_stage}
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


def lr_lambda(spec: TuningSpec, total_steps: int) -> Callable[[int], float]:
    hp = spec.hyperparameters
    warmup = min(hp.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if hp.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if hp.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
