"""Scale benchmark: memory per rank, the memory estimate against it, and training over two Ray nodes.

On a Llama built here (tuneplane.devtools.tiny: hidden 256, 4 layers, its vocabulary padded to 8192 so that
vocabulary / hidden is 32, as in Llama 3), LoRA on every linear (r 8), fp32:

1. peak bytes per rank of one training step (forward + backward + AdamW step, in-process, world size 1) on four
   packed 2048-token rows of the shipped data (8192 tokens: two LOSS_CHUNK_TOKENS chunks): activation
   checkpointing on vs off (`model.activation_checkpointing` through `load_model`), and the chunked loss
   (`train/loss.py`) vs Hugging Face's `model(**batch).loss`; on the rows as shipped (prompts masked) and with
   every position a target. Peak = bytes alive before the step + the most the step allocated at once
   (tuneplane.devtools.peak: torch.profiler's allocator events). Goal: both ratios < 1.
2. `tuneplane.memory.estimate` for the same configurations (it assumes the chunked loss, every position scored
   and attention without a mask) against the measured peaks, also of the rows without `position_ids` (no
   block-diagonal mask for the packed documents). Goal: within 25% (0.75-1.25), as tests/test_memory_estimate.py.
3. tokens/s of the full training path (`tuneplane.train.run`: Ray Train + DeepSpeed ZeRO-2, 2 workers of 1 CPU,
   MLflow) with the workers on two Ray nodes vs both on one node, loopback (LoopbackCluster: separate raylets on
   127.0.0.1). Goal: >= 0.9 (the same cores and gloo over TCP either way; a gap would be the platform's).
4. recovery from a lost node: after the first checkpoint every process of a worker node gets SIGKILL and a
   replacement node joins; seconds from the kill to the checkpoint restored and to the first step trained after
   it. Both come from the MLflow metrics' timestamps, which rank 0 takes when it logs (`resumes` right after it
   loads the checkpoint, `loss` after every step): the worker's own clock at the event, on this one machine. The
   printed "[tuneplane] resumed from step" line would be stamped only when the driver reads it.

    python bench/scale.py [--steps 40] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from tuneplane.devtools.cluster import CHECKPOINT_SNAPSHOT, LoopbackCluster, registered_checkpoints
from tuneplane.raylocal import use_loopback
from tuneplane.spec import TuningSpec, parse_spec, resolve_paths

REPO = Path(__file__).resolve().parents[1]
THREADS = max(1, os.cpu_count() or 2)
HIDDEN, LAYERS, VOCAB = 256, 4, 8192
MEMORY_ROWS, MEMORY_SEQ = 4, 2048  # a step of the memory measurements: two loss chunks (LOSS_CHUNK_TOKENS)
RAY_ROWS, RAY_SEQ = 2, 512  # per worker and step of the Ray runs
WARMUP = 4  # steps left out of tokens/s
LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
_MIB = 2**20


def build_bench_model(folder: Path) -> int:
    """The tiny Llama and its tokenizer in `folder`, the vocabulary padded to VOCAB; returns the parameters."""
    from tuneplane.devtools.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(folder)
    model = build_model(folder, tokenizer, hidden_size=HIDDEN, layers=LAYERS)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)  # rows the tokenizer never emits: memory only
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def base_spec(model_dir: Path, rows: int, seq: int, **distributed: Any) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "jobs" / "tiny-cpu.yaml").read_text())
    data["model"]["base"] = str(model_dir)
    data["method"] = dict(LORA)
    data["data"].update({"max_seq_len": seq, "holdout_fraction": 0.0})
    data["distributed"].update(distributed)
    data["hyperparameters"].update({"micro_batch_size": rows, "warmup_steps": 0})
    data["tracking"].update({"registered_model_name": None})
    data["eval"] = {}
    return data


def memory_spec(model_dir: Path, checkpointing: str) -> TuningSpec:
    data = base_spec(model_dir, MEMORY_ROWS, MEMORY_SEQ, num_workers=1, zero_stage=0)
    data["model"]["activation_checkpointing"] = checkpointing
    return resolve_paths(parse_spec(data), REPO / "jobs")


def step_peak(spec: TuningSpec, batch: dict[str, Any], hf_loss: bool) -> int:
    """Peak bytes of a training step of the spec's model (built as the workers build it) on `batch`."""
    import torch

    from tuneplane.devtools.peak import training_step_peak
    from tuneplane.train.builders import load_model
    from tuneplane.train.loss import causal_lm_loss

    torch.manual_seed(0)
    model = load_model(spec, on_gpu=False).train()

    def loss_of() -> torch.Tensor:
        return model(**batch, use_cache=False).loss if hf_loss else causal_lm_loss(model, batch)

    return training_step_peak(model, loss_of)


