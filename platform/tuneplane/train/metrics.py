"""Training metrics maths: parameter counts, FLOPs per token, MFU, memory, and the per-step window that turns
micro-steps into one set of logged metrics."""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tuneplane.spec import DataSpec, LoraMethod, TuningSpec
from tuneplane.train.loss import SourceTally

# Dense bf16 peak of common training GPUs (FLOP/s), for MFU. Unknown devices report MFU as 0.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


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
    """6N for full training (forward 2N + backward 4N); with frozen base weights (LoRA) the weight-gradient
    half of the backward is skipped: 4N."""
    return (4.0 if isinstance(spec.method.trained_weights(), LoraMethod) else 6.0) * params.total


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), 0.0)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the CPU resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class StepWindow:
    """Accumulates the micro-steps between two optimizer steps into one set of metrics (averaged over ranks),
    with the mixture actually trained: per data source, trained tokens so far and this step's loss."""

    def __init__(
        self,
        device: torch.device,
        world: int,
        flops_token: float,
        source_names: list[str] | None = None,
        source_tokens: list[float] | None = None,
        extra_keys: tuple[str, ...] = (),
    ) -> None:
        self.device, self.world, self.flops_token = device, world, flops_token
        self.peak = peak_flops(device)
        self.losses: list[float] = []
        self.tokens = 0
        self.started = time.perf_counter()
        self.source_names = source_names or []
        n = len(self.source_names)
        # Trained tokens per source since the run began, the same on every rank (summed over ranks each step).
        self.source_totals = list(source_tokens) if source_tokens else [0.0] * n
        self._source_loss = torch.zeros(n, dtype=torch.float64, device=device)
        self._source_count = torch.zeros(n, dtype=torch.float64, device=device)
        self._source_losses = (
            False  # whether the loss reported per-source values (SFT) or counts only (pairs)
        )
        # Method-specific means (DPO's rewards, ...): summed per micro-step, averaged over steps and ranks.
        self.extra_keys = extra_keys
        self._extras = torch.zeros(len(extra_keys) + 1, dtype=torch.float64, device=device)

    def add(
        self,
        loss: float,
        tokens: int,
        tally: SourceTally | None = None,
        extras: dict[str, float] | None = None,
    ) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        if extras is not None:
            values = [extras[key] for key in self.extra_keys] + [1.0]
            self._extras += torch.tensor(values, dtype=torch.float64, device=self.device)
        if tally is not None:
            self._source_losses = self._source_losses or tally.has_loss
            self._source_loss += tally.loss
            self._source_count += tally.count

    def _close_extras(self) -> dict[str, float]:
        if not self.extra_keys:
            return {}
        dist.all_reduce(self._extras)
        count = max(self._extras[-1].item(), 1.0)
        out = {key: self._extras[i].item() / count for i, key in enumerate(self.extra_keys)}
        self._extras.zero_()
        return out

    def _close_sources(self) -> dict[str, float]:
        if not self.source_names:
            return {}
        both = torch.stack([self._source_loss, self._source_count])
        dist.all_reduce(both)
        out = {}
        for i, name in enumerate(self.source_names):
            loss, count = both[0, i].item(), both[1, i].item()
            self.source_totals[i] += count
            out[f"source_tokens/{name}"] = self.source_totals[i]
            if count and self._source_losses:
                out[f"source_loss/{name}"] = loss / count
        self._source_loss.zero_()
        self._source_count.zero_()
        return out

    def close(self, engine: Any, scheduler: Any) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        # A rank that only idled through this step (its data ran out first, see the recipe) has no loss.
        mean = float(np.mean(self.losses)) if self.losses else 0.0
        stats = torch.tensor(
            [mean, float(self.tokens), float(bool(self.losses))], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(stats)
        tokens = stats[1].item()
        grad_norm = engine.get_global_grad_norm()
        flops_per_s = self.flops_token * tokens / elapsed / self.world
        metrics = {
            "loss": stats[0].item() / max(stats[2].item(), 1.0),
            "lr": float(scheduler.get_last_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "memory_gb": memory_gb(self.device),
            "tflops_per_device": flops_per_s / 1e12,
            "mfu": flops_per_s / self.peak if self.peak else 0.0,
        }
        metrics |= self._close_sources() | self._close_extras()
        self.losses, self.tokens, self.started = [], 0, time.perf_counter()
        return metrics


def source_names(data: DataSpec) -> list[str]:
    """Metric names of the training sources: their display names, made unique by position where two agree."""
    names = [re.sub(r"[^\w.\- ]", "_", s.display_name) for s in data.sources]  # MLflow's key characters
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
