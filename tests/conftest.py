"""Shared fixtures: a locally built tokenizer/model, a real S3-compatible server (moto) on 127.0.0.1, databases.
Plain helpers and constants (REPO, TOKENS, platform_config, ...) live in tests/support."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.config import PG_ADMIN_URL, free_port
from tests.support.live import Server, serve
from tuneplane.raylocal import use_loopback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a hub id fails at once instead of retrying
use_loopback()  # every Ray a test starts listens on 127.0.0.1 only, with a token (before any `import ray`)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint (tokenizer + random weights) built locally once per session."""
    from tuneplane.devtools.tiny import build

    return build(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible HTTP server (moto_server) on a random loopback port."""
    port = free_port()
    # This environment's moto first: a `moto_server` on PATH may be another Python's, of another version
    # (moto 5.2.1 answers pyarrow's multipart uploads with errors that 5.2.5 does not).
    beside = Path(sys.executable).parent / "moto_server"
    exe = str(beside) if beside.exists() else shutil.which("moto_server") or "moto_server"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(moto_endpoint: str):
    """A fresh bucket; yields (s3fs filesystem, 's3://bucket')."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, f"s3://{bucket}"
    fs.invalidate_cache()


# -- control plane: databases ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> object:
    """A fresh PostgreSQL database on the local server for this session (skipped when none runs)."""
    from sqlalchemy import create_engine, text

    name = f"tuneplane_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}: {type(exc).__name__}")
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each control-plane test runs on the embedded SQLite and on a real PostgreSQL (emptied per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuneplane.db'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS job_events, attempts, jobs, alembic_version CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def tenants(tmp_path: Path) -> dict[str, Path]:
    """Two teams' data folders, and in alpha's a symlinked file and a symlinked folder into beta's."""
    from tests.support.tenants import make_tenants

    return make_tenants(tmp_path)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """`tuneplane serve` in its own process (SQLite, local backend), stopped with its jobs afterwards."""
    yield from serve(tmp_path)
