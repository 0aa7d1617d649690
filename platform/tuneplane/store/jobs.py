"""Operations on job records. Routes and the reconciler call these; nothing else writes a job's state."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, defer, selectinload

from tuneplane.spec import TuningSpec
from tuneplane.store.models import Job, JobEvent, utcnow
from tuneplane.store.states import WAITING, JobState, check


@dataclass(frozen=True)
class Principal:
    """Who is calling: a team member, or an admin (who sees every team's jobs)."""

    team: str
    role: str = "member"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        return f"admin:{self.team}" if self.is_admin else self.team


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


def request_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def new_job_id(name: str) -> str:
    # The id names the RayJob, its pods' prefix and the Ray Train run: KubeRay refuses RayJob names over 47
    # characters (it derives longer names from them).
    return f"{name[:38].rstrip('-')}-{secrets.token_hex(4)}"


def create_job(
    session: Session,
    principal: Principal,
    spec: TuningSpec,
    priority: int,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """A new PENDING job, or the job an earlier request with the same Idempotency-Key created (created=False).

    The same key with a different spec is a Conflict: a retry must be the same request.
    """
    spec_dict = spec.to_dict()
    digest = request_hash(spec_dict)
    if idempotency_key:
        existing = session.scalar(
            select(Job).where(Job.team == principal.team, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.spec_hash != digest:
                raise Conflict("Idempotency-Key was already used for a different spec")
            return existing, False
    dist = spec.distributed
    job = Job(
        id=new_job_id(spec.name),
        team=principal.team,
        name=spec.name,
        spec=spec_dict,
        spec_hash=digest,
        state=JobState.PENDING,
        priority=priority,
        gpus=dist.num_workers * dist.gpus_per_worker,
        gpu_pool=dist.gpu_pool,
        idempotency_key=idempotency_key,
        attempts=[],  # known empty: no lazy load when the response counts them
    )
    session.add(job)
    session.add(
        JobEvent(job=job, kind="state", to_state=JobState.PENDING, actor=principal.actor, message="submitted")
    )
    session.flush()
    return job, True


def get_job(session: Session, principal: Principal, job_id: str, lock: bool = False) -> Job:
    """A job the principal may see; another team's job is NotFound, exactly like a missing one."""
    query = select(Job).where(Job.id == job_id)
    if not principal.is_admin:
        query = query.where(Job.team == principal.team)
    if lock:
        query = query.with_for_update()
    job = session.scalar(query)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    principal: Principal,
    states: list[str] | None = None,
    name: str | None = None,
    team: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Job]:
    # Attempts in one extra query for the whole page (not one per row); specs are not listed, so not loaded.
    query = (
        select(Job)
        .options(selectinload(Job.attempts), defer(Job.spec))
        .order_by(Job.created_at.desc(), Job.id)
    )
    if not principal.is_admin:
        query = query.where(Job.team == principal.team)
    elif team:
        query = query.where(Job.team == team)
    if states:
        query = query.where(Job.state.in_(states))
    if name:
        query = query.where(Job.name == name)
    return list(session.scalars(query.limit(limit).offset(offset)))


def list_events(session: Session, principal: Principal, job_id: str) -> list[JobEvent]:
    return list(get_job(session, principal, job_id).events)


def transition(session: Session, job: Job, new: JobState, actor: str, message: str = "") -> None:
    """The one place a job changes state: checks the move, stamps times, records the event."""
    current = JobState(job.state)
    check(current, new)
    now = utcnow()
    job.state = new
    job.message = message
    if new == JobState.SUBMITTED:
        job.submitted_at = now
    elif new == JobState.RUNNING:
        job.started_at = now
    if new in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        job.finished_at = now
    session.add(
        JobEvent(job=job, kind="state", from_state=current, to_state=new, actor=actor, message=message)
    )


def note(session: Session, job: Job, actor: str, message: str, kind: str = "info") -> None:
    session.add(JobEvent(job=job, kind=kind, actor=actor, message=message))


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """Waiting jobs are cancelled at once; submitted or running ones are stopped by the reconciler."""
    job = get_job(session, principal, job_id, lock=True)
    state = JobState(job.state)
    if state in WAITING:
        transition(session, job, JobState.CANCELLED, principal.actor, "cancelled before it ran")
    elif state in (JobState.SUBMITTED, JobState.RUNNING) and not job.cancel_requested:
        job.cancel_requested = True
        note(session, job, principal.actor, "cancel requested")
    return job


def deadline_passed(job: Job, max_duration_s: int, now: datetime) -> bool:
    start = job.submitted_at
    if start is None:
        return False
    if start.tzinfo is None:  # SQLite hands back naive datetimes
        start = start.replace(tzinfo=now.tzinfo)
    return (now - start).total_seconds() > max_duration_s
