"""HTTP routes: thin. Admission is `tuneplane.control.admission`, records are `tuneplane.store`, metrics and models are
read from MLflow by `tuneplane.tracking`; what a route may use comes from `api.deps`."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Body, Header, Query, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuneplane.api.deps import BackendDep, Caller, ConfigDep, DatabaseDep, LimitsDep, ReconcilerDep
from tuneplane.api.dryrun import dry_run, report
from tuneplane.api.limits import Limits
from tuneplane.api.problems import Problem
from tuneplane.api.schemas import (
    CallerOut,
    EventOut,
    JobDetail,
    JobList,
    JobMetrics,
    JobOut,
    ModelVersionOut,
    QuotaUse,
    UsageOut,
    ValidationReport,
    problem_responses,
)
from tuneplane.backends import BackendJob
from tuneplane.config import PlatformConfig
from tuneplane.control.admission import JobLookup, admit
from tuneplane.control.policies import queue_places
from tuneplane.errors import SpecError
from tuneplane.spec import json_schema
from tuneplane.states import JobState
from tuneplane.store import (
    Database,
    Principal,
    cancel_job,
    create_job,
    get_job,
    list_events,
    list_jobs,
    queue_in_order,
    team_usage,
)

router = APIRouter(prefix="/v1", responses=problem_responses(401, 404, 409, 413, 422, 429, 503))
SpecBody = Annotated[
    dict[str, Any],
    Body(description="A tuning spec (see the TuningSpec schema)."),
]
Listed = TypeVar("Listed", bound=JobOut)
_SPEC_SCHEMA = {"requestBody": {"content": {"application/json": {"schema": json_schema()}}, "required": True}}


@router.post("/jobs", status_code=201, response_model=JobOut, openapi_extra=_SPEC_SCHEMA)
def submit_job(
    response: Response,
    spec: SpecBody,
    caller: Caller,
    config: ConfigDep,
    db: DatabaseDep,
    reconciler: ReconcilerDep,
    backend: BackendDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    """Submit a tuning job. A retry with the same `Idempotency-Key` returns the first job (200)."""
    admitted = admit(spec, caller, config, _jobs_seen_by(db, caller))
    team = config.team(caller.team)
    assert team is not None  # admit() refuses callers of unknown teams
    with db.session() as s:
        job, created = create_job(
            s, caller, admitted, team.priority, idempotency_key, max_waiting=team.quota.max_waiting_jobs,
            max_id_length=backend.capabilities.max_job_id_length,
        )  # fmt: skip
        out = JobOut.model_validate(job)
    if created:
        reconciler.wake.set()
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{out.id}"
    return out


def _jobs_seen_by(db: Database, caller: Principal) -> JobLookup:
    """Admission's view of the caller's jobs (`model.adapter: <job id>`): state and registered version."""

    def find(job_id: str) -> tuple[str, str | None]:
        with db.session(readonly=True) as s:
            found = get_job(s, caller, job_id)
            return found.state, found.model_uri

    return find


@router.get("/jobs", response_model=JobList)
def jobs(
    caller: Caller,
    db: DatabaseDep,
    config: ConfigDep,
    state: Annotated[list[JobState] | None, Query()] = None,
    name: Annotated[str | None, Query(max_length=63)] = None,
    team: Annotated[str | None, Query(max_length=63, description="Admins only.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobList:
    with db.session(readonly=True) as s:
        found = list_jobs(s, caller, [x.value for x in state or []], name, team, limit + 1, offset)
        items = _placed(s, config, [JobOut.model_validate(j) for j in found[:limit]])
    return JobList(items=items, next_offset=offset + limit if len(found) > limit else None)


@router.get("/jobs/{job_id}", response_model=JobDetail)
def job(job_id: str, caller: Caller, db: DatabaseDep, config: ConfigDep) -> JobDetail:
    with db.session(readonly=True) as s:
        return _placed(s, config, [JobDetail.model_validate(get_job(s, caller, job_id))])[0]


def _placed(session: Any, config: PlatformConfig, jobs: list[Listed]) -> list[Listed]:
    """Queued jobs with their place in the queue (only jobs that can ever start count)."""
    if not any(j.state == JobState.QUEUED for j in jobs):
        return jobs
    places = queue_places(queue_in_order(session), {t.name: t.quota for t in config.teams})
    return [j.model_copy(update={"queue_position": places.get(j.id)}) for j in jobs]


@router.get("/me", response_model=CallerOut)
def me(caller: Caller) -> CallerOut:
    """The team and role of the calling token (what a console shows after sign-in)."""
    return CallerOut(team=caller.team, role="admin" if caller.is_admin else "member")


@router.get("/usage", response_model=UsageOut)
def usage(
    caller: Caller,
    db: DatabaseDep,
    config: ConfigDep,
    team: Annotated[str | None, Query(max_length=63, description="Admins only.")] = None,
) -> UsageOut:
    """The team's quota and what its jobs hold now (admins: any team's)."""
    name = team if caller.is_admin and team else caller.team
    found = config.team(name)
    if found is None:
        raise Problem(404, "not found", f"team {name} is not configured")
    with db.session(readonly=True) as s:
        held, waiting = team_usage(s, name)
    quota = found.quota
    return UsageOut(
        team=name,
        jobs=QuotaUse(in_use=held.jobs, allowed=quota.max_concurrent_jobs),
        gpus=QuotaUse(in_use=held.gpus, allowed=quota.max_gpus),
        waiting=QuotaUse(in_use=waiting, allowed=quota.max_waiting_jobs),
    )


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel(job_id: str, caller: Caller, db: DatabaseDep, reconciler: ReconcilerDep) -> JobOut:
    with db.session() as s:
        out = JobOut.model_validate(cancel_job(s, caller, job_id))
    reconciler.wake.set()
    return out


@router.get("/jobs/{job_id}/events", response_model=list[EventOut])
def events(job_id: str, caller: Caller, db: DatabaseDep) -> list[EventOut]:
    with db.session(readonly=True) as s:
        return [EventOut.model_validate(e) for e in list_events(s, caller, job_id)]


@router.get("/jobs/{job_id}/logs", response_class=StreamingResponse)
async def logs(
    job_id: str,
    caller: Caller,
    db: DatabaseDep,
    backend: BackendDep,
    reconciler: ReconcilerDep,
    limits: LimitsDep,
    follow: bool = False,
    tail: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> StreamingResponse:
    """The training log as text; with `follow`, streamed until the job ends (at most
    `limits.log_streams_per_team` followed at once per team). Waits on the event loop, reads on stream
    threads: a followed log holds none of the threads quick requests run on."""

    def find() -> BackendJob:
        with db.session(readonly=True) as s:
            return reconciler.backend_job(get_job(s, caller, job_id))

    bjob = await run_in_threadpool(find)
    # 429 now, before the answer starts; given back when the stream ends or its client goes.
    release = limits.log_streams.acquire(caller.team, retry_after_s=30) if follow else (lambda: None)

    async def lines() -> AsyncIterator[str]:
        try:
            skip = 0
            if tail:
                skip = max(0, await _read(limits, lambda: sum(1 for _ in backend.logs(bjob))) - tail)
            source = backend.logs(bjob, follow=follow)
            index = 0
            while (line := await _read(limits, next, source, None)) is not None:
                if line:  # "" is a follower's heartbeat: nothing new yet
                    index += 1
                    if index > skip:
                        yield line
        finally:
            release()

    body = lines()
    weakref.finalize(body, release)  # a stream dropped before its first line never runs its `finally`
    return StreamingResponse(body, media_type="text/plain; charset=utf-8")


async def _read(limits: Limits, fn: Callable[..., Any], *args: Any) -> Any:
    """One blocking step of a log stream on the stream threads; a dropped client does not wait for it."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=limits.stream, abandon_on_cancel=True)


