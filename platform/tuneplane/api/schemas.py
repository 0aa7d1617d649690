"""API bodies and responses in one place (the spec itself is `tuneplane.spec.TuningSpec`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from tuneplane.states import JobState


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every time the API shows is UTC and says so."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


Time = Annotated[datetime, AfterValidator(_utc)]
OptionalTime = Annotated[datetime | None, AfterValidator(_utc)]


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, list) else value


class JobOut(BaseModel):
    """A job as listed; read from the job record (`from_attributes`)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    team: str
    name: str
    state: JobState
    message: str
    cancel_requested: bool
    priority: int
    gpus: int
    gpu_pool: str | None
    model_uri: str | None
    spec_hash: str = Field(
        description="SHA-256 of the spec; the job's MLflow run and model versions carry it."
    )
    attempts: Annotated[int, BeforeValidator(_count)] = Field(description="Hand-overs to a backend so far.")
    created_at: Time
    submitted_at: OptionalTime
    started_at: OptionalTime
    finished_at: OptionalTime
    queue_position: int | None = Field(
        None, description="For a QUEUED job, its place in the queue over every team (1 = handed over next)."
    )


class JobDetail(JobOut):
    """One job, with the spec it was submitted with."""

    spec: dict[str, Any]


class JobList(BaseModel):
    items: list[JobOut]
    next_offset: int | None


class CallerOut(BaseModel):
    """Who a token belongs to."""

    team: str
    role: Literal["member", "admin"]


class QuotaUse(BaseModel):
    in_use: int
    allowed: int


class UsageOut(BaseModel):
    """A team's quota and what its jobs hold now."""

    team: str
    jobs: QuotaUse = Field(description="Jobs submitted or running, against max_concurrent_jobs.")
    gpus: QuotaUse = Field(description="GPUs those jobs hold, against max_gpus.")
    waiting: QuotaUse = Field(description="Jobs pending, validating or queued, against max_waiting_jobs.")


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: Time
    kind: Literal["state", "info"]
    from_state: JobState | None
    to_state: JobState | None
    actor: str
    message: str


class MetricPoint(BaseModel):
    step: int
    value: float


class JobMetrics(BaseModel):
    job_id: str
    state: JobState
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
    gate: Literal["passed", "failed", "none"] | None = Field(
        None,
        description="The spec's evaluation gate: `passed`, or `none` when the spec set no gate (a failed gate "
        "registers no version). Null for versions published before gates existed.",
    )
    scores: dict[str, float] = Field(
        default_factory=dict,
        description="Headline scores of the tuned model: `eval_loss`, `zero_shot/<task>`, `zero_shot/mean`, "
        "`lm_eval/<task>`.",
    )


class FieldProblem(BaseModel):
    field: str
    message: str


class ValidationReport(BaseModel):
    ok: bool
    spec: dict[str, Any]
    problems: list[FieldProblem]
    data: dict[str, Any] | None = Field(None, description="The data preflight report, when it ran.")
    notes: list[str] = Field(default_factory=list, description="What was not checked, and why.")
    memory: dict[str, Any] | None = Field(
        None,
        description="Estimated memory per GPU (bytes, by part) against one GPU of the spec's pool, when the "
        "model's shape is known (see docs/training.md, Memory estimate).",
    )


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
        429: "the team has as many jobs waiting as its quota allows",
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
