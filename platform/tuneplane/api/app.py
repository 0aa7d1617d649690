"""The FastAPI application: builds the services a request may use (config, database, backend, reconciler,
tokens, metrics), starts and stops the reconciler with the app, and installs routes and error handling."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tuneplane import __version__
from tuneplane.api import console, probes, problems
from tuneplane.api.auth import TokenIndex, local_admin_token
from tuneplane.api.deps import Services
from tuneplane.api.limits import Limits
from tuneplane.api.routes import router
from tuneplane.api.telemetry import RequestMetrics, Telemetry
from tuneplane.backends import Backend, make_backend
from tuneplane.config import PlatformConfig
from tuneplane.control.reconciler import Reconciler
from tuneplane.home import ensure_sqlite_folder
from tuneplane.quiet import quiet_loggers
from tuneplane.store import Database
from tuneplane.tracking import auth as mlflow_auth


def create_app(
    config: PlatformConfig, backend: Backend | None = None, run_reconciler: bool = True
) -> FastAPI:
    db = Database(config.database_url)
    backend = backend or make_backend(config)
    # The tokens file is re-read when it changes (rotation without a restart).
    tokens = TokenIndex(config.auth.tokens, config.auth.tokens_file)
    if not tokens.entries and backend.capabilities.local_admin_token:
        # the embedded default: one admin token in home/token
        tokens = TokenIndex([local_admin_token(config)], config.auth.tokens_file)
    found = Services(
        config=config,
        db=db,
        backend=backend,
        reconciler=Reconciler(db, backend, config),
        tokens=tokens,
        telemetry=Telemetry(),
        limits=Limits(config.limits),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if config.auto_migrate:
            db.migrate()
        _init_tracking(config.tracking_uri)
        if config.tracking_auth:  # one MLflow user per team, its password derived from the admin's
            mlflow_auth.ensure_users(config.tracking_uri, [t.name for t in config.teams])
        stop = threading.Event()
        thread = None
        if run_reconciler:
            thread = threading.Thread(
                target=found.reconciler.run_forever, args=(stop,), name="reconciler", daemon=True
            )
            thread.start()
            found.reconciler.watch_backend(stop)
        yield
        stop.set()
        found.reconciler.wake.set()
        if thread:
            thread.join(timeout=30)
        backend.close()
        db.dispose()

    app = FastAPI(
        title="Tuneplane",
        version=__version__,
        description="Submit, follow and cancel instruction-tuning jobs; list the adapters they registered.",
        lifespan=lifespan,
        # No Swagger UI or ReDoc: they load scripts from a CDN. The schema stays at /openapi.json; the
        # reference is docs/reference (generated from the same schemas).
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = found
    problems.install(app)
    app.include_router(router)
    app.include_router(probes.router)
    console.install(app)
    app.add_middleware(RequestMetrics, telemetry=found.telemetry)
    app.add_middleware(problems.BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(problems.RefuseNul)
    # Outermost (added last): every answer carries the security headers, those of the guards above included.
    app.add_middleware(console.SecurityHeaders)
    return app


def _init_tracking(uri: str) -> None:
    """Create a local MLflow database before any job runs: a training process and the API creating its
    tables at the same moment collide (`table _alembic_tmp_experiments already exists`)."""
    if uri.startswith("sqlite:"):
        from mlflow import MlflowClient

        ensure_sqlite_folder(uri)
        # MLflow announces a new database's tables at INFO (two lines on a first start): not the platform's news.
        with quiet_loggers(("mlflow.store.db.utils", "alembic"), logging.WARNING):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