def memory_figures(model_dir: Path, bar: tqdm) -> dict[str, Any]:
    """Measured peaks by (checkpointing, rows, loss), the estimates by checkpointing, the share of positions
    scored. Rows: "shipped" (the packed data as it comes, prompts masked), "scored" (the same tokens, every
    position a target: what the estimate assumes) and "unpacked" (the same without `position_ids`, so the
    attention needs no block-diagonal mask, as with a varlen flash kernel; the chunked loss only)."""
    import torch

    from tuneplane.data import InstructionStream
    from tuneplane.memory import estimate, find_shape
    from tuneplane.pretrained import load_tokenizer

    torch.set_num_threads(THREADS)
    shape, _ = find_shape(str(model_dir))
    assert shape is not None
    peaks: dict[tuple[str, str, str], int] = {}
    estimates: dict[str, int] = {}
    for checkpointing in ("off", "on"):
        spec = memory_spec(model_dir, checkpointing)
        packed = next(
            iter(InstructionStream(spec.data, load_tokenizer(spec.model), micro_batch_size=MEMORY_ROWS))
        )
        shipped = packed.to_torch()
        scored = shipped | {"labels": shipped["input_ids"].clone()}
        unpacked = {key: scored[key] for key in ("input_ids", "labels")}
        rows = {"shipped": shipped, "scored": scored, "unpacked": unpacked}
        for kind, batch in rows.items():
            for loss in ("chunked", "hf") if kind != "unpacked" else ("chunked",):
                bar.set_description(f"memory: checkpointing {checkpointing}, {kind} rows, {loss} loss")
                peaks[checkpointing, kind, loss] = step_peak(spec, batch, loss == "hf")
                bar.update()
        estimates[checkpointing] = estimate(spec, shape, 1, checkpointing=checkpointing == "on").total
    share = packed.num_trained_tokens / packed.num_tokens
    return {"peaks": peaks, "estimates": estimates, "scored_share": share}


# ------------------------------------------------------------------------------------------ Ray, two nodes


def ray_spec(model_dir: Path, steps: int, checkpoint_every: int | None = None) -> TuningSpec:
    """2 workers of 1 CPU, ZeRO-2; checkpoints (and 2 tolerated failures) only for the node-loss run."""
    failures = 2 if checkpoint_every else 0
    data = base_spec(model_dir, RAY_ROWS, RAY_SEQ, num_workers=2, cpus_per_worker=1, zero_stage=2)
    data["distributed"]["max_failures"] = failures
    data["hyperparameters"]["max_steps"] = steps
    data["checkpointing"]["every_n_steps"] = checkpoint_every or 10**6
    data["tracking"]["log_every_n_steps"] = 1 if checkpoint_every else 2
    return resolve_paths(parse_spec(data), REPO / "jobs")


@contextlib.contextmanager
def loopback(node_cpus: list[int]) -> Iterator[LoopbackCluster]:
    """A head running no workers (as on KubeRay) and one worker node per entry of `node_cpus`."""
    import ray

    # Short root: Ray's unix sockets live under each node's temp folder (107-character limit).
    root = Path(tempfile.mkdtemp(prefix="tp-scale-", dir="/tmp"))
    cluster = LoopbackCluster(root)
    try:
        for index, cpus in enumerate(node_cpus):
            cluster.add_worker_node(f"node-{index}", num_cpus=cpus)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def settings_for(work: Path, name: str) -> Any:
    from tuneplane.train import RunSettings

    job_id = f"{name}-{uuid.uuid4().hex[:6]}"
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    return RunSettings(job_id, str(work / "runs"), tracking, str(work / "artifacts"))


