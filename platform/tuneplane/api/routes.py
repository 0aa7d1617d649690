"""HTTP routes: thin; the work is in `tuneplane.store`, `api.services` and the reconciler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuneplane.api import services
from tuneplane.api.auth import current_principal
from tuneplane.api.problems import Problem, spec_problem
from tuneplane.api.schemas import (
    EventOut,
    JobList,
    JobMetrics,
    JobOut,
    ModelVersionOut,
    ValidationReport,
    problem_responses,
)
from tuneplane.spec import SpecError, json_schema
from tuneplane.store import (
    TERMINAL,
    JobState,
    Principal,
    cancel_job,
    create_job,
    get_job,
    list_events,
    list_jobs,
)
from tuneplane.store.models import Job

router = APIRouter(prefix="/v1", responses=problem_responses(401, 404, 409, 413, 422, 503))
Caller = Annotated[Principal, Depends(current_principal)]
SpecBody = Annotated[
    dict[str, Any],
    Body(description="A tuning spec (see the TuningSpec schema)."),
]
_SPEC_SCHEMA = {"requestBody": {"content": {"application/json": {"schema": json_schema()}}, "required": True}}


def _state(request: Request) -> Any:
    return request.app.state


@router.post("/jobs", status_code=201, response_model=JobOut, openapi_extra=_SPEC_SCHEMA)
def submit_job(
    request: Request,
    response: Response,
    spec: SpecBody,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    """Submit a tuning job. A retry with the same `Idempotency-Key` returns the first job (200)."""
    app = _state(request)
    admitted = services.admit(spec, caller, app.config)
    team = app.config.team(caller.team)
    with app.db.session() as s:
        job, created = create_job(s, caller, admitted, team.priority, idempotency_key)
        out = JobOut.of(job)
    if created:
        app.reconciler.wake.set()
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{out.id}"
    return out


@router.get("/jobs", response_model=JobList)
def jobs(
    request: Request,
    caller: Caller,
    state: Annotated[list[JobState] | None, Query()] = None,
    name: Annotated[str | None, Query(max_length=63)] = None,
    team: Annotated[str | None, Query(max_length=63, description="Admins only.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobList:
    with _state(request).db.session(readonly=True) as s:
        found = list_jobs(s, caller, [x.value for x in state or []], name, team, limit + 1, offset)
        items = [JobOut.of(j) for j in found[:limit]]
    return JobList(items=items, next_offset=offset + limit if len(found) > limit else None)


@router.get("/jobs/{job_id}", response_model=JobOut)
def job(request: Request, job_id: str, caller: Caller) -> JobOut:
    with _state(request).db.session(readonly=True) as s:
        return JobOut.of(get_job(s, caller, job_id), with_spec=True)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel(request: Request, job_id: str, caller: Caller) -> JobOut:
    app = _state(request)
    with app.db.session() as s:
        found = cancel_job(s, caller, job_id)
        if found.state in TERMINAL and found.state != JobState.CANCELLED:
            raise Problem(409, "conflict", f"job {job_id} already ended: {found.state}")
        out = JobOut.of(found)
    app.reconciler.wake.set()
    return out


@router.get("/jobs/{job_id}/events", response_model=list[EventOut])
def events(request: Request, job_id: str, caller: Caller) -> list[EventOut]:
    with _state(request).db.session(readonly=True) as s:
        return [EventOut.of(e) for e in list_events(s, caller, job_id)]


@router.get("/jobs/{job_id}/logs", response_class=StreamingResponse)
def logs(
    request: Request,
    job_id: str,
    caller: Caller,
    follow: bool = False,
    tail: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> StreamingResponse:
    """The training log as text; with `follow`, streamed until the job ends."""
    app = _state(request)
    with app.db.session(readonly=True) as s:
        bjob = app.reconciler.backend_job(get_job(s, caller, job_id))

    def lines() -> Iterator[str]:
        skip = max(0, sum(1 for _ in app.backend.logs(bjob)) - tail) if tail else 0
        for i, line in enumerate(app.backend.logs(bjob, follow=follow)):
            if i >= skip:
                yield line

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")


@router.get("/jobs/{job_id}/metrics", response_model=JobMetrics)
def metrics(request: Request, job_id: str, caller: Caller, history: bool = True) -> JobMetrics:
    """Training metrics from MLflow: latest values, series, and progress (step of max_steps)."""
    from tuneplane.tracking import job_metrics

    app = _state(request)
    with app.db.session(readonly=True) as s:
        found: Job = get_job(s, caller, job_id)
        state, max_steps = found.state, found.spec.get("hyperparameters", {}).get("max_steps")
    try:
        m = job_metrics(app.config.tracking_uri, job_id, history=history)
    except Exception as exc:
        raise Problem(
            503, "tracking unavailable", f"MLflow could not be read: {type(exc).__name__}"
        ) from None
    return JobMetrics(
        job_id=job_id, state=state, run_id=m["run_id"], run_status=m["status"], step=m["step"],
        max_steps=max_steps, latest=m["latest"], history=m["history"],
    )  # fmt: skip


@router.post("/validate", response_model=ValidationReport, openapi_extra=_SPEC_SCHEMA)
async def validate(
    request: Request,
    spec: SpecBody,
    caller: Caller,
    max_records: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> ValidationReport:
    """Dry run: the spec, the team's policy and a bounded data preflight. Creates nothing."""
    from tuneplane.reconciler import check_reachable

    try:
        admitted = services.admit(spec, caller, _state(request).config)
    except SpecError as exc:
        problems = spec_problem(exc).errors or []
        return ValidationReport(ok=False, spec=spec, problems=problems)
    spec_dict = admitted.to_dict()
    problem = await run_in_threadpool(check_reachable, spec_dict)
    if problem:
        field, _, message = problem.partition(": ")
        return ValidationReport(ok=False, spec=spec_dict, problems=[{"field": field, "message": message}])
    try:
        report = await run_in_threadpool(services.preflight_report, admitted, max_records)
    except Exception as exc:  # the tokenizer or data could not be read: say which
        return ValidationReport(
            ok=False, spec=spec_dict, problems=[{"field": "model", "message": f"{type(exc).__name__}: {exc}"}]
        )
    return ValidationReport(ok=bool(report.get("ok")), spec=spec_dict, problems=[], data=report)


@router.get("/models", response_model=list[ModelVersionOut])
def models(request: Request, caller: Caller) -> list[ModelVersionOut]:
    """Registered adapters published by the caller's team's jobs (all teams for an admin)."""
    from tuneplane.tracking import model_versions

    app = _state(request)
    job_ids: set[str] | None = None
    if not caller.is_admin:
        with app.db.session(readonly=True) as s:
            job_ids = {j.id for j in list_jobs(s, caller, [JobState.SUCCEEDED], limit=100_000)}
    try:
        versions = model_versions(app.config.tracking_uri, job_ids)
    except Exception as exc:
        raise Problem(
            503, "tracking unavailable", f"MLflow could not be read: {type(exc).__name__}"
        ) from None
    return [ModelVersionOut(**v) for v in versions]
