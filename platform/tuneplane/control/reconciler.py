"""The control loop: validate new jobs, submit queued ones within quota and priority, follow what runs.

It gathers facts (the job record, the backend's status), asks `tuneplane.control.policies` what they mean, and carries
the answer out through `tuneplane.store`, the only writer of job records.

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
import time
from datetime import datetime
from functools import partial

from sqlalchemy.orm import Session

from tuneplane.backends.base import Backend, BackendJob, RunPhase
from tuneplane.config import PlatformConfig
from tuneplane.control.admission import policy_problems, reachability_problems
from tuneplane.control.policies import decide, fits_quota
from tuneplane.control.validation import ValidationPool
from tuneplane.errors import BackendError, SpecError, clip, describe
from tuneplane.spec import TuningSpec, parse_spec
from tuneplane.states import ACTIVE, JobState
from tuneplane.store import Database, Job, Usage, end_job, record_submission, transition
from tuneplane.store.jobs import (
    deadline_passed,
    handed_over,
    idle_for,
    ids_in,
    lock_job,
    lock_scheduling,
    queued_jobs,
    record_hand_over,
    set_message,
    usage_by_team,
)
from tuneplane.store.models import utcnow

log = logging.getLogger("tuneplane.control.reconciler")
_WAIT_IN_PASS_S = 2.0  # a pass waits this long for lookups it started: quick ones finish in the same pass


class Reconciler:
    def __init__(self, db: Database, backend: Backend, config: PlatformConfig):
        self.db = db
        self.backend = backend
        self.config = config
        self.actor = f"reconciler@{socket.gethostname()}:{os.getpid()}"
        self.wake = threading.Event()
        self.validations = ValidationPool(config.validation_timeout_s)
        self._takeover_s = config.validation_timeout_s + 30

    # -- the loop ---------------------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # one bad pass (database blip) must not end the loop
                log.exception("reconcile pass failed")
            self.wake.wait(self.config.reconcile_interval_s)
            self.wake.clear()
        self.validations.close()

    def watch_backend(self, stop: threading.Event) -> None:
        """Wake the loop as soon as the backend reports a change (one watch per team namespace); the
        periodic pass stays as the fallback, so a dropped watch only delays, never loses, an update."""

        def follow(namespace: str) -> None:
            while not stop.is_set():
                try:
                    for _ in self.backend.watch(namespace, timeout_seconds=60):
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
        """Data lookups of new jobs run in the background, one per team at a time; a pass starts them, records
        those that finish, and starts each team's next, for up to _WAIT_IN_PASS_S. A slow lookup never holds
        up following or scheduling, nor another team's lookups."""
        deadline = time.monotonic() + _WAIT_IN_PASS_S
        while self._start_lookups():
            finished = self.validations.collect(max(0.0, deadline - time.monotonic()))
            for job_id, problems in finished:
                self._record_lookup(job_id, problems)
            if not finished or time.monotonic() >= deadline:
                return

    def _start_lookups(self) -> bool:
        """Start a lookup for each team's oldest new job; whether any is in flight."""
        now = utcnow()
        for job_id in self._ids_in({JobState.PENDING, JobState.VALIDATING}):
            if self.validations.has(job_id):
                continue
            with self.db.session() as s:
                job = lock_job(s, job_id)
                if job is None or job.state not in (JobState.PENDING, JobState.VALIDATING):
                    continue
                if self.validations.team_busy(job.team):
                    continue
                if job.state == JobState.VALIDATING and not idle_for(job, self._takeover_s, now):
                    continue  # another replica is checking it
                if job.state == JobState.PENDING:
                    transition(s, job, JobState.VALIDATING, self.actor)
                else:  # its replica died mid-check: take it over, and say so
                    set_message(job, f"validation taken over by {self.actor}")
                self.validations.start(job.id, job.team, partial(self._problems, job.spec, job.team))
        return self.validations.in_flight()

    def _record_lookup(self, job_id: str, problems: list[tuple[str, str]]) -> None:
        with self.db.session() as s:
            job = lock_job(s, job_id, wait=True)  # another replica may be looking at it for a moment
            if job is None or job.state != JobState.VALIDATING:
                return
            if problems:
                transition(s, job, JobState.FAILED, self.actor, describe(problems))
            else:
                transition(s, job, JobState.QUEUED, self.actor, "waiting for quota")

    def _problems(self, spec_dict: dict, team: str) -> list[tuple[str, str]]:
        try:
            spec = parse_spec(spec_dict)
        except SpecError as exc:  # stored by an older version that accepted it
            return exc.problems
        problems = policy_problems(spec, team, self.config)  # the config may have changed since submit
        # Lookups are off when only the job's pods hold the storage credentials.
        if not problems and self.config.validate_data:
            problems = reachability_problems(spec, team, self.config)
        return problems

    # -- QUEUED -> SUBMITTED ----------------------------------------------------------------------------

    def schedule(self) -> None:
        """Pick the queued jobs that fit (team priority, then age, within quotas) and mark them SUBMITTED in
        one transaction under the scheduling lock; only then ask the backend to run each. A replica that dies
        in between leaves SUBMITTED jobs that still count against quota, and the next pass hands them over."""
        picked: list[str] = []
        with self.db.session() as s:
            lock_scheduling(s)
            usage = usage_by_team(s)
            running = sum(u.jobs for u in usage.values())
            capacity = self.backend.capabilities.max_concurrent_jobs
            # Only teams with room are read: a team at its quota, however many jobs it queued, holds up no one.
            full = {t.name for t in self.config.teams if not fits_quota(t.quota, *_held(usage, t.name), 0)}
            for job in queued_jobs(s, skip_teams=full):
                if capacity is not None and running >= capacity:
                    break
                team = self.config.team(job.team)
                if team is None:
                    transition(
                        s, job, JobState.FAILED, self.actor, f"team {job.team} is no longer configured"
                    )
                    continue
                held = usage.setdefault(job.team, Usage())
                if not fits_quota(team.quota, held.jobs, held.gpus, job.gpus):
                    continue
                record_submission(s, job, self.actor, self.backend.name)
                picked.append(job.id)
                held.jobs, held.gpus, running = held.jobs + 1, held.gpus + job.gpus, running + 1
        for job_id in picked:
            with self.db.session() as s:
                found = lock_job(s, job_id)
                if found is not None and found.state == JobState.SUBMITTED and not handed_over(found):
                    self._hand_over(found)

    def _hand_over(self, job: Job) -> None:
        """Ask the backend to run a SUBMITTED job (idempotent by job id); retried each pass until it accepts.
        With MLflow's authentication on, the job's experiment and model are its team's first."""
        bjob = self.backend_job(job)
        if self.config.tracking_auth:
            from tuneplane.tracking.registry import claim_names

            try:
                claim_names(self.config.tracking_uri, bjob.spec, job.team, self.config.job_artifact_root())
            except Exception as exc:  # MLflow unreachable or refusing the admin: retried, the job not started
                set_message(job, f"tracking not ready, will retry: {type(exc).__name__}: {clip(str(exc))}")
                return
        try:
            self.backend.submit(bjob)
        except BackendError as exc:
            set_message(job, f"submit failed, will retry: {exc}")
            return
        record_hand_over(job)

    # -- SUBMITTED/RUNNING -> RUNNING | SUCCEEDED | FAILED | CANCELLED -----------------------------------

    def follow_active(self) -> None:
        now = utcnow()
        for job_id in self._ids_in(ACTIVE):
            with self.db.session() as s:
                job = lock_job(s, job_id)
                if job is None or job.state not in ACTIVE:
                    continue
                try:
                    self._follow(s, job, now)
                except BackendError as exc:
                    set_message(job, f"backend unreachable, will retry: {exc}")

    def _follow(self, s: Session, job: Job, now: datetime) -> None:
        if not handed_over(job):  # its replica died between recording and submitting, or the backend refused
            if job.cancel_requested:
                end_job(
                    s, job, JobState.CANCELLED, self.actor, "cancelled before it was handed to the backend"
                )
            else:
                self._hand_over(job)
            return
        bjob = self.backend_job(job)
        limit = self.config.max_job_duration_s
        overdue = deadline_passed(job, limit, now)
        if job.cancel_requested or overdue:
            self.backend.cancel(bjob)  # repeated each pass until the backend reports it gone
        status = self.backend.status(bjob)
        outcome = decide(JobState(job.state), status, job.cancel_requested, overdue, limit)
        if outcome.state is None:
            return
        if outcome.state == JobState.RUNNING:
            transition(s, job, outcome.state, self.actor, outcome.message)
            return
        model_uri, note = self._publication(job.id) if status.phase == RunPhase.SUCCEEDED else (None, "")
        message = f"{outcome.message}: {model_uri}" if model_uri else outcome.message + note
        end_job(s, job, outcome.state, self.actor, message, model_uri)

    # -- helpers -----------------------------------------------------------------------------------------

    def _ids_in(self, states: frozenset[JobState] | set[JobState]) -> list[str]:
        with self.db.session(readonly=True) as s:
            return ids_in(s, states)

    def backend_job(self, job: Job) -> BackendJob:
        team = self.config.team(job.team)
        namespace = team.namespace if team else job.team
        return BackendJob(
            id=job.id, team=job.team, namespace=namespace, spec=TuningSpec.model_validate(job.spec),
            gpu_pool=job.gpu_pool,
        )  # fmt: skip

    def _publication(self, job_id: str) -> tuple[str | None, str]:
        """The registered model of a job that succeeded, or why there is none when its gate said no (a note
        for the end message). MLflow down: neither, the job still succeeded."""
        try:
            from tuneplane.tracking.registry import gate_verdict, model_versions

            versions = model_versions(self.config.tracking_uri, {job_id})
            if versions:
                return versions[-1]["uri"], ""
            verdict = gate_verdict(self.config.tracking_uri, job_id)
        except Exception as exc:
            log.warning("cannot read the registry for %s: %s", job_id, exc)
            return None, ""
        if verdict is None or verdict["passed"]:
            return None, ""
        return None, clip(", not registered: gate failed: " + "; ".join(verdict["failures"]), 1000)


def _held(usage: dict[str, Usage], team: str) -> tuple[int, int]:
    held = usage.get(team, Usage())
    return held.jobs, held.gpus
