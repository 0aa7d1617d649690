"""Training methods: LoRA (with DoRA, rsLoRA, QLoRA), full and partial fine-tuning."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tuneplane.spec._fields import _Strict


class LoraMethod(_Strict):
    type: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(
        32,
        ge=1,
        le=65_536,
        description="LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA).",
    )
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: (
        Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=256)] | Literal["all-linear"]
    ) = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    modules_to_save: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list,
        max_length=64,
        description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens] when the "
        "template adds tokens the base model never learned.",
    )
    use_dora: bool = Field(
        False,
        description="DoRA: train each adapted weight's magnitude apart from its direction; closer to full tuning "
        "at low rank, for a slower step and one extra vector per adapted module.",
    )
    use_rslora: bool = Field(
        False,
        description="Rank-stabilised LoRA: scale = alpha / sqrt(r) instead of alpha / r, so large ranks keep "
        "learning instead of being scaled down.",
    )
    quantize: Literal["none", "4bit"] = Field(
        "none",
        description="`4bit` = QLoRA: the frozen base weights held in 4-bit NF4 (bitsandbytes), about a quarter of "
        "their 16-bit memory; GPU workers only, ZeRO stage 0-2.",
    )


class FullMethod(_Strict):
    type: Literal["full"] = "full"


class PartialMethod(_Strict):
    type: Literal["partial"] = "partial"
    last_n_layers: int = Field(
        ge=1, description="Train only the last N transformer blocks (and the final norm)."
    )
    train_lm_head: bool = Field(True, description="Also train the output projection.")


class DpoMethod(_Strict):
    """Direct preference optimisation on `preference` data (prompt, chosen, rejected), usually after
    instruction tuning (`model.adapter`). The reference model is the starting point, frozen (see
    `dpo_reference`): no second copy of the base for LoRA, a frozen copy partitioned like the policy for full."""

    type: Literal["dpo"] = "dpo"
    beta: float = Field(
        0.1, gt=0, le=10, description="Strength of the pull toward the reference model (KL penalty weight)."
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="`sigmoid` = DPO; `ipo` = IPO's squared loss."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO: the share of preference labels assumed flipped."
    )
    sft_weight: float = Field(
        0.0, ge=0, le=10, description="Add this times the chosen response's NLL (RPO): keeps chosen likely."
    )
    base: Literal["lora", "full"] = Field("lora", description="Train LoRA adapters (below) or every weight.")
    lora: LoraMethod = Field(default_factory=LoraMethod, description="Adapter settings when `base` is lora.")


class OrpoMethod(_Strict):
    """ORPO: preference tuning without a reference model (odds-ratio term added to the chosen NLL)."""

    type: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, le=10, description="Weight of the odds-ratio term (ORPO's lambda).")
    base: Literal["lora", "full"] = Field("lora")
    lora: LoraMethod = Field(default_factory=LoraMethod)


Method = Annotated[
    LoraMethod | FullMethod | PartialMethod | DpoMethod | OrpoMethod, Field(discriminator="type")
]

WeightMethod = LoraMethod | FullMethod | PartialMethod

# What scores DPO's reference log-probs; each is the model the policy starts from, frozen:
#   adapter_disabled  LoRA from a fresh adapter: the policy with its adapter switched off (no copy at all)
#   starting_adapter  LoRA continuing `model.adapter`: that adapter loaded a second time, frozen, and switched in
#   frozen_copy       full: a copy of the starting weights, without gradients, partitioned like the policy
ReferenceKind = Literal["adapter_disabled", "starting_adapter", "frozen_copy"]


def weights_trained(method: LoraMethod | FullMethod | PartialMethod | DpoMethod | OrpoMethod) -> WeightMethod:
    """Which weights a method trains: itself for SFT methods; for preference methods, their LoRA settings or
    every weight. Model building, memory estimates and checkpoint layout all ask this one function."""
    if isinstance(method, DpoMethod | OrpoMethod):
        return method.lora if method.base == "lora" else FullMethod()
    return method


def dpo_reference(
    method: LoraMethod | FullMethod | PartialMethod | DpoMethod | OrpoMethod, starts_from_adapter: bool
) -> ReferenceKind | None:
    """The reference model a method needs (None: no reference; ORPO and the SFT methods). The recipe builds it
    and the memory estimate counts it from this one answer."""
    if not isinstance(method, DpoMethod):
        return None
    if method.base == "full":
        return "frozen_copy"
    return "starting_adapter" if starts_from_adapter else "adapter_disabled"
