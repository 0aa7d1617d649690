"""Shared fixtures: a locally built tokenizer/model, a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a hub id fails at once instead of retrying


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible HTTP server (moto_server) on a random loopback port."""
    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
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


# -- control plane: databases and platform configs ------------------------------------------------------------

PG_ADMIN_URL = os.environ.get("TUNEPLANE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


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


TOKENS = {"tok-alpha": ("alpha", "member"), "tok-beta": ("beta", "member"), "tok-root": ("alpha", "admin")}


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
        "gpu_pools": {"h100": {"node_selector": {"pool": "h100"}, "accelerator_type": "H100"}},
        "auth": {
            "tokens": [
                {"sha256": hash_token(t), "team": team, "role": role} for t, (team, role) in TOKENS.items()
            ]
        },
        "reconcile_interval_s": 0.2,
    }
    data.update(overrides)
    return load_config(overrides=data)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