def metric_history(settings: Any, run_id: str | None, key: str) -> list[Any]:
    from mlflow import MlflowClient

    return list(MlflowClient(tracking_uri=settings.tracking_uri).get_metric_history(run_id or "", key))


def tokens_per_s(spec: TuningSpec, work: Path, name: str) -> float:
    from tuneplane.train import run

    settings = settings_for(work, name)
    result = run(spec, settings)
    history = metric_history(settings, result.run_id, "tokens_per_s")
    return statistics.median(h.value for h in history if h.step > WARMUP)


def _kill_after_first_checkpoint(cluster: LoopbackCluster, folder: Path, marks: dict[str, float]) -> None:
    """In a thread beside the run: SIGKILL the last worker node once Ray Train registered a checkpoint, then
    replace it."""
    snapshot = folder / CHECKPOINT_SNAPSHOT
    deadline = time.time() + 600
    while time.time() < deadline:
        if registered_checkpoints(snapshot.read_bytes() if snapshot.exists() else None):
            time.sleep(1.5)  # let training go past the checkpoint, so work is lost and redone
            marks["kill"] = time.time()
            cluster.kill_node(cluster.nodes[-1])
            cluster.add_worker_node("node-replacement")
            marks["replaced"] = time.time()
            return
        time.sleep(0.2)


def node_loss_recovery(cluster: LoopbackCluster, spec: TuningSpec, work: Path) -> dict[str, float]:
    """Seconds from the kill to the replacement node up, the checkpoint restored and the first step after it;
    and the steps trained before the kill that were lost (past the checkpoint)."""
    from tuneplane.train import run

    settings = settings_for(work, "nodeloss")
    marks: dict[str, float] = {}
    folder = Path(settings.storage_path) / settings.job_id
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(cluster, folder, marks))
    killer.start()
    result = run(spec, settings)
    killer.join()
    resumes = metric_history(settings, result.run_id, "resumes")
    losses = metric_history(settings, result.run_id, "loss")
    if "kill" not in marks or not resumes:
        raise RuntimeError("the node was not killed after a checkpoint: raise --steps")
    kill_ms = marks["kill"] * 1000
    after = min((m for m in losses if m.timestamp > kill_ms), key=lambda m: m.timestamp)
    before = max(m.step for m in losses if m.timestamp <= kill_ms)
    return {
        "replaced": marks["replaced"] - marks["kill"],
        "restored": (resumes[0].timestamp - kill_ms) / 1000,
        "first_step": (after.timestamp - kill_ms) / 1000,
        "checkpoint_step": resumes[0].step,
        "lost_steps": before - resumes[0].step,
    }


