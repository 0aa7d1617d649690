"""The control loop: validate new jobs, submit queued ones within quota and priority, follow what runs.

Safe to run in every API replica at once. Each job is handled under its row lock (PostgreSQL: FOR UPDATE
SKIP LOCKED, so replicas share the work); scheduling takes one advisory lock so quota is counted once; and
`Backend.submit` is idempotent by job id, so a replica that dies between submitting and recording leaves a job
that the next pass submits again without starting it twice. All state lives in the database and the backend:
a restarted API picks up exactly where the last one stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import defaultdict
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from tuneplane.backends.base import Backend, BackendError, BackendJob, RunPhase
from tuneplane.config import PlatformConfig
from tuneplane.spec import SpecError, TuningSpec, parse_spec
from tuneplane.store import Database, Job, JobState
from tuneplane.store.jobs import deadline_passed, transition
from tuneplane.store.models import Attempt, utcnow
from tuneplane.store.states import ACTIVE

log = logging.getLogger("tuneplane.reconciler")
_SCHEDULE_LOCK = 0x7475_6E65  # "tune": the PostgreSQL advisory lock that serialises scheduling


class Reconciler:
    def __init__(self, db: Database, backend: Backend, config: PlatformConfig):
        self.db = db
        self.backend = backend
        self.config = config
        self.actor = f"reconciler@{socket.gethostname()}:{os.getpid()}"
        self.wake = threading.Event()

    # -- the loop ---------------------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # one bad pass (database blip) must not end the loop
                log.exception("reconcile pass failed")
            self.wake.wait(self.config.reconcile_interval_s)
            self.wake.clear()

    def watch_backend(self, stop: threading.Event) -> None:
        """Wake the loop as soon as the backend reports a change (a KubeRay watch per team namespace); the
        periodic pass stays as the fallback, so a dropped watch only delays, never loses, an update."""
        watch = getattr(self.backend, "watch", None)
        if watch is None:
            return

        def follow(namespace: str) -> None:
            while not stop.is_set():
                try:
                    for _ in watch(namespace, timeout_seconds=60):
                        self.wake.set()
                        if stop.is_set():
                            return
                except Exception as exc:  # the API server went away: retry after a pause
                    log.warning("watch of %s ended: %s", namespace, exc)
                    stop.wait(5)

        for namespace in sorted({t.namespace for t in self.config.teams}):
            threading.Thread(target=follow, args=(namespace,), name=f"watch-{namespace}", daemon=True).start()

    def run_once(self) -> None:
        self.validate_new()
        self.follow_active()
        self.schedule()

    # -- PENDING -> VALIDATING -> QUEUED | FAILED --------------------------------------------------------

    def validate_new(self) -> None:
        for job_id in self._ids_in(JobState.PENDING, JobState.VALIDATING):
            with self.db.session() as s:
                job = self._lock(s, job_id)
                if job is None or job.state not in (JobState.PENDING, JobState.VALIDATING):
                    continue
                if job.state == JobState.PENDING:
                    transition(s, job, JobState.VALIDATING, self.actor)
                spec_dict = job.spec
            # Slow I/O: outside any transaction. Off when only the job's pods hold the storage credentials.
            problem = check_reachable(spec_dict) if self.config.validate_data else None
            with self.db.session() as s:
                job = self._lock(s, job_id)
                if job is None or job.state != JobState.VALIDATING:
                    continue
                if problem:
                    transition(s, job, JobState.FAILED, self.actor, problem)
                else:
                    transition(s, job, JobState.QUEUED, self.actor, "waiting for quota")

    # -- QUEUED -> SUBMITTED ----------------------------------------------------------------------------

    def schedule(self) -> None:
        with self.db.session() as s:
            if not self.db.is_sqlite:
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEDULE_LOCK})
            jobs_by_team: dict[str, int] = defaultdict(int)
            gpus_by_team: dict[str, int] = defaultdict(int)
            for team_name, count, gpus in s.execute(
                select(Job.team, func.count(), func.coalesce(func.sum(Job.gpus), 0))
                .where(Job.state.in_(list(ACTIVE)))
                .group_by(Job.team)
            ):
                jobs_by_team[team_name], gpus_by_team[team_name] = count, gpus
            running = sum(jobs_by_team.values())
            capacity = self.config.local.max_concurrent_jobs if self.backend.name == "local" else None
            queued = s.scalars(
                select(Job)
                .where(Job.state == JobState.QUEUED)
                .order_by(Job.priority.desc(), Job.created_at, Job.id)
                .with_for_update(skip_locked=True)
                .limit(200)
            )
            for job in queued:
                if capacity is not None and running >= capacity:
                    break
                team = self.config.team(job.team)
                if team is None:
                    transition(
                        s, job, JobState.FAILED, self.actor, f"team {job.team} is no longer configured"
                    )
                    continue
                if jobs_by_team[job.team] + 1 > team.quota.max_concurrent_jobs:
                    continue
                if gpus_by_team[job.team] + job.gpus > team.quota.max_gpus:
                    continue
                try:
                    self.backend.submit(self.backend_job(job))
                except BackendError as exc:
                    job.message = f"submit failed, will retry: {exc}"
                    continue
                transition(s, job, JobState.SUBMITTED, self.actor, f"submitted to {self.backend.name}")
                s.add(Attempt(job=job, number=len(job.attempts) + 1, backend=self.backend.name))
                jobs_by_team[job.team] += 1
                gpus_by_team[job.team] += job.gpus
                running += 1

    # -- SUBMITTED/RUNNING -> RUNNING | SUCCEEDED | FAILED | CANCELLED -----------------------------------

    def follow_active(self) -> None:
        now = utcnow()
        for job_id in self._ids_in(*ACTIVE):
            with self.db.session() as s:
                job = self._lock(s, job_id)
                if job is None or job.state not in ACTIVE:
                    continue
                try:
                    self._follow(s, job, now)
                except BackendError as exc:
                    job.message = f"backend unreachable, will retry: {exc}"

    def _follow(self, s: Session, job: Job, now: datetime) -> None:
        bjob = self.backend_job(job)
        overdue = deadline_passed(job, self.config.max_job_duration_s, now)
        if job.cancel_requested or overdue:
            self.backend.cancel(bjob)  # repeated each pass until the backend reports it gone
        status = self.backend.status(bjob)
        phase = status.phase
        if phase in (RunPhase.PENDING, RunPhase.RUNNING) and not (job.cancel_requested or overdue):
            if phase == RunPhase.RUNNING and job.state == JobState.SUBMITTED:
                transition(s, job, JobState.RUNNING, self.actor, "running")
            return
        if phase == RunPhase.SUCCEEDED:
            job.model_uri = self._model_uri(job.id)
            self._end(
                s, job, JobState.SUCCEEDED, "succeeded" + (f": {job.model_uri}" if job.model_uri else "")
            )
        elif job.cancel_requested and phase in (RunPhase.STOPPED, RunPhase.MISSING, RunPhase.FAILED):
            self._end(s, job, JobState.CANCELLED, "cancelled")
        elif overdue and phase in (RunPhase.STOPPED, RunPhase.MISSING, RunPhase.FAILED):
            limit = self.config.max_job_duration_s
            self._end(s, job, JobState.FAILED, f"ran longer than max_job_duration_s ({limit} s); stopped")
        elif phase == RunPhase.FAILED:
            self._end(s, job, JobState.FAILED, status.message or "failed")
        elif phase == RunPhase.STOPPED:
            self._end(s, job, JobState.CANCELLED, status.message or "stopped outside Tuneplane")
        elif phase == RunPhase.MISSING:
            self._end(s, job, JobState.FAILED, f"the {self.backend.name} backend has no record of this job")

    def _end(self, s: Session, job: Job, state: JobState, message: str) -> None:
        transition(s, job, state, self.actor, message)
        if job.attempts:
            attempt = job.attempts[-1]
            attempt.ended_at, attempt.outcome, attempt.message = utcnow(), state.value, message

    # -- helpers -----------------------------------------------------------------------------------------

    def _ids_in(self, *states: JobState) -> list[str]:
        with self.db.session(readonly=True) as s:
            return list(s.scalars(select(Job.id).where(Job.state.in_(list(states))).order_by(Job.created_at)))

    def _lock(self, s: Session, job_id: str) -> Job | None:
        """The job under its row lock, or None when another replica holds it (it will handle it)."""
        return s.scalar(select(Job).where(Job.id == job_id).with_for_update(skip_locked=True))

    def backend_job(self, job: Job) -> BackendJob:
        team = self.config.team(job.team)
        namespace = team.namespace if team else job.team
        return BackendJob(
            id=job.id, team=job.team, namespace=namespace, spec=TuningSpec.model_validate(job.spec),
            gpu_pool=job.gpu_pool,
        )  # fmt: skip

    def _model_uri(self, job_id: str) -> str | None:
        try:
            from tuneplane.tracking import model_versions

            versions = model_versions(self.config.tracking_uri, {job_id})
        except Exception as exc:  # MLflow down: the job still succeeded
            log.warning("cannot read the registry for %s: %s", job_id, exc)
            return None
        return versions[-1]["uri"] if versions else None


def check_reachable(spec_dict: dict) -> str | None:
    """A problem naming the field when the spec's data or model cannot be found, else None."""
    from tuneplane.data.records import DataError, expand
    from tuneplane.spec import is_local_path

    try:
        spec = parse_spec(spec_dict)
    except SpecError as exc:
        return str(exc)
    for field, source in spec.source_fields():
        try:
            expand(source.uri)
        except DataError as exc:
            return f"{field}.uri: {exc}"
        except Exception as exc:  # the storage client's own errors (credentials, network)
            return f"{field}.uri: {source.uri}: cannot list: {type(exc).__name__}: {exc}"
    base = spec.model.base
    if is_local_path(base) and base.startswith(("/", "~")) and not os.path.isdir(os.path.expanduser(base)):
        return f"model.base: {base}: no such folder"
    return None
