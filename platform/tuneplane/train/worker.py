"""What a recipe asks of Ray Train, in one small module: where this worker runs, the checkpoint to resume
from, and reporting a checkpoint. The recipes call nothing of Ray's themselves (the launcher, on the driver's
side, builds the Ray Train job), so another distributed runner would change this file alone."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Placement:
    rank: int  # this worker's rank among all
    world: int  # workers in the group
    node_id: str  # the Ray node it runs on (audit logs)
    device: torch.device


def placement(on_gpu: bool) -> Placement:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    return Placement(
        ctx.get_world_rank(), ctx.get_world_size(), ray.get_runtime_context().get_node_id(), device
    )


def latest_checkpoint() -> Any | None:
    """The checkpoint Ray Train hands this attempt (the group's last reported one), or None on a first start."""
    import ray.train

    return ray.train.get_checkpoint()


@contextmanager
def opened(checkpoint: Any) -> Iterator[Path]:
    """A checkpoint's files, as a local folder for the duration."""
    with checkpoint.as_directory() as folder:
        yield Path(folder)


@contextmanager
def report_folder(kind: str) -> Iterator[Path]:
    """A fresh temporary folder for one report, removed once Ray has copied it to run storage."""
    folder = Path(tempfile.mkdtemp(prefix=f"tuneplane-{kind}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(metrics: dict[str, Any], folder: Path) -> None:
    """`ray.train.report` is a barrier: every rank calls it, with its own part of the checkpoint. Ray registers
    the checkpoint only once every rank has reported: a partial one is never used."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
