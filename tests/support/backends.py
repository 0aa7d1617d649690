"""A backend for control-plane tests: it runs nothing and records what it is asked."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from tuneplane.backends.base import BackendJob, Capabilities, RunPhase, RunStatus

# A cluster that queues what it cannot run (no machine-wide limit), as KubeRay does.
RECORDING = Capabilities(
    name="recording", reads_local_paths=True, gpus=True, max_job_id_length=47, host_memory_bytes=None,
    max_concurrent_jobs=None, local_admin_token=False,
)  # fmt: skip


class RecordingBackend:
    """Plays a cluster: remembers submits and cancels; the test sets each job's phase."""

    name = "recording"
    capabilities = RECORDING

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submits: Counter[str] = Counter()
        self.cancels: Counter[str] = Counter()
        self.phase: dict[str, RunStatus] = {}

    def submit(self, job: BackendJob) -> None:
        with self.lock:
            self.submits[job.id] += 1
            self.phase.setdefault(job.id, RunStatus(RunPhase.PENDING))

    def status(self, job: BackendJob) -> RunStatus:
        return self.phase.get(job.id, RunStatus(RunPhase.MISSING))

    def cancel(self, job: BackendJob) -> None:
        self.cancels[job.id] += 1
        self.phase[job.id] = RunStatus(RunPhase.STOPPED)

    def logs(self, job: BackendJob, follow: bool = False) -> Iterator[str]:
        return iter(())

    def watch(self, namespace: str, timeout_seconds: int = 60) -> Iterator[tuple[str, RunStatus]]:
        return iter(())

    def close(self) -> None:
        pass
