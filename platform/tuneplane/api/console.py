"""The web console: a static app (HTML, CSS and ES modules in `tuneplane/console/`, no build step) served
under `/console/`. It reads everything through the public `/v1` API with the token the user signs in with, kept
in the tab's sessionStorage and sent as a bearer header: the server never renders team data into a page, so
the pages and their scripts are the same for everyone and may be cached, while every `/v1` answer is marked
`no-store`. Choices are explained in docs/architecture.md (Web console).

Security headers for every response (API answers and the guards' 413 and 422 included: `create_app` installs
this middleware outermost) are set here, in one place: a Content-Security-Policy that allows only this origin's
scripts and styles (no inline script, no eval, no other host), no framing, no referrer, no MIME sniffing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
CONSOLE_PATH = "/console"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_ALWAYS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def install(app: FastAPI) -> None:
    """Serve the console and send `/` there."""
    app.mount(CONSOLE_PATH, StaticFiles(directory=CONSOLE_DIR, html=True), name="console")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{CONSOLE_PATH}/")


def cache_control(path: str, status: int) -> bytes:
    """Team data (`/v1`) is never stored by a browser or proxy; the console's files hold none, so they may be
    cached: revalidated on each load, the vendored libraries (their folders carry their versions) kept for a
    day. Errors are never stored."""
    if status >= 400 or not path.startswith(f"{CONSOLE_PATH}/"):
        return b"no-store"
    # The console's own page, modules and stylesheet are revalidated on every load (ETags make that cheap), so
    # an upgrade never mixes old and new modules; only the vendored libraries, versioned by folder, are kept.
    return b"public, max-age=86400" if f"{CONSOLE_PATH}/vendor/" in path else b"no-cache"


class SecurityHeaders:
    """Adds the CSP, framing and sniffing headers to every response and Cache-Control where the route set none
    (plain ASGI, like the other middleware: it must not buffer the streamed logs)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                headers += [*_ALWAYS, (b"cache-control", cache_control(path, message["status"]))]
                headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)
