"""API bodies and responses in one place (the spec itself is `tuneplane.spec.TuningSpec`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from tuneplane.store import Job, JobEvent


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every time the API shows is UTC and says so."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


Time = Annotated[datetime, AfterValidator(_utc)]
OptionalTime = Annotated[datetime | None, AfterValidator(_utc)]


class JobOut(BaseModel):
    id: str
    team: str
    name: str
    state: str
    message: str
    cancel_requested: bool
    priority: int
    gpus: int
    gpu_pool: str | None
    model_uri: str | None
    attempts: int
    created_at: Time
    submitted_at: OptionalTime
    started_at: OptionalTime
    finished_at: OptionalTime
    spec: dict[str, Any] | None = None

    @classmethod
    def of(cls, job: Job, with_spec: bool = False) -> JobOut:
        return cls(
            id=job.id, team=job.team, name=job.name, state=job.state, message=job.message,
            cancel_requested=job.cancel_requested, priority=job.priority, gpus=job.gpus, gpu_pool=job.gpu_pool,
            model_uri=job.model_uri, attempts=len(job.attempts), created_at=job.created_at,
            submitted_at=job.submitted_at, started_at=job.started_at, finished_at=job.finished_at,
            spec=job.spec if with_spec else None,
        )  # fmt: skip


class JobList(BaseModel):
    items: list[JobOut]
    next_offset: int | None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: Time
    kind: str
    from_state: str | None
    to_state: str | None
    actor: str
    message: str

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls.model_validate(event)


class MetricPoint(BaseModel):
    step: int
    value: float


class JobMetrics(BaseModel):
    job_id: str
    state: str
    run_id: str | None
    run_status: str | None
    step: int | None
    max_steps: int | None
    latest: dict[str, float]
    history: dict[str, list[MetricPoint]]


class ModelVersionOut(BaseModel):
    name: str
    version: int
    uri: str
    job_id: str
    run_id: str | None
    base_model: str | None
    spec_hash: str | None
    created_at: int | None


class ValidationReport(BaseModel):
    ok: bool
    spec: dict[str, Any]
    problems: list[dict[str, str]]
    data: dict[str, Any] | None = None


class FieldProblem(BaseModel):
    field: str
    message: str


class ProblemOut(BaseModel):
    """RFC 9457 problem details, as every error is answered (media type application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldProblem] | None = None


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers of a route, documented as problem+json."""
    reasons = {
        401: "no or unknown bearer token",
        404: "no such job for this team",
        409: "conflict (Idempotency-Key reused for another spec, job already ended)",
        413: "body over the size limit",
        422: "invalid request or spec; `errors` names each field",
        503: "a dependency (database, MLflow) is unavailable",
    }
    schema = {"$ref": "#/components/schemas/ProblemOut"}
    return {
        code: {
            "description": reasons[code],
            "model": ProblemOut,
            "content": {"application/problem+json": {"schema": schema}},
        }
        for code in codes
    }
