"""Job states and the only transitions allowed between them; every state change goes through `check`.

A module of its own, with no dependencies, so the SDK (`tuneplane.client`) shares the state names with the
control plane without needing the server extras.
"""

from __future__ import annotations

from enum import StrEnum

from tuneplane.errors import InvalidTransition


class JobState(StrEnum):
    PENDING = "PENDING"  # accepted by the API
    VALIDATING = "VALIDATING"  # the reconciler checks data and model are reachable
    QUEUED = "QUEUED"  # waiting for the team's quota
    SUBMITTED = "SUBMITTED"  # handed to the backend
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset({S.VALIDATING, S.FAILED, S.CANCELLED}),
    S.VALIDATING: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.QUEUED: frozenset({S.SUBMITTED, S.FAILED, S.CANCELLED}),
    S.SUBMITTED: frozenset({S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in ALLOWED.items() if not nxt)
ACTIVE = frozenset({S.SUBMITTED, S.RUNNING})  # what counts against a team's quota
WAITING = frozenset({S.PENDING, S.VALIDATING, S.QUEUED})  # cancelled at once, nothing runs yet


def check(current: JobState, new: JobState) -> None:
    if new not in ALLOWED[current]:
        raise InvalidTransition(f"a {current} job cannot become {new}")
