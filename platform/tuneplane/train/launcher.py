"""The driver side: turn a spec + the platform's run settings into a Ray Train job, follow it, publish the result.

`run` starts (or joins) Ray, handles SIGTERM, and drives the job's MLflow run through its lifecycle hooks
(`tracking.run.JobRun`: start, then publish into it (`publishing.publish`) and finish, or fail / kill);
`build_trainer` is the Ray Train job itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tuneplane.data.quality import DataFilter
from tuneplane.errors import CheckpointError, TrainingFailed
from tuneplane.files import Confinement, confine_process
from tuneplane.home import run_folders
from tuneplane.pretrained import locate_adapter
from tuneplane.spec import DistributedSpec, TuningSpec, is_local_path
from tuneplane.train import checkpointing


@dataclass(frozen=True)
class RunSettings:
    """What the platform (never the spec) decides: identity, storage, tracking, cluster address."""

    job_id: str
    storage_path: str  # Ray Train run storage (checkpoints): local folder or object-storage URI
    tracking_uri: str | None = None  # MLflow; None disables tracking
    artifact_root: str | None = None  # MLflow artifact location for new experiments
    ray_address: str | None = None  # None: start (or join) a local Ray; "local": always a new one
    accelerator_type: str | None = None  # from the job's GPU pool, e.g. "H100"
    example_log_dir: str | None = None  # each rank logs which records every step trained on (audits, tests)
    team: str | None = None  # the submitting team: owns the job's experiment and registered model
    confinement: Confinement | None = None  # where the team's local files may lie; None: anywhere


@dataclass
class RunResult:
    job_id: str
    metrics: dict[str, Any]
    model_uri: str | None
    run_id: str | None
    model_dir: str | None
    gate: dict[str, Any] | None = None  # the gate's verdict (status, checks, failures)


class Cancelled(Exception):
    """Raised in the main thread by the SIGTERM handler, to unwind out of Ray's wait: an expected ending (the run
    is already marked KILLED), which the entrypoint reports in one line."""


_GRACE_S = 20
# The job's log (the driver's output) holds each line once, as plain text. Ray Train's print patch would log
# every print of a worker a second time through its own console handler; Ray's driver would wrap each worker's
# `(RayTrainWorker pid=...)` prefix in terminal colour codes, and fold lines of several workers that differ only
# in their numbers into one, with a coloured "[repeated Nx across cluster]".
PLAIN_LOG_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_COLOR_PREFIX": "0", "RAY_DEDUP_LOGS": "0"}
CANCEL_LINE = b"[tuneplane] cancelled: training stops, the run is marked KILLED\n"


def run(spec: TuningSpec, settings: RunSettings) -> RunResult:
    from tuneplane.publishing.publish import publish
    from tuneplane.tracking.run import JobRun

    # First: Ray reads some of these switches when it is imported (RAY_DEDUP_LOGS), the rest when it prints.
    os.environ.update(PLAIN_LOG_ENV)
    confine_process(settings.confinement)  # the driver reads the team's files too (preflight, filter, tasks)
    job_run = JobRun()  # does nothing until started
    previous = signal.getsignal(signal.SIGTERM)
    terminated = threading.Event()  # set by the first SIGTERM
    # From the start: a cancel during the data preflight must end the run KILLED too.
    signal.signal(signal.SIGTERM, _sigterm_handler(lambda: job_run.kill(), terminated))
    try:
        job_run = JobRun.start(
            spec, settings.job_id, settings.tracking_uri, settings.artifact_root, settings.team
        )
        if job_run.enabled:
            job_run.log_data_report(_data_report(spec))
        # Looked up once here, before any data pass: a refused or missing version fails the job at once.
        adapter_at = locate_adapter(spec.model, settings.tracking_uri) if spec.model.adapter else None
        data_filter = _data_filter(spec)
        _start_ray(spec.distributed, settings)
        # After ray.init, which installs a SIGTERM handler of its own.
        signal.signal(signal.SIGTERM, _sigterm_handler(job_run.kill, terminated))
        drop = data_filter.drop.to_bytes() if len(data_filter.drop) else None
        result = _fit(build_trainer(spec, settings, job_run.run_id, drop, adapter_at))
        final, model_dir = _collect(result, settings)
        final |= _lm_eval(spec, model_dir)
        figures = data_filter.to_dict() if data_filter.figures.get("records") else None
        published = publish(spec, settings.job_id, job_run, model_dir, final, figures)
        job_run.finish()
        return RunResult(
            settings.job_id,
            final,
            published.model_uri,
            job_run.run_id,
            str(model_dir),
            published.verdict.to_dict(),
        )
    except (Cancelled, KeyboardInterrupt, SystemExit):
        job_run.kill()
        raise
    except BaseException:
        if terminated.is_set():  # the cancel unwound through Ray, which may have raised something else
            raise Cancelled() from None
        job_run.fail()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start_ray(dist_spec: DistributedSpec, settings: RunSettings) -> None:
    import ray

    if ray.is_initialized():
        return
    # Locally: no dashboard (never exposed without auth) and enough logical CPUs for the workers.
    needed = int(dist_spec.num_workers * dist_spec.cpus_per_worker) + 1
    starts_one = settings.ray_address in (None, "local")
    ray.init(
        address=settings.ray_address,
        num_cpus=max(os.cpu_count() or 1, needed) if starts_one else None,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": PLAIN_LOG_ENV},  # and by every worker, on any node
    )


def build_trainer(
    spec: TuningSpec,
    settings: RunSettings,
    run_id: str | None,
    drop: bytes | None = None,
    adapter_at: str | None = None,
) -> Any:
    """The Ray Train job: one worker per data-parallel rank, each running the recipe."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tuneplane.train.recipe import WorkerSettings
    from tuneplane.train.recipes import train_loop

    dist_spec = spec.distributed
    use_gpu = dist_spec.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": dist_spec.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = dist_spec.gpus_per_worker
    worker = WorkerSettings(
        run_id, settings.tracking_uri, settings.example_log_dir, drop, adapter_at, settings.confinement
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.to_dict(), "settings": worker},
        scaling_config=ScalingConfig(
            # Elastic: Ray Train starts with as many workers as fit (at least min) and restarts the group on
            # another number after a loss; the recipe then resumes through a resized checkpoint.
            num_workers=(dist_spec.min_workers, dist_spec.num_workers)
            if dist_spec.elastic
            else dist_spec.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            # Fill a node before using the next: ranks of a node share NVLink and its pod (see kuberay_pods).
            placement_strategy="PACK",
            accelerator_type=settings.accelerator_type if use_gpu else None,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=settings.job_id,
            storage_path=settings.storage_path,
            failure_config=FailureConfig(max_failures=dist_spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpointing.keep + 1),
            worker_runtime_env={
                "env_vars": {
                    "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": str(max(1, int(dist_spec.cpus_per_worker))),
                }
            },
        ),
    )


