"""Preference-tuning step cost: one DPO step (policy forward + backward over both sides of each pair, plus the
reference forward) against one SFT step on the same rows and tokens, the reference forward alone, and a DPO
step whose reference log-probs were precomputed. For LoRA the reference is the policy with its adapter off; for
full fine-tuning a frozen copy (train/reference.py), whose weights the table's last column counts. Goal: the
reference costs no more than one extra forward (DPO / SFT <= ~1.5, a forward being about a third of a step).
Precomputing would save only that forward, at the price of a pass over the data before training.

    python bench/preference_step.py [--model build/tiny-llama] [--repeats 15] [--quick]
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
from tuneplane.train import reference as reference_model
from tuneplane.train.builders import load_model
from tuneplane.train.loss import causal_lm_loss
from tuneplane.train.preference_loss import preference_loss, sequence_logps

REPO = Path(__file__).resolve().parents[1]
ROWS, WIDTH, PROMPT = 8, 256, 96  # 4 pairs of 256-token rows, the first 96 tokens of each a masked prompt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "build" / "tiny-llama")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="2 repeats: a smoke run, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    table = Table(
        "method", "step", "fastest ms", "median ms", "vs SFT (median)", "reference weights MB",
        title=f"{ROWS} rows x {WIDTH} tokens, CPU",
    )  # fmt: skip
    lora = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    for method, kind in [(lora, "adapter_disabled"), ({"type": "full"}, "frozen_copy")]:
        for row in _measure(args.model, method, kind, args.repeats):  # type: ignore[arg-type]
            table.add_row(method["type"], *row)
    Console().print(table)


def _measure(
    model_dir: Path, method: dict, kind: reference_model.ReferenceKind, repeats: int
) -> list[list[str]]:
    spec = parse_spec(
        {
            "name": "bench",
            "model": {"base": str(model_dir)},
            "data": {"sources": [{"uri": "unused.jsonl", "format": "alpaca"}]},
            "method": method,
            "distributed": {"gpus_per_worker": 0},
        }
    )
    torch.manual_seed(0)
    model = load_model(spec, on_gpu=False, world_size=1)
    model.train()
    ref = reference_model.prepare(kind, model, None)
    ref.place(model, {"zero_optimization": {"stage": 0}}, torch.device("cpu"))
    copy_mb = (
        sum(p.numel() * p.element_size() for p in ref.model.parameters()) / 2**20
        if ref.model is not model
        else 0
    )
    ids = torch.randint(3, model.config.vocab_size, (ROWS, WIDTH))
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    cached = ref.logps(batch).split()

    def sft() -> None:
        causal_lm_loss(model, batch).backward()

    def dpo() -> None:
        ref_chosen, ref_rejected = ref.logps(batch).split()
        chosen, rejected = sequence_logps(model, batch).split()
        preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).loss.backward()

    def dpo_precomputed() -> None:
        chosen, rejected = sequence_logps(model, batch).split()
        preference_loss(chosen, rejected, *cached, beta=0.1).loss.backward()

    steps: dict[str, Callable[[], None]] = {
        "SFT step": sft,
        "DPO step": dpo,
        "reference forward": lambda: ref.logps(batch),
        "DPO step, reference precomputed": dpo_precomputed,
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in tqdm(range(repeats + 1), desc=f"{method['type']} steps (interleaved)"):
        for name, step in steps.items():  # interleaved, so load on the machine hits all alike
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
            model.zero_grad()
    sft_median = statistics.median(times["SFT step"][1:])
    rows = []
    for name, values in times.items():
        values = values[1:]  # the first round warms up
        rows.append(
            [
                name,
                f"{min(values) * 1000:.1f}",
                f"{statistics.median(values) * 1000:.1f}",
                f"{statistics.median(values) / sft_median:.2f}",
                f"{copy_mb:.1f}" if name == "DPO step" else "",
            ]
        )
    return rows


if __name__ == "__main__":
    main()
