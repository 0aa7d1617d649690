"""DPO's reference model: the model the policy starts from, frozen, scoring each pair without gradients.

Which one a job gets is the method's decision (`Method.reference_kind`); this module builds it:

    adapter_disabled  LoRA from a fresh adapter: the policy with the adapter switched off. No copy of anything.
    starting_adapter  LoRA continuing `model.adapter` (SFT -> DPO): the starting adapter is loaded a second time,
                      frozen, under the name `reference`, and switched in for the reference pass. Disabling the
                      trained adapter would score against the raw base instead of the SFT model.
    frozen_copy       full fine-tuning: a copy of the starting weights taken before DeepSpeed sees the policy,
                      without gradients. Under ZeRO-3 it gets its own optimizer-less DeepSpeed engine, so it is
                      partitioned over the ranks like the policy (each rank holds 1/N of it, gathered layer by
                      layer); under ZeRO-0/1/2 every rank holds it whole, as it holds the policy's weights.

The reference pass runs before the policy's forward in each micro-step, so switching adapters never touches the
policy's autograd graph (activation checkpointing recomputes in the backward with the trained adapter active).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tuneplane.spec import ReferenceKind
from tuneplane.train.preference_loss import SequenceLogps, sequence_logps

REFERENCE_ADAPTER = "reference"
TRAINED_ADAPTER = "default"  # PEFT's name for the adapter it creates or loads first


class Reference:
    """Scores a [chosen; rejected] batch under the frozen starting model. Built by `prepare` before DeepSpeed
    wraps the policy, then `place`d once the policy's engine exists."""

    def __init__(self, kind: ReferenceKind, frozen_copy: Any = None):
        self.kind = kind
        self.model: Any = frozen_copy  # the copy (frozen_copy), later the policy's engine (adapter kinds)

    def place(self, engine: Any, ds_config: dict[str, Any], device: torch.device) -> None:
        """The adapter kinds score with the policy's engine. A frozen copy is partitioned as the policy is under
        ZeRO-3 (its own engine, no optimizer: DeepSpeed builds only the parameter partitioner), else moved to
        this worker's device."""
        if self.kind != "frozen_copy":
            self.model = engine
            return
        zero = ds_config["zero_optimization"]
        if zero["stage"] != 3:
            self.model = self.model.to(device)
            return
        import deepspeed

        config = {k: v for k, v in ds_config.items() if k not in _OPTIMIZER_KEYS}
        config["zero_optimization"] = {k: v for k, v in zero.items() if k != "offload_optimizer"}
        self.model, *_ = deepspeed.initialize(model=self.model, config=config)
        self.model.eval()

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        if self.kind == "frozen_copy":
            return sequence_logps(self.model, batch)
        peft_model = getattr(self.model, "module", self.model)  # inside the DeepSpeed engine
        if self.kind == "adapter_disabled":
            with peft_model.disable_adapter():
                return sequence_logps(self.model, batch)
        peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            return sequence_logps(self.model, batch)
        finally:
            peft_model.set_adapter(TRAINED_ADAPTER)  # trainable again, the reference frozen


_OPTIMIZER_KEYS = {"gradient_accumulation_steps", "gradient_clipping", "zero_allow_untested_optimizer"}


def prepare(kind: ReferenceKind, model: Any, adapter: Path | None) -> Reference:
    """Before DeepSpeed wraps `model` (the policy): load the reference adapter into it, or copy it whole."""
    if kind == "starting_adapter":
        if adapter is None:
            raise ValueError("a starting_adapter reference needs the model.adapter folder")
        model.load_adapter(str(adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        _without_dropout(model, REFERENCE_ADAPTER)
        model.set_adapter(TRAINED_ADAPTER)
        return Reference(kind)
    if kind == "frozen_copy":
        return Reference(kind, copy.deepcopy(model).requires_grad_(False).eval())
    return Reference(kind)


def _without_dropout(model: Any, adapter_name: str) -> None:
    """The reference scores inside the policy, which is in train mode: its adapter's LoRA dropout (the SFT
    job's, often 0.05) would make every reference log-prob a random draw. A reference is deterministic."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and adapter_name in dropouts:
            dropouts[adapter_name] = torch.nn.Identity()
