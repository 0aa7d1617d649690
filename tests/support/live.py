"""API servers for tests that talk HTTP: `tuneplane serve` in its own process, with the test tokens and a fast
reconciler (what the end-to-end and console tests run jobs against: the `server` fixture in tests/conftest.py),
and the app in a thread of the test process without its reconciler (`api_in_thread`: jobs stay PENDING)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.support.config import DATA_ROOTS, TOKENS, free_port, platform_config
from tuneplane.client import Client
from tuneplane.config import hash_token


class Server:
    """`tuneplane serve` in its own process, so a test can kill it like a crashed pod."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.config = home / "platform.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "home": str(home),
                    "teams": [{"name": "alpha"}, {"name": "beta"}],
                    "auth": {
                        "tokens": [
                            {"sha256": hash_token(t), "team": team, "role": role}
                            for t, (team, role) in TOKENS.items()
                        ]
                    },
                    "reconcile_interval_s": 0.5,
                    "data_roots": DATA_ROOTS,
                }
            )
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.home / f"api-{time.time():.0f}.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tuneplane.cli", "serve", "--port", str(self.port), "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT,
            # Something only the API may know: a job must never inherit it (tests/test_e2e.py).
            env={**os.environ, "TUNEPLANE_TEST_API_SECRET": "the API's own"},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with Client(self.url, token="tok-alpha") as c:
                    c._http.get("/readyz").raise_for_status()
                return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError("API did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def serve(home: Path) -> Iterator[Server]:
    """A started server; on the way out it is stopped and no training process of it is left behind."""
    srv = Server(home)
    srv.start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
    for pid_file in (home / "jobs").glob("*/pid"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@contextmanager
def api_in_thread(home: Path) -> Iterator[str]:
    """The API (SQLite in `home`, the two test teams) served by uvicorn in a thread, without its reconciler."""
    import uvicorn

    from tuneplane.api import create_app

    app = create_app(platform_config(home, f"sqlite:///{home / 'db'}"), run_reconciler=False)
    api = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error"))
    thread = threading.Thread(target=api.run, daemon=True)
    thread.start()
    while not api.started:
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{api.config.port}"
    api.should_exit = True
    thread.join(10)
