"""Preference losses: DPO (sigmoid, with conservative label smoothing), IPO and ORPO, with RPO's optional NLL term.

Sequence log-probabilities come from the same never-full-logits path as the SFT loss (`loss.decoder_output` and
`loss.chunked_token_losses`): only the scored positions go through the output projection, a chunk at a time, so
the decoder call is the one ZeRO-3, PEFT and activation checkpointing already see.

The formulas are TRL's (1.16, checked by tests/test_preference_loss.py against its own code):
- DPO `sigmoid`: -log σ(β·Δ) with Δ = (π_c - ref_c) - (π_r - ref_r), the log-probs summed over each response.
  With label smoothing ε it is conservative DPO, -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ) (TRL 1.16 dropped ε from its
  `sigmoid` type; the same expression is its `aot` loss for a single pair).
- IPO: (Δ' - 1/(2β))², where Δ' uses each response's log-ratio divided by its scored-token count (TRL's length
  normalisation, confirmed with IPO's authors).
- RPO (`sft_weight`): plus sft_weight times the mean per-token NLL of the chosen responses over the batch.
- ORPO: NLL(chosen) - β·mean(log σ(log-odds)), log-odds from the per-token mean log-probs, no reference.
Rewards are β·(policy - reference) (DPO/IPO) or β·mean log-prob (ORPO), detached, for metrics only.

Each row of a preference batch is one sequence (padded, not packed): its log-prob is the sum over the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from tuneplane.memory import LOSS_CHUNK_TOKENS
from tuneplane.train.loss import chunked_token_losses, decoder_output, scored_positions, shifted_targets


class SequenceLogps(NamedTuple):
    """Per row: the summed log-probability of its scored tokens (fp32) and how many tokens that is."""

    logps: torch.Tensor
    tokens: torch.Tensor

    def mean(self) -> torch.Tensor:
        """Per-token mean log-probability (ORPO's and IPO's length-normalised form); 0 for a row with no token."""
        return self.logps / self.tokens.clamp(min=1)

    def split(self) -> tuple[SequenceLogps, SequenceLogps]:
        """The chosen and rejected halves of a batch laid out as [chosen rows; rejected rows]."""
        logps, tokens = self.logps.chunk(2), self.tokens.chunk(2)
        return SequenceLogps(logps[0], tokens[0]), SequenceLogps(logps[1], tokens[1])


@dataclass(frozen=True)
class PreferenceTerms:
    """One micro-batch's preference loss: `loss` (scalar, what is backpropagated) and per-pair values."""

    loss: torch.Tensor
    losses: torch.Tensor  # per pair: the preference term alone
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # detached; summed (DPO/IPO) or per-token mean (ORPO), as TRL logs them
    rejected_logps: torch.Tensor
    nll: torch.Tensor | None = None  # the chosen NLL term (RPO, ORPO), detached


def sequence_logps(
    model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> SequenceLogps:
    """Each row's summed log-probability of its targets (labels shifted as in the SFT loss, IGNORE_INDEX not
    scored) under `model` (a DeepSpeed engine, PEFT model or HF causal LM), never holding the full logits."""
    labels = batch["labels"]
    scored = scored_positions(labels)
    hidden = decoder_output(model, batch)
    hidden = hidden.reshape(-1, hidden.shape[-1])[scored.reshape(-1)]
    nll = chunked_token_losses(
        model.get_output_embeddings(), hidden, shifted_targets(labels)[scored], chunk_tokens
    )
    row_of_token = scored.nonzero()[:, 0]
    logps = torch.zeros(len(labels), dtype=nll.dtype, device=nll.device).index_add(0, row_of_token, -nll)
    return SequenceLogps(logps, scored.sum(dim=1))


def preference_loss(
    policy_chosen: SequenceLogps,
    policy_rejected: SequenceLogps,
    ref_chosen: SequenceLogps,
    ref_rejected: SequenceLogps,
    *,
    beta: float,
    loss: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> PreferenceTerms:
    """DPO (`sigmoid`, conservative with `label_smoothing`) or IPO on one batch of pairs, plus RPO's chosen NLL
    when `sft_weight` > 0. Row i of each argument belongs to pair i."""
    chosen_ratio = policy_chosen.logps - ref_chosen.logps
    rejected_ratio = policy_rejected.logps - ref_rejected.logps
    if loss == "ipo":
        delta = chosen_ratio / policy_chosen.tokens.clamp(
            min=1
        ) - rejected_ratio / policy_rejected.tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        delta = chosen_ratio - rejected_ratio
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    total, nll = losses.mean(), None
    if sft_weight:
        # TRL's `sft` term: the mean over every chosen token of the batch, not a mean of per-row means.
        nll = -policy_chosen.logps.sum() / policy_chosen.tokens.sum().clamp(min=1)
        total = total + sft_weight * nll
    return PreferenceTerms(
        loss=total,
        losses=losses,
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
        chosen_logps=policy_chosen.logps.detach(),
        rejected_logps=policy_rejected.logps.detach(),
        nll=None if nll is None else nll.detach(),
    )


def orpo_loss(
    chosen_logps_mean: torch.Tensor, rejected_logps_mean: torch.Tensor, chosen_nll: torch.Tensor, beta: float
) -> PreferenceTerms:
    """ORPO: `chosen_nll` (the SFT loss of the chosen rows) minus β times the mean log-sigmoid of the log odds
    ratio of chosen over rejected, from their per-token mean log-probs (`SequenceLogps.mean()`)."""
    chosen, rejected = chosen_logps_mean.float(), rejected_logps_mean.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceTerms(
        loss=chosen_nll + losses.mean(),
        losses=losses,
        chosen_rewards=beta * chosen.detach(),
        rejected_rewards=beta * rejected.detach(),
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
        nll=chosen_nll.detach(),
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -ln 2 to avoid cancellation (as TRL does)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def preference_metrics(terms: PreferenceTerms) -> dict[str, float]:
    """This rank's batch means, under TRL's names (accuracy: share of pairs whose chosen reward is higher)."""
    margin = terms.chosen_rewards - terms.rejected_rewards
    metrics = {
        "loss": terms.loss.item(),
        "rewards/chosen": terms.chosen_rewards.mean().item(),
        "rewards/rejected": terms.rejected_rewards.mean().item(),
        "rewards/margin": margin.mean().item(),
        "rewards/accuracy": (margin > 0).float().mean().item(),
        "logps/chosen": terms.chosen_logps.mean().item(),
        "logps/rejected": terms.rejected_logps.mean().item(),
    }
    if terms.nll is not None:
        metrics["nll"] = terms.nll.item()
    return metrics
