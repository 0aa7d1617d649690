"""Probes and the Prometheus endpoint: `/healthz` (alive), `/readyz` (database reachable and migrated),
`/metrics`. No token needed: they say nothing about any team."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tuneplane.api.deps import DatabaseDep, TelemetryDep
from tuneplane.api.problems import problem_response

log = logging.getLogger("tuneplane.api")
router = APIRouter(tags=["probes"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(db: DatabaseDep) -> Response:
    try:
        db.ping()
        ready = db.at_head()
    except Exception as exc:
        log.warning("not ready: %s", type(exc).__name__)
        ready = False
    if not ready:
        return problem_response(503, "not ready", "database unreachable or not migrated")
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics")
def metrics(db: DatabaseDep, telemetry: TelemetryDep) -> Response:
    return Response(telemetry.exposition(db), media_type=CONTENT_TYPE_LATEST)
