"""Typed dependencies of the routes: what a request may use, and who is calling.

`create_app` builds one `Services` and keeps it on the app; every route asks for the part it needs with one of
the `...Dep` annotations below instead of reaching into `request.app.state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tuneplane.api.auth import TokenIndex
from tuneplane.api.limits import Limits
from tuneplane.api.problems import Problem
from tuneplane.api.telemetry import Telemetry
from tuneplane.backends import Backend
from tuneplane.config import PlatformConfig
from tuneplane.control.reconciler import Reconciler
from tuneplane.store import Database, Principal


@dataclass(frozen=True)
class Services:
    config: PlatformConfig
    db: Database
    backend: Backend
    reconciler: Reconciler
    tokens: TokenIndex
    telemetry: Telemetry
    limits: Limits


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def _config(request: Request) -> PlatformConfig:
    return services(request).config


def _db(request: Request) -> Database:
    return services(request).db


def _backend(request: Request) -> Backend:
    return services(request).backend


def _reconciler(request: Request) -> Reconciler:
    return services(request).reconciler


def _telemetry(request: Request) -> Telemetry:
    return services(request).telemetry


def _limits(request: Request) -> Limits:
    return services(request).limits


def current_principal(request: Request) -> Principal:
    """The caller named by the bearer token; 401 without a known one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "unauthorized", "send Authorization: Bearer <token>")
    principal = services(request).tokens.principal(token.strip())
    if principal is None:
        raise Problem(401, "unauthorized", "unknown token")
    return principal


ConfigDep = Annotated[PlatformConfig, Depends(_config)]
DatabaseDep = Annotated[Database, Depends(_db)]
BackendDep = Annotated[Backend, Depends(_backend)]
ReconcilerDep = Annotated[Reconciler, Depends(_reconciler)]
TelemetryDep = Annotated[Telemetry, Depends(_telemetry)]
LimitsDep = Annotated[Limits, Depends(_limits)]
Caller = Annotated[Principal, Depends(current_principal)]
