"""The control plane's record of jobs: tables, and the operations on them (one place for each).

Job states and their transitions are `tuneplane.states`; the errors raised here are in `tuneplane.errors`.
"""

from tuneplane.store.db import Database
from tuneplane.store.jobs import (
    Principal,
    Usage,
    cancel_job,
    create_job,
    end_job,
    get_job,
    list_events,
    list_jobs,
    queue_in_order,
    record_submission,
    team_usage,
    transition,
)
from tuneplane.store.models import Attempt, Job, JobEvent

__all__ = [
    "Attempt",
    "Database",
    "Job",
    "JobEvent",
    "Principal",
    "Usage",
    "cancel_job",
    "create_job",
    "end_job",
    "get_job",
    "list_events",
    "list_jobs",
    "queue_in_order",
    "record_submission",
    "team_usage",
    "transition",
]
