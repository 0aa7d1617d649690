"""The instruction-tuning recipe: what every Ray Train worker runs, top to bottom.

    setup     -> distributed init, tokenizer, model + method, DeepSpeed engine, resume from a checkpoint
    baseline  -> zero-shot accuracy of the untouched base model on held-out tasks (first attempt only)
    train     -> packed batches from this rank's data stream, ZeRO step, metrics, checkpoints
    finish    -> eval loss, zero-shot accuracy again, save the adapter (gathered under ZeRO-3)

Everything the worker needs arrives in `config` (the spec as a dict and the platform's run settings); nothing
comes from the environment except what Ray and torch.distributed set up.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tuneplane.data import InstructionStream
from tuneplane.pretrained import load_tokenizer
from tuneplane.spec import LoraMethod, TuningSpec, parse_spec
from tuneplane.train import evaluate
from tuneplane.train.model import (
    count_params,
    deepspeed_config,
    flops_per_token,
    load_model,
    lr_lambda,
    peak_flops,
)

CHECKPOINT_META = "tuneplane-checkpoint.json"


def train_loop(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train

    # ---------------------------------------------------------------- setup
    spec = parse_spec(config["spec"])
    settings = config["settings"]
    hp = spec.hyperparameters
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available() and spec.distributed.gpus_per_worker > 0
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    # The shared-memory comm op would be JIT-compiled on first use (+30 s, ~3 GB); gloo/nccl are enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    _seed_everything(hp.seed)  # same seed on every rank: identical LoRA init before DeepSpeed broadcasts
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and _republish_if_final(checkpoint, rank):
        return  # a re-run of a job that already finished: hand its result back, train nothing

    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec, on_gpu)
    params = count_params(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate, weight_decay=hp.weight_decay
    )
    total_steps = hp.max_steps or _steps_for_epochs(spec, tokenizer, rank, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec, on_gpu, world)
    )
    if world == 1:
        # Averaging gradients over one rank changes nothing, but DeepSpeed would still flatten every gradient
        # into buckets and all-reduce them each step.
        engine.enable_backward_allreduce = False

    data_state: dict[str, Any] | None = None
    progress: dict[str, Any] = {"step": 0, "epochs": 0, "tokens": 0, "base_zero_shot": None}
    if checkpoint:
        with checkpoint.as_directory() as folder:
            data_state, progress = _load_checkpoint(engine, Path(folder), rank, world)
        _log(rank, f"resumed from step {progress['step']}")
    stream = InstructionStream(
        spec.data,
        tokenizer,
        seed=hp.seed,
        rank=rank,
        world_size=world,
        micro_batch_size=hp.micro_batch_size,
        state=data_state,
    )
    tracker = _Tracker(settings, rank)
    # Optional audit trail of which records each rank trained on at each step (data-exposure audits, tests).
    example_log = (
        Path(settings["example_log_dir"]) / f"rank{rank}.jsonl" if settings.get("example_log_dir") else None
    )
    step_keys: list[str] = []

    # ---------------------------------------------------------------- baseline
    if progress["base_zero_shot"] is None and spec.eval.zero_shot_sources:
        base_scores = evaluate.zero_shot(engine, spec, tokenizer, rank, world, device)
        progress["base_zero_shot"] = base_scores
        tracker.log({f"zero_shot_base/{k}": v for k, v in base_scores.items()}, step=0)

    # ---------------------------------------------------------------- train
    peak = peak_flops(device)
    flops_token = flops_per_token(spec, params)
    window = _Window()
    step = progress["step"]
    # With max_steps the data repeats as needed; otherwise `epochs` passes (default 1). The epoch count is
    # advanced identically on every rank (all stop an epoch together), never from a rank's own stream.
    max_epochs = hp.epochs or (None if hp.max_steps else 1)
    engine.train()
    while step < total_steps and (max_epochs is None or progress["epochs"] < max_epochs):
        steps_before = step
        batches = iter(stream)
        while step < total_steps:
            batch = next(batches, None)
            # Ranks pack differently and may run dry a batch apart: all stop when any does.
            if not _all_ranks_have(batch is not None, device):
                progress["epochs"] += 1
                break
            assert batch is not None
            loss = engine(**batch.to_torch(device), use_cache=False).loss
            engine.backward(loss)
            before = engine.global_steps
            engine.step()
            window.add(loss.item(), batch.num_tokens)
            step_keys += [key for row in batch.keys for key in row]
            if engine.global_steps == before:
                continue  # still accumulating
            step = engine.global_steps
            if example_log is not None:
                with example_log.open("a") as fh:
                    fh.write(json.dumps({"step": step, "keys": step_keys}) + "\n")
            step_keys = []
            metrics = window.close(engine, device, world, flops_token, peak, scheduler)
            progress["tokens"] += metrics["tokens"]
            if step % spec.tracking.log_every_n_steps == 0 or step == total_steps:
                tracker.log(metrics, step)
                _log(
                    rank,
                    f"step {step}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                    f"{metrics['tokens_per_s']:.0f} tok/s",
                )
            if step % spec.checkpointing.every_n_steps == 0 and step < total_steps:
                progress["step"] = step
                _report_checkpoint(engine, stream, progress, rank, world, metrics)
            if spec.eval.every_n_steps and step % spec.eval.every_n_steps == 0:
                tracker.log(evaluate.eval_loss(engine, spec, tokenizer, rank, world, device), step)
                engine.train()
        if step == steps_before and step < total_steps:
            raise RuntimeError(
                "an epoch produced no optimizer step: too little data for the batch size and ranks"
            )

    # ---------------------------------------------------------------- finish
    final: dict[str, Any] = {"step": step, "tokens": progress["tokens"]}
    if spec.data.eval_sources or spec.data.holdout_fraction > 0:
        final.update(evaluate.eval_loss(engine, spec, tokenizer, rank, world, device))
    if spec.eval.zero_shot_sources:
        tuned = evaluate.zero_shot(engine, spec, tokenizer, rank, world, device)
        final.update({f"zero_shot/{k}": v for k, v in tuned.items()})
        final.update({f"zero_shot_base/{k}": v for k, v in (progress["base_zero_shot"] or {}).items()})
    tracker.log({k: v for k, v in final.items() if isinstance(v, float)}, step)
    out = Path(tempfile.mkdtemp(prefix="tuneplane-final-"))
    _save_model(engine, spec, tokenizer, out / "model", rank)
    if rank == 0:
        (out / "final.json").write_text(json.dumps(final | {"base_zero_shot": progress["base_zero_shot"]}))
    ray.train.report({"step": step, "final": 1}, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
    shutil.rmtree(out, ignore_errors=True)
    dist.barrier()


# -------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[tuneplane] {message}", flush=True)


def _all_ranks_have(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _steps_for_epochs(spec: TuningSpec, tokenizer: Any, rank: int, world: int) -> int:
    """Optimizer steps in `epochs` passes: this rank counts its own batches, all ranks take the minimum."""
    hp = spec.hyperparameters
    stream = InstructionStream(
        spec.data, tokenizer, seed=hp.seed, rank=rank, world_size=world, micro_batch_size=hp.micro_batch_size
    )
    batches = sum(1 for _ in stream)
    count = torch.tensor([batches])
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    return max(1, int(count.item()) * (hp.epochs or 1) // hp.gradient_accumulation_steps)


class _Window:
    """Accumulates micro-steps between two optimizer steps into one set of metrics."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def close(
        self, engine: Any, device: torch.device, world: int, flops_token: float, peak: float, scheduler: Any
    ) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        stats = torch.tensor(
            [float(np.mean(self.losses)), float(self.tokens)], dtype=torch.float64, device=device
        )
        dist.all_reduce(stats)
        tokens = stats[1].item()
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "loss": stats[0].item() / world,
            "lr": float(scheduler.get_last_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "memory_gb": _memory_gb(device),
            "tflops_per_device": flops_token * tokens / elapsed / world / 1e12,
            "mfu": flops_token * tokens / elapsed / world / peak if peak else 0.0,
        }
        self.losses, self.tokens, self.started = [], 0, time.perf_counter()
        return metrics


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _report_checkpoint(
    engine: Any,
    stream: InstructionStream,
    progress: dict[str, Any],
    rank: int,
    world: int,
    metrics: dict[str, float],
) -> None:
    """DeepSpeed shards + this rank's data cursor + RNG. Ray registers the checkpoint only once every rank has
    reported, and the loader checks that every rank's part is present: a partial checkpoint is never used."""
    import ray.train

    folder = Path(tempfile.mkdtemp(prefix="tuneplane-ckpt-"))
    engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
    (folder / "data").mkdir()
    (folder / "data" / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "stream": stream.state_dict(),
                "rng": {
                    "python": random.getstate()[1],
                    "numpy": np.random.get_state()[1].tolist(),  # type: ignore[index]
                    "torch": torch.get_rng_state().tolist(),
                },
            }
        )
    )
    if rank == 0:
        (folder / CHECKPOINT_META).write_text(json.dumps({"world_size": world, **progress}))
    ray.train.report(
        metrics | {"step": progress["step"]}, checkpoint=ray.train.Checkpoint.from_directory(str(folder))
    )
    shutil.rmtree(folder, ignore_errors=True)


