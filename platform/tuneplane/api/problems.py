"""Errors as RFC 9457 problem+json, each naming the field at fault; never a stack trace.

Every deliberate error is a `TuneplaneError`; `_ANSWERS` says which HTTP status each kind gets. Anything else is
a bug: logged, and answered 500 without detail.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneplane.errors import BackendError, Conflict, InputError, NotFound, QuotaExceeded, TuneplaneError

log = logging.getLogger("tuneplane.api")
PROBLEM = "application/problem+json"

# (error class, status, title), first match wins.
_ANSWERS: list[tuple[type[TuneplaneError], int, str]] = [
    (InputError, 422, "invalid spec"),
    (NotFound, 404, "not found"),
    (Conflict, 409, "conflict"),
    (QuotaExceeded, 429, "too many requests"),
    (BackendError, 503, "backend unavailable"),
]


class Problem(TuneplaneError):
    """An answer decided by the API itself (401, 413, 503...), raised from a route or a dependency."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status, self.title, self.detail, self.errors = status, title, detail, errors
        self.headers = dict(headers or {})
        super().__init__(detail or title)


def field_errors(problems: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"field": field, "message": message} for field, message in problems]


def problem_response(
    status: int, title: str, detail: str = "", errors: list[dict[str, str]] | None = None, **headers: str
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers or None)


def _answer(exc: TuneplaneError) -> JSONResponse:
    if isinstance(exc, Problem):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        return problem_response(exc.status, exc.title, exc.detail, exc.errors, **headers, **exc.headers)
    for cls, status, title in _ANSWERS:
        if isinstance(exc, cls):
            if isinstance(exc, InputError):
                errors = field_errors(exc.problems)
                detail = "; ".join(
                    f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors
                )
                return problem_response(status, title, detail, errors)
            return problem_response(status, title, str(exc))
    log.error("unanswered %s: %s", type(exc).__name__, exc)
    return problem_response(500, "internal error", "the error was logged; nothing was changed")


def install(app: FastAPI) -> None:
    @app.exception_handler(TuneplaneError)
    async def _tuneplane(_: Request, exc: TuneplaneError) -> JSONResponse:
        return _answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_request_error(e) for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(422, "invalid request", detail, errors)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        return problem_response(exc.status_code, str(exc.detail), "", None, **headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal error", "the error was logged; nothing was changed")


def _request_error(error: Any) -> dict[str, str]:
    """A request validation error as {field, message}; a JSON syntax error names its position, not a field."""
    loc = [str(p) for p in error["loc"] if p != "body"]
    if error["type"] == "json_invalid":
        where = f" at character {loc[0]}" if loc else ""
        return {"field": "", "message": f"invalid JSON{where}: {error['ctx'].get('error', error['msg'])}"}
    return {"field": ".".join(loc), "message": error["msg"]}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, by Content-Length or by counting a chunked body (the
    app never sees more than `max_bytes`, and whatever it answers to the cut body is replaced by the 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        seen, exceeded, answered = 0, False, False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                exceeded = True
                raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if not exceeded:
                await send(message)
            elif not answered:  # the app's answer to the cut body (400) becomes the 413
                answered = True
                await self._refuse(scope, receive, send)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not answered:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"bodies are limited to {self.max_bytes} bytes"
        await problem_response(413, "request too large", detail)(scope, receive, send)


class RefuseNul:
    """Refuses a URL whose path or query holds a NUL character (`%00`) with 422: no job id, name or team has
    one, and PostgreSQL cannot even compare text with it (a 500 before). Spec bodies are checked by the spec
    parser, naming the field."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope["path"] or "%00" in scope.get("query_string", b"").decode("latin-1")
        ):
            detail = "the URL contains a NUL character (%00), which no job id, name or team holds"
            await problem_response(422, "invalid request", detail)(scope, receive, send)
            return
        await self.app(scope, receive, send)
