"""API replicas as real processes: `tuneplane serve` started, SIGKILLed like a crashed pod, restarted; and a
fresh PostgreSQL database for them to share."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.config import PG_ADMIN_URL, free_port

# Variables that would override the replica's config file.
_CONFIG_ENV = ("TUNEPLANE_CONFIG", "TUNEPLANE_DATABASE_URL", "TUNEPLANE_HOME")


@contextlib.contextmanager
def fresh_database(prefix: str = "tuneplane_replicas") -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards); skips the test when no server answers."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}: {type(exc).__name__}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class ApiReplica:
    """One `tuneplane serve` process with its own config file and home (MLflow's local store is per home;
    the job records live in the shared `database_url`). Starting does not wait: poll `ready()`."""

    def __init__(self, name: str, home: Path, config: dict[str, Any]):
        self.name, self.home, self.port = name, home, free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.config_file = home / "platform.yaml"
        self.config_file.write_text(yaml.safe_dump({**config, "home": str(home)}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every process this replica ran, in order
        self.logs: list[Path] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log_path = self.home / f"api-{len(self.logs)}.log"
        self.logs.append(log_path)
        env = {k: v for k, v in os.environ.items() if k not in _CONFIG_ENV}
        with log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tuneplane.cli", "serve", "--port", str(self.port),
                 "--config", str(self.config_file)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        self.pids.append(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        if not self.alive():
            return False
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, like a crashed pod: no shutdown hooks, open transactions left to the database."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        text = "".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        return "\n".join(text.splitlines()[-lines:])