def _load_checkpoint(
    engine: Any, folder: Path, rank: int, world: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    meta_path = folder / CHECKPOINT_META
    if not meta_path.exists():
        raise RuntimeError(
            f"checkpoint {folder} has no {CHECKPOINT_META}: incomplete, refusing to resume from it"
        )
    meta = json.loads(meta_path.read_text())
    if meta["world_size"] != world:
        raise RuntimeError(f"checkpoint was written by {meta['world_size']} workers, this run has {world}")
    missing = [r for r in range(world) if not (folder / "data" / f"rank{r}.json").exists()]
    if missing:
        raise RuntimeError(f"checkpoint lacks the data state of ranks {missing}: refusing to resume from it")
    engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
    state = json.loads((folder / "data" / f"rank{rank}.json").read_text())
    random.setstate((3, tuple(state["rng"]["python"]), None))
    np.random.set_state(("MT19937", np.asarray(state["rng"]["numpy"], dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    return state["stream"], {k: meta[k] for k in ("step", "epochs", "tokens", "base_zero_shot")}


def _republish_if_final(checkpoint: Any, rank: int) -> bool:
    """The last checkpoint of a finished run holds the final model: report it again as this run's result."""
    import ray.train

    with checkpoint.as_directory() as folder:
        if not (Path(folder) / "final.json").exists():
            return False
        out = Path(tempfile.mkdtemp(prefix="tuneplane-final-"))
        if rank == 0:
            shutil.copytree(folder, out, dirs_exist_ok=True)
        step = json.loads((Path(folder) / "final.json").read_text())["step"]
    _log(rank, f"job already finished at step {step}: republishing its final checkpoint")
    ray.train.report({"step": step, "final": 1}, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
    shutil.rmtree(out, ignore_errors=True)
    return True


def _save_model(engine: Any, spec: TuningSpec, tokenizer: Any, out: Path, rank: int) -> None:
    """Rank 0 writes the adapter (LoRA) or the weights (full/partial). Under ZeRO-3 parameters are partitioned:
    every rank must enter the gather, or rank 0 would write empty tensors."""
    import deepspeed

    module = engine.module
    if spec.distributed.zero_stage == 3:
        wanted = (
            [p for p in module.parameters() if p.requires_grad]
            if isinstance(spec.method, LoraMethod)
            else list(module.parameters())
        )
        with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None):
            if rank == 0:
                _write(module, tokenizer, out)
    elif rank == 0:
        _write(module, tokenizer, out)
    if rank == 0:
        evaluate.check_not_empty(out)
    dist.barrier()


def _write(module: Any, tokenizer: Any, out: Path) -> None:
    # A PeftModel writes only the adapter (adapter_model.safetensors + adapter_config.json); a plain model
    # writes all its weights. Inside GatheredParameters the state dict holds full, not partitioned, tensors.
    out.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


class _Tracker:
    """Rank 0 logs step metrics to the job's MLflow run (created by the launcher); other ranks do nothing."""

    def __init__(self, settings: dict[str, Any], rank: int):
        self.enabled = rank == 0 and bool(settings.get("tracking_uri")) and bool(settings.get("run_id"))
        if self.enabled:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=settings["tracking_uri"])
            self.run_id = settings["run_id"]

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )
