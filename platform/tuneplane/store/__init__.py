"""The control plane's record of jobs: tables, states, and the operations on them (one place for each)."""

from tuneplane.store.db import Database
from tuneplane.store.jobs import (
    Conflict,
    NotFound,
    Principal,
    cancel_job,
    create_job,
    get_job,
    list_events,
    list_jobs,
    transition,
)
from tuneplane.store.models import Attempt, Job, JobEvent
from tuneplane.store.states import ACTIVE, TERMINAL, WAITING, InvalidTransition, JobState

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "WAITING",
    "Attempt",
    "Conflict",
    "Database",
    "InvalidTransition",
    "Job",
    "JobEvent",
    "JobState",
    "NotFound",
    "Principal",
    "cancel_job",
    "create_job",
    "get_job",
    "list_events",
    "list_jobs",
    "transition",
]
