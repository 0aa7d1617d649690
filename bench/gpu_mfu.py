"""GPU benchmark (needs CUDA): MFU of full fine-tuning and LoRA vs full tokens/s on a ~1B Llama, random init.

The platform path end to end (`tuneplane.train.run`: Ray Train, DeepSpeed ZeRO-2, bf16, packed 4k rows), one
worker on one GPU. MFU = 6N (full) or 4N (LoRA) FLOPs per token against the device's dense bf16 peak; the
recipe computes it per step, this script reports the median after warm-up. Goal (issue #3): >= 45% full.

    python bench/gpu_mfu.py [--steps 40] [--tiny] [--quick]   # --tiny: a small model on CPU; --quick: and 7 steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tuneplane.raylocal import use_loopback
from tuneplane.spec import parse_spec
from tuneplane.train import RunSettings, run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import make_dataset, make_tokenizer

WARMUP = 5
ONE_B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
}
TINY = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build_model(folder: Path, tokenizer: Any, shape: dict[str, int]) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def measure(
    folder: Path, data: Path, work: Path, method: dict[str, Any], steps: int, gpu: bool, seq_len: int
) -> dict[str, float]:
    from mlflow import MlflowClient

    spec = parse_spec(
        {
            "name": f"mfu-{method['type']}",
            "model": {"base": str(folder), "dtype": "bfloat16" if gpu else "float32"},
            "data": {
                "sources": [{"uri": str(data), "format": "alpaca"}],
                "max_seq_len": seq_len,
                "pack_buffer": 1024,
            },
            "method": method,
            "distributed": {
                "zero_stage": 2,
                "num_workers": 1,
                "gpus_per_worker": int(gpu),
                "cpus_per_worker": 4 if gpu else 1,  # a CPU smoke run fits a 2-core machine
                "max_failures": 0,
            },
            "hyperparameters": {"max_steps": steps, "micro_batch_size": 2, "learning_rate": 1e-5},
            "checkpointing": {"every_n_steps": 10**6},
            "tracking": {"log_every_n_steps": 1},
        }
    )
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    result = run(spec, RunSettings(f"mfu-{method['type']}", str(work / "runs"), tracking, str(work / "art")))
    client = MlflowClient(tracking_uri=tracking)
    out = {}
    for metric in ("tokens_per_s", "mfu", "tflops_per_device", "memory_gb"):
        history = client.get_metric_history(result.run_id or "", metric)
        out[metric] = statistics.median(h.value for h in history if h.step > WARMUP)
    return out


def main() -> None:
    use_loopback()  # the Ray this bench starts listens on 127.0.0.1 only, with a token
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="small model and rows: a CPU smoke run")
    parser.add_argument("--quick", action="store_true", help="--tiny, 7 steps: a smoke run, not a figure")
    args = parser.parse_args()
    if args.quick:
        args.tiny, args.steps = True, WARMUP + 2  # medians need steps past the warm-up
    import ray
    import torch

    gpu = torch.cuda.is_available() and not args.tiny
    console = Console()
    with tempfile.TemporaryDirectory(prefix="tuneplane-mfu-") as tmp:
        work = Path(tmp)
        data = make_dataset(work, 1000 if args.quick else 4000 if args.tiny else 40000)
        tokenizer = make_tokenizer(work, data)
        n_params = build_model(work / "model", tokenizer, TINY if args.tiny else ONE_B)
        ray.init(include_dashboard=False, log_to_driver=False)
        seq_len = 256 if args.tiny else 4096
        full = measure(work / "model", data, work / "full", {"type": "full"}, args.steps, gpu, seq_len)
        lora = measure(
            work / "model",
            data,
            work / "lora",
            {"type": "lora", "r": 16, "target_modules": "all-linear"},
            args.steps,
            gpu,
            seq_len,
        )
        ray.shutdown()
    device = torch.cuda.get_device_name() if gpu else "CPU"
    table = Table(
        title=f"{n_params / 1e9:.2f}B-parameter Llama, {device}, bf16={gpu}, packed {seq_len}-token rows"
    )
    for column in ("method", "tokens/s", "TFLOP/s", "MFU", "peak mem GiB"):
        table.add_column(column, justify="right")
    for name, m in (("full (6N)", full), ("LoRA r16 all-linear (4N)", lora)):
        table.add_row(
            name,
            f"{m['tokens_per_s']:,.0f}",
            f"{m['tflops_per_device']:.1f}",
            f"{100 * m['mfu']:.1f}%",
            f"{m['memory_gb']:.1f}",
        )
    table.add_row(
        "LoRA / full tokens/s",
        f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}",
        "",
        "goal MFU >= 45%",
        "",
    )
    console.print(table)


if __name__ == "__main__":
    main()