def _fit(trainer: Any) -> Any:
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise _unwrap(exc) from exc


def _collect(result: Any, settings: RunSettings) -> tuple[dict[str, Any], Path]:
    """The final metrics, and the final model copied where it can be published from (a local folder; with
    run storage on object storage, a local temporary one)."""
    if result.checkpoint is None:
        raise CheckpointError("training finished without a final checkpoint")
    local_root = settings.storage_path if is_local_path(settings.storage_path) else tempfile.gettempdir()
    model_dir = run_folders(local_root, settings.job_id)[1]
    with result.checkpoint.as_directory() as folder:
        final = json.loads((Path(folder) / checkpointing.FINAL_METRICS).read_text())
        # Emptied, not removed: in a sandbox the folder is a mount point (backends/sandbox.py).
        for old in model_dir.iterdir() if model_dir.exists() else ():
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        shutil.copytree(Path(folder) / checkpointing.MODEL_DIR, model_dir, dirs_exist_ok=True)
    return final, model_dir


def _unwrap(exc: Exception) -> TrainingFailed:
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return TrainingFailed(str(exc))
    rank = min(failures)
    cause = failures[rank]
    cause = getattr(cause, "cause", None) or cause
    return TrainingFailed(f"worker {rank}: {type(cause).__name__}: {cause}")


def _sigterm_handler(
    on_kill: Callable[[], None], terminated: threading.Event
) -> Callable[[int, FrameType | None], None]:
    """SIGTERM (pod deletion, cancel): say so in the log and record the run as KILLED at once, then unwind; if
    Ray holds the main thread past a grace period, exit hard so the pod does not hang until SIGKILL. The line is
    written first, straight to stderr, because the process may end by that hard exit."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if terminated.is_set():
            return
        terminated.set()
        os.write(2, CANCEL_LINE)
        on_kill()
        timer = threading.Timer(_GRACE_S, lambda: os._exit(128 + signum))
        timer.daemon = True
        timer.start()
        raise Cancelled()

    return handler


def _data_report(spec: TuningSpec) -> dict[str, Any]:
    """A sampled preflight of the spec's data (what `tuneplane validate` shows), for the run's record. When the
    data filter runs it reads every record and its figures go to the run (data/quality.json), so the sample's
    own duplicate and contamination pass would only repeat part of that work."""
    from tuneplane.data import preflight
    from tuneplane.data.quality import filtering
    from tuneplane.pretrained import load_tokenizer

    quality = not filtering(spec.data)
    return preflight(spec, load_tokenizer(spec.model), max_records=2000, samples=0, quality=quality).to_dict()


def _data_filter(spec: TuningSpec) -> DataFilter:
    """The training records to skip (duplicates, records overlapping eval data), decided once by the driver over
    every record in a fixed order, so each rank, each resume and each re-run drops exactly the same ones."""
    from tuneplane.data import build_filter

    data_filter = build_filter(spec, spec.hyperparameters.seed)
    if data_filter.figures.get("records"):
        print(f"[tuneplane] data filter: {_filter_line(data_filter)}", flush=True)
    return data_filter


def _filter_line(data_filter: DataFilter) -> str:
    f = data_filter.figures
    return (
        f"{len(data_filter.drop)} of {f['records']} training records dropped "
        f"({f['exact_duplicates']} exact duplicates, {f['near_duplicates']} near duplicates, "
        f"{f['contaminated']} overlapping eval data) in {f.get('seconds', 0):.1f} s"
    )


def _lm_eval(spec: TuningSpec, model_dir: Path) -> dict[str, float]:
    """lm-evaluation-harness tasks on the base and the tuned model (`lm_eval_base/*`, `lm_eval/*`), in the
    driver, one model loaded at a time."""
    if spec.eval.lm_eval is None:
        return {}
    from tuneplane.train.harness import run_lm_eval

    device = "cuda" if spec.distributed.gpus_per_worker > 0 and _cuda() else "cpu"
    base = run_lm_eval(spec, None, device)
    tuned = run_lm_eval(spec, str(model_dir), device)
    return {f"lm_eval_base/{k}": v for k, v in base.items()} | {f"lm_eval/{k}": v for k, v in tuned.items()}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
