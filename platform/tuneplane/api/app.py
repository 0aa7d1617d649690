"""The FastAPI application: wiring of config, database, backend, reconciler, auth and problem handling."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneplane import __version__
from tuneplane.api import problems
from tuneplane.api.auth import TokenIndex, local_admin_token
from tuneplane.api.routes import router
from tuneplane.backends import Backend, make_backend
from tuneplane.config import PlatformConfig
from tuneplane.reconciler import Reconciler
from tuneplane.store import Database, Job, JobState

log = logging.getLogger("tuneplane.api")


def create_app(
    config: PlatformConfig, backend: Backend | None = None, run_reconciler: bool = True
) -> FastAPI:
    db = Database(config.database_url)
    backend = backend or make_backend(config)
    reconciler = Reconciler(db, backend, config)
    entries = config.token_entries()
    if not entries and config.backend == "local":
        entries = [local_admin_token(config)]  # the embedded default: one admin token in home/token
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if config.auto_migrate:
            db.migrate()
        _init_tracking(config.tracking_uri)
        thread = None
        if run_reconciler:
            thread = threading.Thread(
                target=reconciler.run_forever, args=(stop,), name="reconciler", daemon=True
            )
            thread.start()
            reconciler.watch_backend(stop)
        yield
        stop.set()
        reconciler.wake.set()
        if thread:
            thread.join(timeout=30)
        db.dispose()

    app = FastAPI(
        title="Tuneplane",
        version=__version__,
        description="Submit, follow and cancel instruction-tuning jobs; list the adapters they registered.",
        lifespan=lifespan,
    )
    app.state.config, app.state.db, app.state.backend = config, db, backend
    app.state.reconciler, app.state.tokens = reconciler, TokenIndex(entries)
    problems.install(app)
    app.include_router(router)
    _install_probes_and_metrics(app, db)
    app.add_middleware(problems.BodyLimit, max_bytes=config.max_request_bytes)
    return app


class RequestMetrics:
    """Counts and times requests by route template. Plain ASGI rather than @app.middleware("http"), which
    costs a task and a body re-wrap per request (~0.3 ms)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router fills in the scope
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            self.requests.labels(scope["method"], route, str(status)).inc()


def _init_tracking(uri: str) -> None:
    """Create a local MLflow database before any job runs: a training process and the API creating its
    tables at the same moment collide (`table _alembic_tmp_experiments already exists`)."""
    if uri.startswith("sqlite:"):
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _install_probes_and_metrics(app: FastAPI, db: Database) -> None:
    registry = CollectorRegistry()
    requests = Counter(
        "tuneplane_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "tuneplane_http_request_seconds", "Request latency", ["method", "route"], registry=registry
    )
    jobs = Gauge("tuneplane_jobs", "Jobs by state", ["state"], registry=registry)

    app.add_middleware(RequestMetrics, requests=requests, latency=latency)

    @app.get("/healthz", include_in_schema=True, tags=["probes"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    def readyz() -> Response:
        try:
            db.ping()
            ready = db.at_head()
        except Exception as exc:
            log.warning("not ready: %s", type(exc).__name__)
            ready = False
        if not ready:
            return problems.problem_response(503, "not ready", "database unreachable or not migrated")
        return Response('{"status":"ready"}', media_type="application/json")

    @app.get("/metrics", tags=["probes"])
    def metrics() -> Response:
        with db.session(readonly=True) as s:
            counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in JobState:
            jobs.labels(state.value).set(counts.get(state.value, 0))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
