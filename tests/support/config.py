"""Paths, tokens and platform configs shared by the test modules (the fixtures built on them: tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "jobs" / "data"
# Others' schemas (KubeRay's and KServe's CRDs) are read where they are provided, beside the checkout; the
# repository never carries copies of them.
UPSTREAM_SCHEMAS = REPO.parent / "shared" / "schemas"


def upstream_schema(relative: str) -> Path:
    """An upstream schema file under ../shared/schemas/, or the test skips saying which folder lacks it."""
    import pytest

    path = UPSTREAM_SCHEMAS / relative
    if not path.is_file():
        pytest.skip(
            f"{relative} is not in {UPSTREAM_SCHEMAS} (the upstream schemas folder, ../shared/schemas/)"
        )
    return path


# The PostgreSQL server the `postgres_url` fixture creates its databases on (tests skip when none answers).
PG_ADMIN_URL = os.environ.get("TUNEPLANE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

TOKENS = {"tok-alpha": ("alpha", "member"), "tok-beta": ("beta", "member"), "tok-root": ("alpha", "admin")}
# One node of the `h100` pool the shipped recipes name: 8 x H100 80GB, what a job may use of its CPUs and memory.
H100_NODE = {"gpus_per_node": 8, "cpus_per_node": 192, "memory_per_node": "1800Gi", "gpu_memory": "80Gi"}
# Local folders test specs read: the repo (jobs/data, build/tiny-llama) and pytest's temporary folders.
DATA_ROOTS = [str(REPO), tempfile.gettempdir()]


def platform_config(home: Path, db: str, **overrides: object):
    """Two teams (alpha, beta), one GPU pool only alpha may use, tokens from TOKENS."""
    from tuneplane.config import hash_token, load_config

    data: dict[str, object] = {
        "home": str(home),
        "database_url": db,
        "teams": [
            {
                "name": "alpha",
                "quota": {"max_concurrent_jobs": 1, "max_gpus": 8},
                "gpu_pools": ["h100"],
                "priority": 0,
            },
            {"name": "beta", "quota": {"max_concurrent_jobs": 2, "max_gpus": 0}, "priority": 10},
        ],
        "gpu_pools": {"h100": {"node_selector": {"pool": "h100"}, "accelerator_type": "H100", **H100_NODE}},
        "auth": {
            "tokens": [
                {"sha256": hash_token(t), "team": team, "role": role} for t, (team, role) in TOKENS.items()
            ]
        },
        "reconcile_interval_s": 0.2,
        "data_roots": DATA_ROOTS,
    }
    data.update(overrides)
    return load_config(overrides=data)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: Any, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Until `url` answers 200; RuntimeError (with the tail of `log`) when `proc` ends first or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} did not start (exit code {proc.poll()}) {tail}")
        time.sleep(0.2)
