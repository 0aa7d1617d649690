"""Bearer tokens -> (team, role). Only SHA-256 digests of tokens are ever stored or configured."""

from __future__ import annotations

import secrets

from tuneplane.config import PlatformConfig, TokenEntry, hash_token
from tuneplane.home import Home
from tuneplane.store import Principal


class TokenIndex:
    def __init__(self, entries: list[TokenEntry]):
        self._by_digest = {e.sha256: Principal(team=e.team, role=e.role) for e in entries}

    def principal(self, token: str) -> Principal | None:
        return self._by_digest.get(hash_token(token))


def local_admin_token(config: PlatformConfig) -> TokenEntry:
    """The embedded default's token: made once, kept in `home/token` (mode 0600) for the CLI to find."""
    path = Home(config.home).token
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    team = config.teams[0].name
    return TokenEntry(sha256=hash_token(path.read_text().strip()), team=team, role="admin")
