"""Preference tuning after instruction tuning: DPO (sigmoid / IPO loss, conservative label smoothing, RPO's
chosen NLL) and ORPO, as a method next to `lora`, `full` and `partial` (anchor: torchtune's
`recipes/lora_dpo_distributed.py`).

It is the instruction-tuning recipe with three parts swapped: the data stream (`PreferenceStream`: a pair's
chosen and rejected sides in one micro-batch), the micro-step loss (`preference_loss.py`: sequence log-probs of
the policy, and for DPO of the reference: the starting model, frozen, see `reference.py`), and evaluation on
held-out pairs. Setup, ZeRO, checkpoints, resume, idle batches and publishing
are the parent's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tuneplane.data import Batch, PairBatch, PreferenceStream
from tuneplane.spec import DpoMethod, OrpoMethod
from tuneplane.train.loss import SourceTally
from tuneplane.train.preference_loss import (
    PreferenceTerms,
    orpo_loss,
    preference_loss,
    preference_metrics,
    sequence_logps,
)
from tuneplane.train.recipe import InstructionTuningRecipe
from tuneplane.train.reference import Reference, prepare

# Logged every step next to the loss (means over micro-steps and ranks), under TRL's names.
STEP_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


class PreferenceTuningRecipe(InstructionTuningRecipe):
    WINDOW_EXTRAS = STEP_METRICS
    reference: Reference | None = None  # DPO's; ORPO has none

    def _model_built(self, model: torch.nn.Module) -> None:
        kind = self.spec.method.reference_kind(starts_from_adapter=self.adapter is not None)
        if kind is not None:
            self.reference = prepare(kind, model, self.adapter)

    def _engine_built(self, ds_config: dict[str, Any]) -> None:
        if self.reference is not None:
            self.reference.place(self.engine, ds_config, self.device)

    def _stream(self, state: dict[str, Any] | None = None, split: str = "train") -> PreferenceStream:  # type: ignore[override]
        hp = self.spec.hyperparameters
        return PreferenceStream(
            self.spec.data, self.tokenizer, seed=hp.seed, rank=self.rank, world_size=self.world,
            micro_batch_size=hp.micro_batch_size, split=split, state=state,  # type: ignore[arg-type]
            drop=self.drop if split == "train" else None,
        )  # fmt: skip

    def idle_batch(self) -> Batch:
        return PairBatch.idle_pairs(self.stream.pad_id)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Callable[[], None]]:
        terms = self.terms(batch.to_torch(self.device))
        extras = preference_metrics(terms)
        # Trained tokens per source (both sides of each pair); the loss is per pair, not per source.
        tally = (
            SourceTally(batch.target_sources(), len(self.sources), self.device) if batch.num_tokens else None
        )
        return terms.loss, lambda: self.window.add(terms.loss.item(), batch.num_tokens, tally, extras)

    def terms(self, rows: dict[str, torch.Tensor]) -> PreferenceTerms:
        """The preference loss of a [chosen; rejected] batch under the current policy."""
        method = self.spec.method
        if isinstance(method, OrpoMethod):
            chosen, rejected = sequence_logps(self.engine, rows).split()
            # The chosen responses' mean per-token NLL (prompts are masked, as ORPO's paper scores them).
            nll = -(chosen.logps.sum() / chosen.tokens.sum().clamp(min=1))
            return orpo_loss(chosen.mean(), rejected.mean(), nll, method.beta)
        assert isinstance(method, DpoMethod) and self.reference is not None
        # Every rank runs the reference forward each micro-step, idle or not: under ZeRO-3 it gathers weights.
        # It runs first, so switching adapters for it never touches the policy's autograd graph.
        ref_chosen, ref_rejected = self.reference.logps(rows).split()
        chosen, rejected = sequence_logps(self.engine, rows).split()
        return preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=method.beta, loss=method.loss,
            label_smoothing=method.label_smoothing, sft_weight=method.sft_weight,
        )  # fmt: skip

    @torch.no_grad()
    def _eval_loss(self) -> dict[str, float]:
        """On the held-out pairs, all ranks: the mean preference loss (`eval_loss`: for DPO, ln 2 before
        training, as the policy is its own reference) and preference accuracy, the share of pairs whose chosen
        side has the higher reward (ties count half: 0.5 before training)."""
        self.engine.eval()
        batches = iter(self._stream(split="eval"))
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss x pairs, pairs, correct, margin
        for _ in range(self.spec.eval.max_batches or 10**9):
            batch = next(batches, None)
            flag = torch.tensor([0 if batch is None else 1], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not flag.item():
                break
            assert batch is not None
            terms = self.terms(batch.to_torch(self.device))
            margin = (terms.chosen_rewards - terms.rejected_rewards).double()
            correct = (margin > 0).double() + 0.5 * (margin == 0).double()
            pairs = float(len(margin))
            sums += torch.stack(
                [terms.losses.double().sum(), margin.new_tensor(pairs), correct.sum(), margin.sum()]
            )
        dist.all_reduce(sums)
        pairs = max(sums[1].item(), 1.0)
        return {
            "eval_loss": sums[0].item() / pairs,
            "eval/rewards/accuracy": sums[2].item() / pairs,
            "eval/rewards/margin": sums[3].item() / pairs,
        }
