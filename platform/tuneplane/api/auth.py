"""Bearer tokens -> (team, role). Only SHA-256 digests of tokens are ever stored or configured."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import Request

from tuneplane.api.problems import Problem
from tuneplane.config import PlatformConfig, TokenEntry, hash_token
from tuneplane.store import Principal


class TokenIndex:
    def __init__(self, entries: list[TokenEntry]):
        self._by_digest = {e.sha256: Principal(team=e.team, role=e.role) for e in entries}

    def principal(self, token: str) -> Principal | None:
        return self._by_digest.get(hash_token(token))


def local_admin_token(config: PlatformConfig) -> TokenEntry:
    """The embedded default's token: made once, kept in `home/token` (mode 0600) for the CLI to find."""
    path = Path(config.home) / "token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    team = config.teams[0].name
    return TokenEntry(sha256=hash_token(path.read_text().strip()), team=team, role="admin")


def current_principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "unauthorized", "send Authorization: Bearer <token>")
    principal: Principal | None = request.app.state.tokens.principal(token.strip())
    if principal is None:
        raise Problem(401, "unauthorized", "unknown token")
    return principal
