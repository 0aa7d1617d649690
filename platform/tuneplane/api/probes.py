"""Probes and the Prometheus endpoint: `/healthz` (alive), `/readyz` (database reachable and migrated),
`/metrics`. No token needed: they say nothing about any team."""

from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tuneplane.api.deps import DatabaseDep, LimitsDep, TelemetryDep
from tuneplane.api.problems import problem_response
from tuneplane.store import Database

log = logging.getLogger("tuneplane.api")
router = APIRouter(tags=["probes"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """On the event loop itself: it answers whatever the worker threads are doing."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(db: DatabaseDep, limits: LimitsDep) -> Response:
    """The database check on threads of its own: never queued behind team work."""
    ready = await anyio.to_thread.run_sync(_ready, db, limiter=limits.probes)
    if not ready:
        return problem_response(503, "not ready", "database unreachable or not migrated")
    return Response('{"status":"ready"}', media_type="application/json")


def _ready(db: Database) -> bool:
    try:
        db.ping()
        return db.at_head()
    except Exception as exc:
        log.warning("not ready: %s", type(exc).__name__)
        return False


@router.get("/metrics")
def metrics(db: DatabaseDep, telemetry: TelemetryDep) -> Response:
    return Response(telemetry.exposition(db), media_type=CONTENT_TYPE_LATEST)
