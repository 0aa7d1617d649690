"""What the reconciler decides, as pure functions: no database, no backend, table-tested.

`decide` says what becomes of a submitted or running job given what its backend reports; `fits_quota` says
whether a team may start one more job; `queue_places` where each queued job stands. The reconciler gathers the facts, calls these, and carries out the
answer (anchor: Ray Train v2's failure policy and controller).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuneplane.backends.base import RunPhase, RunStatus
from tuneplane.config import Quota
from tuneplane.states import JobState

_STILL_GOING = (RunPhase.PENDING, RunPhase.RUNNING)
_GONE = (RunPhase.STOPPED, RunPhase.MISSING, RunPhase.FAILED)


@dataclass(frozen=True)
class Outcome:
    """The state a job moves to (None: it stays as it is) and the message recorded with the move."""

    state: JobState | None = None
    message: str = ""


WAIT = Outcome()


def decide(
    state: JobState, status: RunStatus, cancel_requested: bool, overdue: bool, max_duration_s: int
) -> Outcome:
    """The next state of a SUBMITTED or RUNNING job. A job being stopped (cancel requested, or past its
    deadline) waits until the backend reports it gone; a success reported meanwhile still counts."""
    phase = status.phase
    if phase in _STILL_GOING:
        if cancel_requested or overdue:
            return WAIT  # the stop is on its way
        if phase == RunPhase.RUNNING and state == JobState.SUBMITTED:
            return Outcome(JobState.RUNNING, "running")
        return WAIT
    if phase == RunPhase.SUCCEEDED:
        return Outcome(JobState.SUCCEEDED, "succeeded")
    if cancel_requested and phase in _GONE:
        return Outcome(JobState.CANCELLED, "cancelled")
    if overdue and phase in _GONE:
        return Outcome(JobState.FAILED, f"ran longer than max_job_duration_s ({max_duration_s} s); stopped")
    if phase == RunPhase.FAILED:
        return Outcome(JobState.FAILED, status.message or "failed")
    if phase == RunPhase.STOPPED:
        return Outcome(JobState.CANCELLED, status.message or "stopped outside Tuneplane")
    detail = f" ({status.message})" if status.message else ""
    return Outcome(JobState.FAILED, f"the backend has no record of this job{detail}")


def fits_quota(quota: Quota, jobs: int, gpus: int, job_gpus: int) -> bool:
    """Whether a team holding `jobs` jobs and `gpus` GPUs may start one more job needing `job_gpus`."""
    return jobs + 1 <= quota.max_concurrent_jobs and gpus + job_gpus <= quota.max_gpus


def queue_places(queued: Sequence[tuple[str, str, int]], quotas: Mapping[str, Quota]) -> dict[str, int]:
    """Each queued job's place (1 = next), from the queued jobs in scheduling order as (id, team, GPUs), counting
    only jobs that can ever start: a job its team's quota could never admit (a quota of 0, more GPUs than the
    team may hold, a team no longer configured) waits for ever, holds up no one and has no place itself."""
    places: dict[str, int] = {}
    for job_id, team, gpus in queued:
        quota = quotas.get(team)
        if quota is not None and fits_quota(quota, 0, 0, gpus):
            places[job_id] = len(places) + 1
    return places
