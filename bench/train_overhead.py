"""Training overhead benchmark: the platform path vs a bare torch loop, and ZeRO-3 vs ZeRO-0 memory per rank.

1. tokens/s of the platform path (`tuneplane.train.run`: Ray Train + DeepSpeed, 1 worker, full fine-tuning; the
   spec asks ZeRO-2, which the platform runs as ZeRO-0 on a single rank) against a bare single-process torch loop
   on the same model, the same packed batches (8 x 512 tokens) and the same threads. The model is sized so
   compute dominates on a CPU (~17M parameters). Goal: ratio >= 0.9.
2. model-state bytes (parameters + fp32 master copies + optimizer state) held per rank with 2 workers, ZeRO-3 vs
   ZeRO-0 (gradients are transient and left out).

    python bench/train_overhead.py [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from tuneplane.raylocal import use_loopback
from tuneplane.spec import TuningSpec, parse_spec, resolve_paths

REPO = Path(__file__).resolve().parents[1]
THREADS = max(1, (os.cpu_count() or 2))
WARMUP = 5


def bench_spec(model_dir: Path, steps: int, stage: int = 2, workers: int = 1) -> TuningSpec:
    data = yaml.safe_load((REPO / "jobs" / "tiny-cpu.yaml").read_text())
    data["model"]["base"] = str(model_dir)
    data["method"] = {"type": "full"}
    data["data"].update({"max_seq_len": 512, "holdout_fraction": 0.0})
    data["distributed"].update(
        {
            "zero_stage": stage,
            "num_workers": workers,
            "cpus_per_worker": THREADS // workers,
            "max_failures": 0,
        }
    )
    data["hyperparameters"].update({"max_steps": steps, "micro_batch_size": 8, "warmup_steps": 0})
    data["checkpointing"]["every_n_steps"] = 10**6
    # Metrics every 5 steps, as a real job logs (tiny-cpu: every 10): each logged window is one sample.
    data["tracking"].update({"log_every_n_steps": 5, "registered_model_name": None})
    data["eval"] = {}
    return resolve_paths(parse_spec(data), REPO / "jobs")


def platform_tokens_per_s(spec: TuningSpec, work: Path) -> float:
    from mlflow import MlflowClient

    from tuneplane.train import RunSettings, run

    tracking = f"sqlite:///{work / 'mlflow.db'}"
    settings = RunSettings("bench-platform", str(work / "runs"), tracking, str(work / "artifacts"))
    result = run(spec, settings)
    history = MlflowClient(tracking_uri=tracking).get_metric_history(result.run_id or "", "tokens_per_s")
    return statistics.median(h.value for h in history if h.step > WARMUP)


def bare_tokens_per_s(spec: TuningSpec) -> float:
    """The same model, data and optimizer in a plain loop: no Ray, no DeepSpeed."""
    import torch

    from tuneplane.data import InstructionStream
    from tuneplane.pretrained import load_tokenizer
    from tuneplane.train.builders import load_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(spec.hyperparameters.seed)
    hp = spec.hyperparameters
    model = load_model(spec, on_gpu=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate)
    stream = InstructionStream(
        spec.data, load_tokenizer(spec.model), seed=hp.seed, micro_batch_size=hp.micro_batch_size
    )
    rates: list[float] = []
    batches = iter(stream)
    for step in tqdm(range(hp.max_steps or 1), desc="bare loop", leave=False, disable=None):
        start = time.perf_counter()  # data time included, as in the platform's own step timing
        batch = next(batches)
        loss = model(**batch.to_torch(), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            rates.append(batch.num_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def _state_bytes_loop(config: dict[str, Any]) -> None:
    """Ray worker: build the DeepSpeed engine, take one step, report the model-state bytes this rank holds."""
    import deepspeed
    import ray.train
    import torch

    from tuneplane.data import InstructionStream
    from tuneplane.pretrained import load_tokenizer
    from tuneplane.train.builders import deepspeed_config, load_model

    spec = parse_spec(config["spec"])
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    ctx = ray.train.get_context()
    model = load_model(spec, on_gpu=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(spec, False, ctx.get_world_size())
    )
    stream = InstructionStream(
        spec.data,
        load_tokenizer(spec.model),
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        micro_batch_size=1,
    )
    batch = next(iter(stream))
    engine.backward(engine(**batch.to_torch(), use_cache=False).loss)
    engine.step()

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    params = sum(
        nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p.data) for p in engine.module.parameters()
    )
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    states = sum(nbytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
    # Stages 1-3 keep fp32 master partitions in the optimizer's param groups; stage 0 steps the model's own params.
    masters = (
        sum(nbytes(p) for g in inner.param_groups for p in g["params"]) if spec.distributed.zero_stage else 0
    )
    # Train V2 keeps metrics only with checkpoints: this is a measurement, so it goes to a file.
    out = Path(config["out"]) / f"zero{spec.distributed.zero_stage}-rank{ctx.get_world_rank()}.json"
    out.write_text(json.dumps({"bytes": params + states + masters}))


def state_bytes_per_rank(spec: TuningSpec, work: Path) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _state_bytes_loop,
        train_loop_config={"spec": spec.to_dict(), "out": str(work)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(
            name=f"bench-zero{spec.distributed.zero_stage}", storage_path=str(work / "state")
        ),
    )
    trainer.fit()
    stage = spec.distributed.zero_stage
    return max(json.loads((work / f"zero{stage}-rank{r}.json").read_text())["bytes"] for r in range(2))


def main() -> None:
    use_loopback()  # the Ray this bench starts listens on 127.0.0.1 only, with a token
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="10 steps of a ~2M-parameter model: a smoke run, not a measurement",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps = 2 * WARMUP  # metrics every 5 steps: one window past the warm-up
    import ray

    from tuneplane.devtools.tiny import build_model, build_tokenizer

    console = Console()
    with tempfile.TemporaryDirectory(prefix="tuneplane-bench-") as tmp:
        work = Path(tmp)
        with console.status("building the Llama"):
            tokenizer = build_tokenizer(work / "model")
            hidden, layers = (128, 2) if args.quick else (512, 4)
            model = build_model(work / "model", tokenizer, hidden_size=hidden, layers=layers)
            n_params = sum(p.numel() for p in model.parameters())
            del model
        ray.init(num_cpus=THREADS + 2, include_dashboard=False, log_to_driver=False)
        spec = bench_spec(work / "model", args.steps)
        # The bare loop runs before and after the platform path: this machine's speed drifts between minutes
        # (shared cores), and bracketing keeps the ratio honest; both are shown.
        bare_before = bare_tokens_per_s(spec)
        platform = platform_tokens_per_s(spec, work)
        bare_after = bare_tokens_per_s(spec)
        bare = statistics.geometric_mean([bare_before, bare_after])
        zero0 = state_bytes_per_rank(bench_spec(work / "model", 1, stage=0, workers=2), work)
        zero3 = state_bytes_per_rank(bench_spec(work / "model", 1, stage=3, workers=2), work)
        ray.shutdown()

    table = Table(
        title=f"Training overhead ({n_params / 1e6:.1f}M params, full fine-tuning, fp32, {THREADS} threads)"
    )
    for column in ("measure", "value", "vs", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        "bare torch loop, tokens/s (before | after)",
        f"{bare:,.0f}",
        f"{bare_before:,.0f} | {bare_after:,.0f}",
        "",
    )
    table.add_row(
        "platform (Ray Train + DeepSpeed, 1 worker), tokens/s",
        f"{platform:,.0f}",
        f"{platform / bare:.2f} of bare",
        ">= 0.9",
    )
    table.add_row("model-state bytes per rank, ZeRO-0, 2 workers", f"{zero0 / 2**20:,.1f} MiB", "", "")
    table.add_row(
        "model-state bytes per rank, ZeRO-3, 2 workers",
        f"{zero3 / 2**20:,.1f} MiB",
        f"{zero3 / zero0:.2f} of ZeRO-0",
        "~0.5",
    )
    console.print(table)


if __name__ == "__main__":
    main()
