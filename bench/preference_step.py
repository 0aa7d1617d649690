"""Preference-tuning step cost: one DPO step (policy forward + backward over both sides of each pair, plus the
reference forward with the LoRA adapter disabled) against one SFT step on the same rows and tokens, and the
reference forward alone. Goal: the reference costs no more than one extra forward (DPO / SFT <= ~1.5 on LoRA,
where a forward is about a third of a step).

    python bench/preference_step.py [--model build/tiny-llama] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from tuneplane.spec import parse_spec
from tuneplane.train.builders import load_model
from tuneplane.train.loss import causal_lm_loss
from tuneplane.train.preference_loss import preference_loss, reference_logps, sequence_logps

REPO = Path(__file__).resolve().parents[1]
ROWS, WIDTH, PROMPT = 8, 256, 96  # 4 pairs of 256-token rows, the first 96 tokens of each a masked prompt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "build" / "tiny-llama")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    spec = parse_spec(
        {
            "name": "bench",
            "model": {"base": str(args.model)},
            "data": {"sources": [{"uri": "unused.jsonl", "format": "alpaca"}]},
            "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "distributed": {"gpus_per_worker": 0},
        }
    )
    torch.manual_seed(0)
    model = load_model(spec, on_gpu=False, world_size=1)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (ROWS, WIDTH))
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def sft() -> None:
        causal_lm_loss(model, batch).backward()

    def dpo() -> None:
        chosen, rejected = sequence_logps(model, batch).split()
        ref_chosen, ref_rejected = reference_logps(model, batch).split()
        preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).loss.backward()

    def reference() -> None:
        reference_logps(model, batch)

    steps: dict[str, Callable[[], None]] = {"SFT step": sft, "DPO step": dpo, "reference forward": reference}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in tqdm(range(args.repeats + 1), desc="steps (interleaved)"):
        for name, step in steps.items():  # interleaved, so load on the machine hits all three alike
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
            model.zero_grad()
    table = Table(
        "step", "fastest ms", "median ms", "vs SFT (median)", title=f"{ROWS} rows x {WIDTH} tokens, CPU"
    )
    sft_median = statistics.median(times["SFT step"][1:])
    for name, values in times.items():
        values = values[1:]  # the first round warms up
        table.add_row(
            name,
            f"{min(values) * 1000:.1f}",
            f"{statistics.median(values) * 1000:.1f}",
            f"{statistics.median(values) / sft_median:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