def ray_figures(model_dir: Path, work: Path, steps: int, bar: tqdm) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bar.set_description("Ray: 2 workers on one node")
    with loopback([2]):
        out["one_node"] = tokens_per_s(ray_spec(model_dir, steps), work, "one-node")
    bar.update()
    with loopback([1, 1]) as cluster:
        bar.set_description("Ray: 2 workers on two nodes")
        out["two_nodes"] = tokens_per_s(ray_spec(model_dir, steps), work, "two-nodes")
        bar.update()
        bar.set_description("Ray: a node lost and replaced")
        kill_steps = max(6, steps // 2)
        out["recovery"] = node_loss_recovery(cluster, ray_spec(model_dir, kill_steps, kill_steps // 3), work)
        bar.update()
    return out


# --------------------------------------------------------------------------------------------------- table


def memory_rows(table: Table, memory: dict[str, Any]) -> None:
    peaks, estimates = memory["peaks"], memory["estimates"]
    share = f"{memory['scored_share']:.0%} of positions scored"
    kinds = {"shipped": f"shipped rows ({share})", "scored": "every position scored"}  # both packed
    for kind, label in kinds.items():
        for checkpointing in ("off", "on"):
            chunked, hf = peaks[checkpointing, kind, "chunked"], peaks[checkpointing, kind, "hf"]
            table.add_row(
                f"peak per rank, checkpointing {checkpointing}, {label}: chunked | HF loss",
                f"{chunked / _MIB:,.1f} | {hf / _MIB:,.1f} MiB",
                f"chunked: {chunked / hf:.2f} of HF",
                "< 1",
            )
    table.add_row(
        "checkpointing on / off, chunked loss (shipped | every position scored)",
        " | ".join(f"{peaks['on', k, 'chunked'] / peaks['off', k, 'chunked']:.2f}" for k in kinds),
        "",
        "< 1",
    )
    table.add_row(
        "peak per rank, every position scored, unpacked (no position_ids): checkpointing off | on",
        " | ".join(f"{peaks[c, 'unpacked', 'chunked'] / _MIB:,.1f}" for c in ("off", "on")) + " MiB",
        "",
        "",
    )
    for checkpointing in ("off", "on"):
        guess = estimates[checkpointing]
        names = {"unpacked": "unpacked", "scored": "packed every-scored", "shipped": "shipped"}
        measured = {name: peaks[checkpointing, k, "chunked"] for k, name in names.items()}
        table.add_row(
            f"memory.estimate, checkpointing {checkpointing} (assumes every position scored, no mask)",
            f"{guess / _MIB:,.1f} MiB",
            ", ".join(f"{guess / n:.2f} of {k}" for k, n in measured.items()),
            "0.75-1.25",
        )


def print_table(
    console: Console, n_params: int, memory: dict[str, Any], ray: dict[str, Any], steps: int
) -> None:
    table = Table(
        title=f"Scale ({n_params / 1e6:.1f}M-parameter Llama, vocabulary {VOCAB}, LoRA all-linear r 8, fp32, "
        f"{THREADS} CPU threads; memory: one step of {MEMORY_ROWS} x {MEMORY_SEQ} packed tokens)"
    )
    for column in ("measure", "value", "vs", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    memory_rows(table, memory)
    one, two = ray["one_node"], ray["two_nodes"]
    rows = f"{RAY_ROWS} x {RAY_SEQ} tokens per worker, {steps} steps"
    table.add_row(f"tokens/s, 2 workers on one node ({rows})", f"{one:,.0f}", "", "")
    table.add_row("tokens/s, 2 workers on two nodes", f"{two:,.0f}", f"{two / one:.2f} of one node", ">= 0.9")
    rec = ray["recovery"]
    lost = f"from step {rec['checkpoint_step']:.0f}, {rec['lost_steps']:.0f} steps redone"
    table.add_row("node killed -> replacement node joined", f"{rec['replaced']:.1f} s", "", "")
    table.add_row("node killed -> checkpoint restored (resumes metric)", f"{rec['restored']:.1f} s", lost, "")
    table.add_row(
        "node killed -> first step after resume (loss metric)", f"{rec['first_step']:.1f} s", "", ""
    )
    console.print(table)


def main() -> None:
    use_loopback()  # the Ray this bench starts listens on 127.0.0.1 only, with a token
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="steps of each tokens/s run (the node-loss run: half)"
    )
    parser.add_argument("--quick", action="store_true", help="12 steps: a smoke run, not a figure to quote")
    args = parser.parse_args()
    steps = 12 if args.quick else args.steps
    if steps <= WARMUP + 2:
        parser.error(f"--steps must be over {WARMUP + 2}: the first {WARMUP} steps are warm-up")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="tuneplane-bench-") as tmp:
        work = Path(tmp)
        with console.status("building the Llama"):
            n_params = build_bench_model(work / "model")
        with tqdm(total=13, leave=False, disable=None) as bar:
            memory = memory_figures(work / "model", bar)
            ray = ray_figures(work / "model", work, steps, bar)
    print_table(console, n_params, memory, ray, steps)


if __name__ == "__main__":
    main()
