"""The one interface every backend implements: submit, status, cancel, logs, watch and close.

The reconciler owns all job state; a backend only starts, reports on and stops what runs. `submit` is
idempotent by job id (a second call for a job already started starts nothing), so a control plane that crashes
between starting a job and recording it never starts it twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from tuneplane.spec import TuningSpec


class RunPhase(StrEnum):
    PENDING = "PENDING"  # accepted by the backend, not yet running (pods scheduling, Kueue suspended)
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"  # ended by a cancel
    MISSING = "MISSING"  # the backend knows nothing of this job


@dataclass(frozen=True)
class BackendJob:
    """What a backend needs to know about a job; built by the control plane from its record."""

    id: str  # a DNS-1123 label, unique; names the RayJob, the Ray Train run and the MLflow run
    team: str
    namespace: str
    spec: TuningSpec
    gpu_pool: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run (`capabilities.py` answers it from the config alone, for admission)."""

    name: str
    # Jobs read local paths (inside their team's data roots); elsewhere a spec must name object storage.
    reads_local_paths: bool
    # Runs GPU workers (a job asking for GPUs elsewhere is refused at submit).
    gpus: bool
    # The longest job id it can name its objects by: the store makes ids that fit.
    max_job_id_length: int
    # Every worker of a CPU job runs on one machine with this much memory (the job must fit it); None: workers
    # spread over nodes, each checked by its pool's shape.
    host_memory_bytes: int | None
    # Jobs it runs at once, whatever the teams' quotas (None: the cluster's scheduler queues the rest).
    max_concurrent_jobs: int | None
    # One machine, one operator: an API without tokens may create an admin token in the state folder.
    local_admin_token: bool


@dataclass(frozen=True)
class RunStatus:
    phase: RunPhase
    message: str = ""  # safe to show: no secrets


class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def submit(self, job: BackendJob) -> None: ...

    def status(self, job: BackendJob) -> RunStatus: ...

    def cancel(self, job: BackendJob) -> None:
        """Stop the job and remove what the backend created for it; idempotent."""
        ...

    def logs(self, job: BackendJob, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with follow, keep yielding until the job ends, and "" (a heartbeat, not a
        line) every so often while nothing new comes, so that a reader is never held longer than that."""
        ...

    def watch(self, namespace: str, timeout_seconds: int = 60) -> Iterator[tuple[str, RunStatus]]:
        """(job id, status) as jobs in `namespace` change, for up to timeout_seconds: wakes the reconciler
        early. The reconciler polls too, so a watch may miss changes; it must not invent them."""
        ...

    def close(self) -> None:
        """Release connections; called once when the control plane shuts down."""
        ...
