"""Training methods: LoRA (with DoRA, rsLoRA, QLoRA), full and partial fine-tuning, DPO and ORPO.

This module is the method registry's spec half: each method is one class, listed once in `Method`, and each class
answers what the rest of the platform asks about a method (its objective, the data it reads, the weights it
trains, the reference model it needs). Nothing elsewhere tests `isinstance(method, DpoMethod | ...)` to learn
those facts. The other half, which recipe runs a method, is `tuneplane.train.recipes.RECIPES`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Field

from tuneplane.spec._fields import DataKind, _Strict

# What a method's loss optimises:
#   next_token  the responses' next-token likelihood (instruction tuning, every SFT method)
#   preference  a chosen response over a rejected one (DPO, ORPO)
Objective = Literal["next_token", "preference"]

# What scores DPO's reference log-probs; each is the model the policy starts from, frozen:
#   adapter_disabled  LoRA from a fresh adapter: the policy with its adapter switched off (no copy at all)
#   starting_adapter  LoRA continuing `model.adapter`: that adapter loaded a second time, frozen, and switched in
#   frozen_copy       full: a copy of the starting weights, without gradients, partitioned like the policy
ReferenceKind = Literal["adapter_disabled", "starting_adapter", "frozen_copy"]


class _MethodFacts(_Strict):
    """The facts every method states; the defaults are those of supervised instruction tuning."""

    objective: ClassVar[Objective] = "next_token"
    data_kind: ClassVar[DataKind] = "instruction"  # which records it trains on (spec._fields.format_kind)

    def trained_weights(self) -> WeightMethod:
        """Which weights the method trains, as the weight method that builds them (LoRA, full or partial).
        Model building, memory estimates, FLOPs and checkpoint layout all ask this one method."""
        assert isinstance(self, LoraMethod | FullMethod | PartialMethod), "a preference method says its own"
        return self

    def reference_kind(self, starts_from_adapter: bool) -> ReferenceKind | None:
        """The frozen reference model the loss compares against (None: none). The recipe builds it and the
        memory estimate counts it from this one answer."""
        return None

    def trained_weights_field(self) -> str:
        """Where the settings of `trained_weights()` sit in the spec: `method` itself, or the section of a
        method that nests them (`method.lora`). Problems with those settings name fields under it."""
        return "method" if self.trained_weights() is self else "method.lora"


class LoraMethod(_MethodFacts):
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
        "all-linear",
        description="Module names to adapt, or 'all-linear': every linear layer of the language model, as the "
        "model's family names them (tuneplane.families; a multimodal model's vision tower is left alone).",
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


class FullMethod(_MethodFacts):
    type: Literal["full"] = "full"


class PartialMethod(_MethodFacts):
    type: Literal["partial"] = "partial"
    last_n_layers: int = Field(
        ge=1, description="Train only the last N transformer blocks (and the final norm)."
    )
    train_lm_head: bool = Field(True, description="Also train the output projection.")


class DpoMethod(_MethodFacts):
    """Direct preference optimisation on `preference` data (prompt, chosen, rejected), usually after
    instruction tuning (`model.adapter`). The reference model is the starting point, frozen (see
    `reference_kind`): no second copy of the base for LoRA, a frozen copy partitioned like the policy for full."""

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

    objective: ClassVar[Objective] = "preference"
    data_kind: ClassVar[DataKind] = "preference"

    def trained_weights(self) -> WeightMethod:
        return self.lora if self.base == "lora" else FullMethod()

    def reference_kind(self, starts_from_adapter: bool) -> ReferenceKind | None:
        if self.base == "full":
            return "frozen_copy"
        return "starting_adapter" if starts_from_adapter else "adapter_disabled"


class OrpoMethod(_MethodFacts):
    """ORPO: preference tuning without a reference model (odds-ratio term added to the chosen NLL)."""

    type: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, le=10, description="Weight of the odds-ratio term (ORPO's lambda).")
    base: Literal["lora", "full"] = Field("lora")
    lora: LoraMethod = Field(default_factory=LoraMethod)

    objective: ClassVar[Objective] = "preference"
    data_kind: ClassVar[DataKind] = "preference"

    def trained_weights(self) -> WeightMethod:
        return self.lora if self.base == "lora" else FullMethod()


# The registry: a new method is one class above and one entry here (and its recipe in train/recipes.py).
Method = Annotated[
    LoraMethod | FullMethod | PartialMethod | DpoMethod | OrpoMethod, Field(discriminator="type")
]
METHOD_CLASSES: tuple[type[_MethodFacts], ...] = get_args(get_args(Method)[0])
METHOD_TYPES: tuple[str, ...] = tuple(cls.model_fields["type"].default for cls in METHOD_CLASSES)

WeightMethod = LoraMethod | FullMethod | PartialMethod
