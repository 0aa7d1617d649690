"""Operations on job records: the only code that writes a job's state, its events and its attempts, and the
only SQL the routes and the reconciler run."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, selectinload

from tuneplane.errors import Conflict, NotFound, QuotaExceeded
from tuneplane.spec import TuningSpec, spec_hash
from tuneplane.states import ACTIVE, TERMINAL, WAITING, JobState, check
from tuneplane.store.models import ID_LENGTH, Attempt, Job, JobEvent, utcnow

_SCHEDULE_LOCK = 0x7475_6E65  # "tune": the PostgreSQL advisory lock that serialises scheduling


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


@dataclass
class Usage:
    """What a team's submitted and running jobs hold: counted against its quota."""

    jobs: int = 0
    gpus: int = 0


def new_job_id(name: str, max_length: int) -> str:
    """`<the spec's name, cut to fit>-<8 hex digits>`, at most `max_length` characters: the id names the
    backend's objects (a RayJob, the Ray Train run), and each backend says how long a name it takes."""
    return f"{name[: max_length - 9].rstrip('-')}-{secrets.token_hex(4)}"


# -- the API's side -------------------------------------------------------------------------------------------


def create_job(
    session: Session,
    principal: Principal,
    spec: TuningSpec,
    priority: int,
    idempotency_key: str | None = None,
    max_waiting: int | None = None,
    max_id_length: int = ID_LENGTH,
) -> tuple[Job, bool]:
    """A new PENDING job, or the job an earlier request with the same Idempotency-Key created (created=False).
    Its id is at most `max_id_length` characters (the backend's limit, `Capabilities.max_job_id_length`).

    The same key with a different spec is a Conflict: a retry must be the same request. A team that already
    has `max_waiting` jobs waiting gets QuotaExceeded instead of a new one.
    """
    digest = spec_hash(spec)
    if idempotency_key and (existing := _by_key(session, principal.team, idempotency_key, digest)):
        return existing, False
    if max_waiting is not None and count_waiting(session, principal.team) >= max_waiting:
        raise QuotaExceeded(
            f"team {principal.team} has {max_waiting} jobs waiting, its limit; cancel some or wait for them to start"
        )
    dist = spec.distributed
    job = Job(
        id=new_job_id(spec.name, max_id_length),
        team=principal.team,
        name=spec.name,
        spec=spec.to_dict(),
        spec_hash=digest,
        state=JobState.PENDING,
        priority=priority,
        gpus=dist.num_workers * dist.gpus_per_worker,
        gpu_pool=dist.gpu_pool,
        idempotency_key=idempotency_key,
        attempts=[],  # known empty: no lazy load when the response counts them
    )
    try:
        with session.begin_nested():  # a savepoint: a lost race on the key undoes only this insert
            session.add(job)
            session.add(
                JobEvent(
                    job=job,
                    kind="state",
                    to_state=JobState.PENDING,
                    actor=principal.actor,
                    message="submitted",
                )
            )
            session.flush()
    except IntegrityError:
        # Another request with the same Idempotency-Key got there first (the database's unique index is the
        # arbiter, not the lookup above): answer as that request's retry, never with a 500.
        existing = _by_key(session, principal.team, idempotency_key or "", digest)
        if existing is None:
            raise Conflict("Idempotency-Key was already used") from None
        return existing, False
    return job, True


