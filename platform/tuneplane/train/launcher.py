"""The driver side: turn a spec + the platform's run settings into a Ray Train job, follow it, publish the result."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from tuneplane.spec import TuningSpec, is_local_path


@dataclass(frozen=True)
class RunSettings:
    """What the platform (never the spec) decides: identity, storage, tracking, cluster address."""

    job_id: str
    storage_path: str  # Ray Train run storage (checkpoints): local folder or object-storage URI
    tracking_uri: str | None = None  # MLflow; None disables tracking
    artifact_root: str | None = None  # MLflow artifact location for new experiments
    ray_address: str | None = None  # None: start (or join) a local Ray
    accelerator_type: str | None = None  # from the job's GPU pool, e.g. "H100"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    job_id: str
    metrics: dict[str, Any]
    model_uri: str | None
    run_id: str | None
    model_dir: str | None


class TrainingFailed(RuntimeError):
    """A run that failed for good; the message is the first worker's error, without Ray's wrapping."""


class _Terminated(Exception):
    pass


def _unwrap(exc: Exception) -> TrainingFailed:
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return TrainingFailed(str(exc))
    rank = min(failures)
    cause = failures[rank]
    cause = getattr(cause, "cause", None) or cause
    return TrainingFailed(f"worker {rank}: {type(cause).__name__}: {cause}")


_terminated = threading.Event()
_GRACE_S = 20


def _sigterm_handler(on_kill: Any) -> Any:
    """SIGTERM (pod deletion, cancel): record the run as KILLED at once, then unwind; if Ray holds the main
    thread past a grace period, exit hard so the pod does not hang until SIGKILL."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if _terminated.is_set():
            return
        _terminated.set()
        on_kill()
        timer = threading.Timer(_GRACE_S, lambda: os._exit(128 + signum))
        timer.daemon = True
        timer.start()
        raise _Terminated()

    return handler


def run(spec: TuningSpec, settings: RunSettings) -> RunResult:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tuneplane import tracking
    from tuneplane.train.recipe import train_loop

    dist_spec = spec.distributed
    use_gpu = dist_spec.gpus_per_worker > 0
    run_id = None
    if settings.tracking_uri:
        run_id = tracking.start_job_run(spec, settings.job_id, settings.tracking_uri, settings.artifact_root)
        tracking.log_data_report(settings.tracking_uri, run_id, _data_report(spec))
    _terminated.clear()
    previous = signal.getsignal(signal.SIGTERM)
    status = "FAILED"
    try:
        if not ray.is_initialized():
            # Locally: no dashboard (never exposed without auth) and enough logical CPUs for the workers.
            needed = int(dist_spec.num_workers * dist_spec.cpus_per_worker) + 1
            ray.init(
                address=settings.ray_address,
                num_cpus=None if settings.ray_address else max(os.cpu_count() or 1, needed),
                include_dashboard=False,
                log_to_driver=True,
            )
        # After ray.init, which installs a SIGTERM handler of its own.
        signal.signal(signal.SIGTERM, _sigterm_handler(lambda: _end_run(settings, run_id, "KILLED")))
        resources: dict[str, float] = {"CPU": dist_spec.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = dist_spec.gpus_per_worker
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "spec": spec.to_dict(),
                "settings": {"run_id": run_id, "tracking_uri": settings.tracking_uri, **settings.extra},
            },
            scaling_config=ScalingConfig(
                num_workers=dist_spec.num_workers,
                use_gpu=use_gpu,
                resources_per_worker=resources,
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
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise _unwrap(exc) from exc
        if result.checkpoint is None:
            raise RuntimeError("training finished without a final checkpoint")
        # The published copy is made from a local folder; with run storage on object storage, a local one.
        local_root = settings.storage_path if is_local_path(settings.storage_path) else tempfile.gettempdir()
        model_dir = Path(local_root).expanduser() / "models" / settings.job_id
        with result.checkpoint.as_directory() as folder:
            final = json.loads((Path(folder) / "final.json").read_text())
            _copy_tree(Path(folder) / "model", model_dir)
        model_uri = None
        if settings.tracking_uri and run_id:
            metrics = {k: v for k, v in final.items() if isinstance(v, (int, float))}
            model_uri = tracking.publish_model(
                spec, settings.job_id, run_id, model_dir, settings.tracking_uri, metrics
            )
        status = "FINISHED"
        return RunResult(settings.job_id, final, model_uri, run_id, str(model_dir))
    except (_Terminated, KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not _terminated.is_set():  # a SIGTERM has already recorded KILLED
            _end_run(settings, run_id, status)


def _end_run(settings: RunSettings, run_id: str | None, status: str) -> None:
    from tuneplane import tracking

    if settings.tracking_uri and run_id:
        tracking.end_job_run(settings.tracking_uri, run_id, status)


def _data_report(spec: TuningSpec) -> dict[str, Any]:
    """A sampled preflight of the spec's data (what `tuneplane validate` shows), for the run's record."""
    from tuneplane.data import preflight
    from tuneplane.pretrained import load_tokenizer

    return preflight(spec, load_tokenizer(spec.model), max_records=2000, samples=0).to_dict()


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
