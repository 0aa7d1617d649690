"""The reconciler's decisions as tables: no database, no backend."""

from __future__ import annotations

import pytest

from tuneplane.backends.base import RunPhase, RunStatus
from tuneplane.config import Quota
from tuneplane.control.policies import WAIT, Outcome, decide, fits_quota, queue_places
from tuneplane.states import ACTIVE, ALLOWED, JobState

S, P = JobState, RunPhase
LIMIT = 3600


@pytest.mark.parametrize(
    ("state", "phase", "cancel", "overdue", "expected"),
    [
        # running normally
        (S.SUBMITTED, P.PENDING, False, False, WAIT),
        (S.SUBMITTED, P.RUNNING, False, False, Outcome(S.RUNNING, "running")),
        (S.RUNNING, P.RUNNING, False, False, WAIT),
        (S.RUNNING, P.PENDING, False, False, WAIT),  # pods rescheduled: still running for us
        (S.SUBMITTED, P.SUCCEEDED, False, False, Outcome(S.SUCCEEDED, "succeeded")),
        (S.RUNNING, P.SUCCEEDED, False, False, Outcome(S.SUCCEEDED, "succeeded")),
        (S.RUNNING, P.FAILED, False, False, Outcome(S.FAILED, "boom")),
        (S.RUNNING, P.STOPPED, False, False, Outcome(S.CANCELLED, "boom")),
        (
            S.RUNNING,
            P.MISSING,
            False,
            False,
            Outcome(S.FAILED, "the backend has no record of this job (boom)"),
        ),
        # being stopped: wait until the backend reports it gone
        (S.RUNNING, P.RUNNING, True, False, WAIT),
        (S.SUBMITTED, P.PENDING, True, False, WAIT),
        (S.RUNNING, P.RUNNING, False, True, WAIT),
        (S.RUNNING, P.STOPPED, True, False, Outcome(S.CANCELLED, "cancelled")),
        (S.RUNNING, P.MISSING, True, False, Outcome(S.CANCELLED, "cancelled")),
        (S.RUNNING, P.FAILED, True, False, Outcome(S.CANCELLED, "cancelled")),
        (S.RUNNING, P.SUCCEEDED, True, False, Outcome(S.SUCCEEDED, "succeeded")),  # finished first
        (
            S.RUNNING,
            P.STOPPED,
            False,
            True,
            Outcome(S.FAILED, f"ran longer than max_job_duration_s ({LIMIT} s); stopped"),
        ),
        (S.RUNNING, P.MISSING, True, True, Outcome(S.CANCELLED, "cancelled")),  # a cancel wins
    ],
)
def test_decide(state, phase, cancel, overdue, expected) -> None:
    outcome = decide(state, RunStatus(phase, "boom"), cancel, overdue, LIMIT)
    assert outcome == expected
    assert outcome.state is None or outcome.state in ALLOWED[state]  # never an illegal move


def test_decide_without_a_backend_message() -> None:
    assert decide(S.RUNNING, RunStatus(P.FAILED), False, False, LIMIT) == Outcome(S.FAILED, "failed")
    assert decide(S.RUNNING, RunStatus(P.STOPPED), False, False, LIMIT).message == "stopped outside Tuneplane"
    missing = decide(S.RUNNING, RunStatus(P.MISSING), False, False, LIMIT)
    assert missing == Outcome(S.FAILED, "the backend has no record of this job")


@pytest.mark.parametrize("state", sorted(ACTIVE))
@pytest.mark.parametrize("phase", list(RunPhase))
@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("overdue", [False, True])
def test_every_decision_is_a_legal_move(state, phase, cancel, overdue) -> None:
    outcome = decide(state, RunStatus(phase), cancel, overdue, LIMIT)
    assert outcome.state is None or outcome.state in ALLOWED[state]


@pytest.mark.parametrize(
    ("jobs", "gpus", "job_gpus", "fits"),
    [
        (0, 0, 0, True),
        (1, 0, 0, True),  # 2 jobs allowed
        (2, 0, 0, False),
        (0, 6, 2, True),  # exactly the GPU quota
        (0, 6, 3, False),
        (1, 8, 0, True),  # a CPU job needs no GPU
    ],
)
def test_fits_quota(jobs, gpus, job_gpus, fits) -> None:
    assert fits_quota(Quota(max_concurrent_jobs=2, max_gpus=8), jobs, gpus, job_gpus) is fits
    assert fits_quota(Quota(max_concurrent_jobs=0, max_gpus=8), 0, 0, 0) is False  # a team at quota 0


_QUOTAS = {
    "alpha": Quota(max_concurrent_jobs=1, max_gpus=8),
    "idle": Quota(max_concurrent_jobs=0, max_gpus=8),  # may never run a job
    "small": Quota(max_concurrent_jobs=2, max_gpus=1),
}


@pytest.mark.parametrize(
    ("queued", "places"),
    [
        ([], {}),
        ([("a1", "alpha", 0), ("a2", "alpha", 2)], {"a1": 1, "a2": 2}),
        # a quota-0 team's jobs ahead hold up no one and have no place themselves
        ([("i1", "idle", 0), ("i2", "idle", 0), ("a1", "alpha", 0)], {"a1": 1}),
        # a job needing more GPUs than its team may ever hold; a team no longer configured
        ([("s1", "small", 2), ("g1", "gone", 0), ("s2", "small", 1), ("a1", "alpha", 0)], {"s2": 1, "a1": 2}),
    ],
)
def test_queue_places_count_only_jobs_that_can_start(queued, places) -> None:
    assert queue_places(queued, _QUOTAS) == places
