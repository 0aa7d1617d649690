"""The causal-LM loss for training and eval loss, without ever holding the full [tokens x vocab] logits.

HF's `model(..., labels=...).loss` projects every position onto the vocabulary and upcasts to fp32: at 8k tokens
and a 128k vocabulary that is 4 GiB for the logits alone, more than the rest of a LoRA step's activations. Here
the decoder runs through the engine as usual (so ZeRO-3's hooks, PEFT and packing see the same call as before)
but with `logits_to_keep` set to no position, and only the positions that have a target go through the output
projection, LOSS_CHUNK_TOKENS at a time. Each chunk is recomputed in backward, so at most one chunk's logits
(and their gradient) exist at once. On CUDA with `liger_kernel` installed, Liger's fused linear + cross-entropy
does the same in Triton.

The value is HF's: the shift (labels[:, 1:] scored against positions [:, :-1]) and the mean over targets that
are not IGNORE_INDEX, with the logits upcast to fp32 before the softmax.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuneplane.data.templates import IGNORE_INDEX
from tuneplane.memory import LOSS_CHUNK_TOKENS


class SourceTally:
    """Per data source: the summed loss of its scored targets and how many there are, for one micro-batch
    (what the run's per-source loss and trained-token curves are made of). Filled from the same per-token
    losses the mean is taken of, detached: it costs no extra projection."""

    def __init__(self, target_sources: np.ndarray, sources: int, device: torch.device):
        self.ids = torch.from_numpy(target_sources).to(device)  # Batch.target_sources(), one per target
        self.loss = torch.zeros(sources, dtype=torch.float64, device=device)
        self.count = torch.bincount(self.ids, minlength=sources).to(torch.float64)
        self.has_loss = False  # counts only until a loss adds its per-token values (not for preference pairs)

    def add(self, rows: slice, token_losses: torch.Tensor) -> None:
        self.loss.index_add_(0, self.ids[rows], token_losses.detach().to(torch.float64))
        self.has_loss = True


def causal_lm_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
    tally: SourceTally | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` (the dict of `Batch.to_torch`) under `model`: a DeepSpeed
    engine, a PEFT model or a plain HF causal LM. With a `tally`, per-source sums are added to it (except on
    Liger's fused kernel, which gives the mean only)."""
    return head_loss(
        model.get_output_embeddings(), decoder_output(model, batch), batch["labels"], chunk_tokens, tally
    )


def decoder_output(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states [rows, positions, hidden] for `batch`, with no position projected onto the
    vocabulary: the model is called as usual (ZeRO-3 hooks, PEFT, packing), only `logits_to_keep` keeps nothing."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    no_position = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    # The decoder's output (after the final norm) is taken by a hook rather than `output_hidden_states`, which
    # would also keep every layer's output alive until the loss is done (no_grad eval keeps none of them).
    final: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda _module, _args, out: final.append(out[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=no_position)
    finally:
        hook.remove()
    return final[-1]


def head_loss(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
    tally: SourceTally | None = None,
) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` against `labels` shifted by one, projecting only the scored positions."""
    scored = scored_positions(labels)
    hidden = hidden.reshape(-1, hidden.shape[-1])[scored.reshape(-1)]
    targets = shifted_targets(labels)[scored]
    if _liger_applies(head, hidden):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(
            head.weight, hidden, targets, head.bias
        )
    token_losses = chunked_token_losses(head, hidden, targets, chunk_tokens)
    if tally is not None:
        tally.add(slice(None), token_losses)
    # No scored token (every label masked) gives 0 rather than HF's 0/0 = NaN, which would poison the weights.
    return token_losses.sum() / max(len(targets), 1)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF's shift: the target of position t is labels[t + 1]; the last position has none."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[rows, positions] mask of the positions that have a target (the shifted label is not IGNORE_INDEX)."""
    return shifted_targets(labels) != IGNORE_INDEX


def chunked_token_losses(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of `head(hidden)` [tokens, hidden] against `targets` [tokens], projecting
    chunk_tokens rows at a time, each chunk recomputed in backward: at most one chunk's logits exist at once."""
    zero3 = _zero3_partitioned(head)
    # Under ZeRO-3 the head's weight is released in place right after its forward, so the recomputed weight
    # reads as empty when checkpoint compares metadata; the backward itself re-gathers it (ZeRO's pre-backward
    # hook on the head's output runs before the matmul's backward), so that check is skipped there.
    check = "none" if zero3 else "default"
    parts = [hidden.new_zeros(0, dtype=torch.float32)]
    for part in range(_chunk_count(len(targets), chunk_tokens, zero3, hidden.device)):
        rows = slice(part * chunk_tokens, (part + 1) * chunk_tokens)
        if torch.is_grad_enabled():
            parts.append(
                checkpoint(
                    _token_losses,
                    head,
                    hidden[rows],
                    targets[rows],
                    use_reentrant=False,
                    determinism_check=check,
                )
            )
        else:
            parts.append(_token_losses(head, hidden[rows], targets[rows]))
    return torch.cat(parts)


def _token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # The head is called as a module, never through `.weight`: under ZeRO-3 its pre-forward hook gathers the
    # partitioned weight (here and again in the backward recompute), and PEFT wrappers route to their copy.
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none")


def _chunk_count(tokens: int, chunk_tokens: int, zero3: bool, device: torch.device) -> int:
    """Chunks this rank runs. Under ZeRO-3 every call of the head all-gathers its weight, a collective, so all
    ranks make the same number of calls: the largest count of any rank (a rank with fewer runs empty chunks)."""
    count = -(-tokens // chunk_tokens)
    if zero3 and dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor([count], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        count = int(agreed.item())
    return count


def _zero3_partitioned(head: torch.nn.Module) -> bool:
    return any(hasattr(param, "ds_id") for param in head.parameters())


def _liger_applies(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """Liger reads the weight directly: only for a plain, unpartitioned linear head on CUDA."""
    return (
        hidden.is_cuda
        and len(hidden) > 0
        and type(head) is torch.nn.Linear
        and not _zero3_partitioned(head)
        and importlib.util.find_spec("liger_kernel") is not None
    )