def _by_key(session: Session, team: str, key: str, digest: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key created; Conflict if it was for another spec."""
    existing = session.scalar(select(Job).where(Job.team == team, Job.idempotency_key == key))
    if existing is not None and existing.spec_hash != digest:
        raise Conflict("Idempotency-Key was already used for a different spec")
    return existing


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


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """Waiting jobs are cancelled at once; submitted or running ones are stopped by the reconciler. A job that
    already ended otherwise is a Conflict."""
    job = get_job(session, principal, job_id, lock=True)
    state = JobState(job.state)
    if state in WAITING:
        transition(session, job, JobState.CANCELLED, principal.actor, "cancelled before it ran")
    elif state in ACTIVE and not job.cancel_requested:
        job.cancel_requested = True
        session.add(JobEvent(job=job, kind="info", actor=principal.actor, message="cancel requested"))
    elif state in TERMINAL and state != JobState.CANCELLED:
        raise Conflict(f"job {job_id} already ended: {state}")
    return job


# -- the reconciler's side ------------------------------------------------------------------------------------


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
    if new in TERMINAL:
        job.finished_at = now
    session.add(
        JobEvent(job=job, kind="state", from_state=current, to_state=new, actor=actor, message=message)
    )


def record_submission(session: Session, job: Job, actor: str, backend: str) -> None:
    """QUEUED -> SUBMITTED, with a new attempt on `backend` not yet handed over. Committed before the backend
    is asked, so the job counts against its team's quota from then on, whatever happens to this replica."""
    transition(session, job, JobState.SUBMITTED, actor, f"submitting to {backend}")
    job.attempts.append(Attempt(number=len(job.attempts) + 1, backend=backend))


def handed_over(job: Job) -> bool:
    """Whether the backend has accepted the job's current attempt."""
    return bool(job.attempts) and job.attempts[-1].handed_over_at is not None


def record_hand_over(job: Job) -> None:
    attempt = job.attempts[-1]
    attempt.handed_over_at = utcnow()
    set_message(job, f"submitted to {attempt.backend}")


def end_job(
    session: Session, job: Job, state: JobState, actor: str, message: str, model_uri: str | None = None
) -> None:
    """A terminal state for the job and its current attempt."""
    if model_uri:
        job.model_uri = model_uri
    transition(session, job, state, actor, message)
    if job.attempts:
        attempt = job.attempts[-1]
        attempt.ended_at, attempt.outcome, attempt.message = utcnow(), state.value, message


def set_message(job: Job, message: str) -> None:
    """A note on the job's current state (a retry pending), without an event: it is replaced, not kept."""
    job.message = message


def ids_in(session: Session, states: frozenset[JobState] | set[JobState]) -> list[str]:
    """Ids of the jobs in `states`, oldest first."""
    return list(session.scalars(select(Job.id).where(Job.state.in_(list(states))).order_by(Job.created_at)))


def lock_job(session: Session, job_id: str, wait: bool = False) -> Job | None:
    """The job under its row lock, or None when another replica holds it (it will handle it). With `wait`,
    the lock is waited for: the caller holds a result only it can record."""
    return session.scalar(select(Job).where(Job.id == job_id).with_for_update(skip_locked=not wait))


def lock_scheduling(session: Session) -> None:
    """Serialise scheduling across replicas for this transaction (PostgreSQL; SQLite writers are serial)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEDULE_LOCK})


def usage_by_team(session: Session) -> dict[str, Usage]:
    """Jobs and GPUs each team's submitted and running jobs hold."""
    rows = session.execute(
        select(Job.team, func.count(), func.coalesce(func.sum(Job.gpus), 0))
        .where(Job.state.in_(list(ACTIVE)))
        .group_by(Job.team)
    )
    return {team: Usage(jobs, gpus) for team, jobs, gpus in rows}


def queued_jobs(session: Session, skip_teams: Collection[str] = (), per_team: int = 50) -> list[Job]:
    """Queued jobs under their row locks, in scheduling order (team priority, then age): the oldest `per_team`
    of each team not in `skip_teams`, so that no team's backlog hides another team's jobs."""
    teams = session.scalars(select(Job.team).where(Job.state == JobState.QUEUED).distinct())
    jobs: list[Job] = []
    for team in sorted(set(teams) - set(skip_teams)):
        jobs += session.scalars(
            select(Job)
            .where(Job.state == JobState.QUEUED, Job.team == team)
            .order_by(Job.created_at, Job.id)
            .with_for_update(skip_locked=True)
            .limit(per_team)
        )
    return sorted(jobs, key=_scheduling_order)


def _scheduling_order(job: Any) -> tuple[int, datetime, str]:
    """The order queued jobs are handed to the backend in: team priority, then age."""
    return (-job.priority, _naive(job.created_at), job.id)


def queue_in_order(session: Session) -> list[tuple[str, str, int]]:
    """Every queued job as (id, team, GPUs), in scheduling order over every team (`policies.queue_places`)."""
    rows = session.execute(
        select(Job.id, Job.team, Job.gpus, Job.priority, Job.created_at).where(Job.state == JobState.QUEUED)
    )
    return [(row.id, row.team, row.gpus) for row in sorted(rows, key=_scheduling_order)]


def team_usage(session: Session, team: str) -> tuple[Usage, int]:
    """What the team's submitted and running jobs hold, and how many of its jobs wait."""
    return usage_by_team(session).get(team, Usage()), count_waiting(session, team)


def count_waiting(session: Session, team: str) -> int:
    """The team's jobs not yet handed to a backend (pending, validating, queued)."""
    query = select(func.count()).where(Job.team == team, Job.state.in_(list(WAITING)))
    return int(session.scalar(query) or 0)


def _naive(value: datetime) -> datetime:
    return value.replace(tzinfo=None) if value.tzinfo else value


def deadline_passed(job: Job, max_duration_s: float, now: datetime) -> bool:
    """Submitted longer than `max_duration_s` ago."""
    return _seconds_since(job.submitted_at, now) > max_duration_s


def idle_for(job: Job, seconds: float, now: datetime) -> bool:
    """The job's record unchanged for longer than `seconds`."""
    return _seconds_since(job.updated_at, now) > seconds


def _seconds_since(start: datetime | None, now: datetime) -> float:
    if start is None:
        return 0.0
    if start.tzinfo is None:  # SQLite hands back naive datetimes
        start = start.replace(tzinfo=now.tzinfo)
    return (now - start).total_seconds()
