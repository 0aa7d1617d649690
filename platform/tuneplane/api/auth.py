"""Bearer tokens -> (team, role). Only SHA-256 digests of tokens are ever stored or configured.

Tokens come from the platform config (`auth.tokens`, fixed for the life of the process) and from the tokens file
(`auth.tokens_file`, usually a mounted Secret), which is re-read when it changes so that tokens rotate without a
restart. A Secret volume update swaps a symlink to a new file, so each check stats the path (following links) and
compares inode, mtime and size; the checks are throttled to one per `check_interval_s`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tuneplane.config import PlatformConfig, TokenEntry, hash_token, read_tokens_file
from tuneplane.errors import ConfigError
from tuneplane.home import Home
from tuneplane.store import Principal

log = logging.getLogger("tuneplane.api")

FileKey = tuple[int, int, int] | None  # (st_ino, st_mtime_ns, st_size); None: no file


def _file_key(path: Path) -> FileKey:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class TokenIndex:
    """Digest -> principal. With a `tokens_file`, its entries are reloaded when the file changes; a malformed
    new version keeps the entries in use and logs a warning naming the file and the fields at fault."""

    def __init__(
        self,
        entries: list[TokenEntry],
        tokens_file: Path | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._static = list(entries)
        self._file = tokens_file
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._file_key: FileKey = None
        self._next_check = float("-inf")
        self._file_entries: list[TokenEntry] = []
        if tokens_file is not None:
            # At start a malformed file is an error (ConfigError): better no API than one nobody can use.
            self._file_key = _file_key(tokens_file)
            self._file_entries = read_tokens_file(tokens_file)
            self._next_check = clock() + check_interval_s
        self._by_digest = self._index()

    def _index(self) -> dict[str, Principal]:
        # Later entries win, as before: the file's entries after the config's.
        return {e.sha256: Principal(team=e.team, role=e.role) for e in [*self._static, *self._file_entries]}

    @property
    def entries(self) -> int:
        """How many tokens authenticate right now."""
        return len(self._by_digest)

    def principal(self, token: str) -> Principal | None:
        self.refresh()
        return self._by_digest.get(hash_token(token))

    def refresh(self, force: bool = False) -> None:
        """Reload the tokens file if it changed since the last look (at most once per interval unless
        `force`). Cheap when nothing changed: one stat."""
        if self._file is None:
            return
        now = self._clock()
        if not force and now < self._next_check:
            return
        if not self._lock.acquire(blocking=force):
            return  # another request is checking right now: use the entries in place
        try:
            self._next_check = now + self._interval
            key = _file_key(self._file)
            if key == self._file_key:
                return
            try:
                entries = read_tokens_file(self._file)
            except ConfigError as exc:
                # Remember this version so a broken file is reported once, not on every check.
                self._file_key = key
                log.warning("tokens file changed but cannot be used; keeping the previous tokens: %s", exc)
                return
            if key is None:
                log.warning("tokens file %s is gone: its tokens no longer authenticate", self._file)
            self._file_key, self._file_entries = key, entries
            self._by_digest = self._index()  # one assignment: readers see the old map or the new one
            log.info("tokens file %s reloaded: %d entries", self._file, len(entries))
        finally:
            self._lock.release()


def local_admin_token(config: PlatformConfig) -> TokenEntry:
    """The embedded default's token: made once, kept in `home/token` (mode 0600) for the CLI to find."""
    path = Home(config.home).token
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    team = config.teams[0].name
    return TokenEntry(sha256=hash_token(path.read_text().strip()), team=team, role="admin")
