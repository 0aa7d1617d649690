"""Model families: what the platform must know of each architecture a team may bring, in one table keyed by the
`model_type` of the checkpoint's config.json (read as JSON, never as code).

For each family: the language model's linear layers, which `target_modules: all-linear` adapts (inside a
multimodal wrapper only the language model's: its vision tower is left alone), and its sparse mixture-of-experts
blocks. A family not in the table takes the generic path where that is safe (a text-only model: PEFT's
all-linear, found by module type) and is refused, naming the field, where it is not (a multimodal model, whose
vision tower all-linear would adapt too).

Mixture-of-experts note: in transformers 5 the experts of Mixtral, Qwen3-MoE and Granite-MoE are fused 3-D
parameters (`MixtralExperts`...), not `nn.Linear` modules, so LoRA adapts their attention (and any dense
layers); the experts train only in full fine-tuning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuneplane.errors import Problems
from tuneplane.spec import LoraMethod, TuningSpec

ALL_LINEAR = "all-linear"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA = (*_ATTENTION, "gate_proj", "up_proj", "down_proj")
# Modules besides linear layers a team may name: LoRA on embeddings, or the output layer.
_EMBEDDINGS = ("lm_head", "embed_tokens", "embed_in", "embed_out")
# Keys of a config.json that say the model has more than a language model.
_MULTIMODAL_KEYS = ("vision_config", "audio_config", "vision_tower", "mm_projector_type")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # the config.json `model_type` values of this family
    linear: tuple[str, ...]  # the language model's linear layers, by their last name
    language_model: str = ""  # where the language model sits inside a multimodal wrapper (module path)
    moe_blocks: tuple[str, ...] = ()  # sparse-MoE block classes (ZeRO-3 leaf modules)

    def lora_targets(self) -> list[str] | str:
        """PEFT `target_modules` for all-linear: the names, or (in a multimodal wrapper) a pattern that matches
        them inside the language model only."""
        if not self.language_model:
            return list(self.linear)
        names = "|".join(re.escape(name) for name in self.linear)
        return rf"{re.escape(self.language_model)}\..*\.({names})"


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), _LLAMA),
    Family("mistral", ("mistral",), _LLAMA),
    Family("mixtral", ("mixtral",), _ATTENTION, moe_blocks=("MixtralSparseMoeBlock",)),
    Family("qwen2", ("qwen2",), _LLAMA),
    Family("qwen3", ("qwen3",), _LLAMA),
    Family("qwen3-moe", ("qwen3_moe",), _ATTENTION, moe_blocks=("Qwen3MoeSparseMoeBlock",)),
    Family("gemma", ("gemma",), _LLAMA),
    Family("gemma2", ("gemma2",), _LLAMA),
    Family("gemma3", ("gemma3_text",), _LLAMA),
    Family("gemma3-multimodal", ("gemma3",), _LLAMA, language_model="model.language_model"),
    Family("phi3", ("phi3",), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    Family("olmo2", ("olmo2",), _LLAMA),
    Family("gpt-neox", ("gpt_neox",), ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    Family("granite", ("granite",), _LLAMA),
    Family("granite-moe", ("granitemoe",), _ATTENTION, moe_blocks=("GraniteMoeMoE",)),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(config: Mapping[str, Any]) -> Family | None:
    """The family of a checkpoint, from its config.json (a dict) or a transformers config's `to_dict()`."""
    return _BY_MODEL_TYPE.get(str(config.get("model_type", "")))


def _multimodal(config: Mapping[str, Any]) -> bool:
    return any(config.get(key) for key in _MULTIMODAL_KEYS)


def lora_target_modules(targets: list[str] | str, config: Mapping[str, Any]) -> list[str] | str:
    """What PEFT adapts for `method.target_modules` on this checkpoint: all-linear resolved by the family (the
    generic PEFT all-linear for an unknown text-only family); named modules as they are. `lora_problems` has
    refused, at submit, what cannot be resolved."""
    if targets != ALL_LINEAR:
        return targets
    family = family_of(config)
    return family.lora_targets() if family is not None else ALL_LINEAR


def lora_problems(targets: list[str] | str, config: Mapping[str, Any], field: str) -> Problems:
    """Why `targets` (the spec's `field`) cannot adapt this checkpoint: a module name the family does not have
    (PEFT would fail in every worker, or silently skip it), or all-linear on a multimodal model of no known
    family (it would adapt the vision tower too)."""
    model_type = config.get("model_type", "?")
    family = family_of(config)
    if family is None:
        if targets == ALL_LINEAR and _multimodal(config):
            return [
                (
                    field,
                    f"all-linear on a {model_type} checkpoint, a multimodal model of no known family, would "
                    "adapt its vision tower too: name the language model's layers",
                )
            ]
        return []  # an unknown text-only family: PEFT finds all-linear by module type, names as given
    if targets == ALL_LINEAR:
        return []
    known = set(family.linear) | set(_EMBEDDINGS)
    unknown = [name for name in targets if name.rsplit(".", 1)[-1] not in known]
    if not unknown:
        return []
    return [
        (
            field,
            f"{', '.join(unknown)}: not a layer of a {model_type} model ({family.name} family); its linear "
            f"layers are {', '.join(family.linear)} (or use all-linear)",
        )
    ]


def spec_problems(spec: TuningSpec, config: Mapping[str, Any]) -> Problems:
    """What the checkpoint of `config` (its config.json, read by the caller) cannot do of what `spec` asks."""
    weights = spec.method.trained_weights()
    if isinstance(weights, LoraMethod) and not spec.model.adapter:  # an adapter goes on with its own targets
        field = f"{spec.method.trained_weights_field()}.target_modules"
        return lora_problems(weights.target_modules, config, field)
    return []