@router.get("/jobs/{job_id}/metrics", response_model=JobMetrics)
def metrics(
    job_id: str, caller: Caller, db: DatabaseDep, config: ConfigDep, history: bool = True
) -> JobMetrics:
    """Training metrics from MLflow: latest values, series, and progress (step of max_steps)."""
    from tuneplane.tracking.registry import job_metrics

    with db.session(readonly=True) as s:
        found = get_job(s, caller, job_id)
        state, max_steps = found.state, found.spec.get("hyperparameters", {}).get("max_steps")
    try:
        m = job_metrics(config.tracking_uri, job_id, history=history)
    except Exception as exc:
        raise Problem(
            503, "tracking unavailable", f"MLflow could not be read: {type(exc).__name__}"
        ) from None
    return JobMetrics(
        job_id=job_id, state=JobState(state), run_id=m["run_id"], run_status=m["status"], step=m["step"],
        max_steps=max_steps, latest=m["latest"], history=m["history"],
    )  # fmt: skip


@router.post("/validate", response_model=ValidationReport, openapi_extra=_SPEC_SCHEMA)
async def validate(
    spec: SpecBody,
    caller: Caller,
    config: ConfigDep,
    db: DatabaseDep,
    limits: LimitsDep,
    max_records: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> ValidationReport:
    """Dry run: the spec, the team's policy and a bounded data preflight. Creates nothing. At most
    `limits.validations_per_team` at once and `limits.validations_per_minute` a minute per team (429)."""
    # One of the team's slots, given back when its work is done (not when a client that left is gone).
    release = limits.validations.acquire(caller.team, retry_after_s=5)
    try:
        limits.validation_rate.take(caller.team)
        # Off the event loop and off the threads quick requests use.
        admitted = await anyio.to_thread.run_sync(
            admit, spec, caller, config, _jobs_seen_by(db, caller), limiter=limits.heavy
        )
    except SpecError as exc:
        release()
        return report(False, spec, exc.problems)
    except BaseException:
        release()
        raise
    # The data preflight reads and tokenizes for up to its budget: in a process of its own (dryrun.py).
    return await limits.run_dry(release, dry_run, admitted, caller.team, config, max_records)


@router.get("/models", response_model=list[ModelVersionOut])
def models(caller: Caller, db: DatabaseDep, config: ConfigDep) -> list[ModelVersionOut]:
    """Registered adapters published by the caller's team's jobs (all teams for an admin)."""
    from tuneplane.tracking.registry import model_versions

    job_ids: set[str] | None = None
    if not caller.is_admin:
        with db.session(readonly=True) as s:
            job_ids = {j.id for j in list_jobs(s, caller, [JobState.SUCCEEDED], limit=100_000)}
    try:
        versions = model_versions(config.tracking_uri, job_ids)
    except Exception as exc:
        raise Problem(
            503, "tracking unavailable", f"MLflow could not be read: {type(exc).__name__}"
        ) from None
    return [ModelVersionOut(**v) for v in versions]
