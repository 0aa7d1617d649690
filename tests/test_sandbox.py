"""The local backend's sandbox (issue #20): code running inside a job, as a library bug would run it, sees its
team's data and writes its own folders, and nothing else: not the tokens file, the API's database, the state
folder's other jobs, another team's data root, or any process outside. Run with the sandbox the backend really
builds (`sandbox.plan` + `bwrap_args`) around a probe script instead of the training entrypoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.config import REPO
from tests.support.tenants import confined_config, make_tenants, spec_reading
from tuneplane.backends import sandbox
from tuneplane.errors import ConfigError

PROBE = r"""
import json, os, sys
out = {}
def attempt(name, fn):
    try:
        got = fn()
        out[name] = len(got) if isinstance(got, (str, bytes)) else "ok"
    except Exception as exc:
        out[name] = type(exc).__name__
paths = json.loads(sys.argv[1])
attempt("read own data", lambda: open(paths["own"]).read())
attempt("read beta data", lambda: open(paths["beta"]).read())
attempt("read tokens file", lambda: open(paths["tokens"]).read())
attempt("read database", lambda: open(paths["database"], "rb").read())
attempt("read other job", lambda: open(paths["other_job"]).read())
def write(path):
    with open(path, "a") as f:
        f.write("x")
attempt("write own job folder", lambda: write(os.path.join(paths["job"], "pid")))
attempt("write work folder", lambda: write(os.path.join(paths["job"], "work", "x")))
attempt("read other run", lambda: open(paths["other_run"]).read())
attempt("read config", lambda: open(paths["config"]).read())
out["run sockets"] = sorted(os.listdir("/run"))
attempt("write run folder", lambda: write(os.path.join(paths["run"], "x")))
attempt("write mlflow store", lambda: write(os.path.join(paths["mlflow"], "x")))
attempt("write own data", lambda: write(paths["own"]))
attempt("write state folder", lambda: write(os.path.join(paths["home"], "planted")))
out["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps(out))
"""


@pytest.fixture(params=["under /tmp", "elsewhere"])
def sandboxed(request: pytest.FixtureRequest, tmp_path: Path):
    """Two teams' folders, in /tmp (which the sandbox replaces by its own) or elsewhere on the machine."""
    base = tmp_path
    if request.param == "elsewhere":
        base = REPO / "build" / f"sandbox-test-{uuid.uuid4().hex[:8]}"
        request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    tenants = make_tenants(base)
    why = sandbox.problem(confined_config(tenants))
    if why is not None:
        pytest.fail(f"the sandbox cannot run here: {why}")
    return tenants


def test_code_in_a_job_sees_only_what_the_job_may(sandboxed: dict[str, Path], tmp_path: Path) -> None:
    tenants = sandboxed
    home = tenants["home"]
    tokens = tmp_path / "secrets" / "tokens.yaml"
    tokens.parent.mkdir()
    tokens.write_text("- {sha256: '00', team: alpha}\n")
    config = confined_config(tenants, auth={"tokens_file": str(tokens)})
    home.mkdir()
    Path(config.database_url.removeprefix("sqlite:///")).write_bytes(b"SQLite format 3\0 team specs")
    other_job = home / "jobs" / "beta-job"
    other_job.mkdir(parents=True)
    (other_job / "spec.yaml").write_text("beta's spec")
    from tuneplane.spec import parse_spec

    spec = parse_spec(spec_reading(str(tenants["alpha"] / "train.jsonl")))
    other_run = Path(config.storage_path) / "beta-job" / "checkpoint.json"
    other_run.parent.mkdir(parents=True)
    other_run.write_text("beta's checkpoint")
    config_file = tenants["alpha"] / "platform.yaml"  # even inside the team's own root
    config_file.write_text("database_url: postgresql://u:secret@db/tuneplane\n")
    config._source = config_file
    plan = sandbox.plan(config, "alpha-job", "alpha", spec)
    job = home / "jobs" / "alpha-job"
    paths = {
        "own": str(tenants["alpha"] / "train.jsonl"),
        "beta": str(tenants["beta"] / "train.jsonl"),
        "tokens": str(tokens),
        "database": config.database_url.removeprefix("sqlite:///"),
        "other_job": str(other_job / "spec.yaml"),
        "job": str(job),
        "run": str(Path(config.storage_path) / "alpha-job"),
        "mlflow": str(Path(config.tracking_uri.removeprefix("sqlite:///")).parent),
        "home": str(home),
        "other_run": str(other_run),
        "config": str(config_file),
    }
    command = [*sandbox.bwrap_args(plan, job / sandbox.WORK), sys.executable, "-c", PROBE, json.dumps(paths)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen.pop("processes") == [1, 2]  # its own PID namespace: bubblewrap's init and the probe
    own = len((tenants["alpha"] / "train.jsonl").read_text())
    assert seen == {
        "read own data": own,
        "read beta data": "FileNotFoundError",  # beta's root is an empty folder in there
        "read tokens file": 0,  # /dev/null
        "read database": 0,
        "read other job": "FileNotFoundError",  # the state folder holds only this job's own folders
        "write own job folder": "OSError",  # its control files are the runner's: read-only
        "write work folder": "ok",
        "read other run": "FileNotFoundError",  # only its own run folders are in the run storage
        "read config": 0,  # the platform's private files read empty, wherever they lie
        "run sockets": [],  # no host service's socket
        "write run folder": "ok",
        "write mlflow store": "ok",
        "write own data": "OSError",  # read-only file system
        "write state folder": "ok",  # ... into the sandbox's own empty state folder, not the real one
    }
    assert not (home / "planted").exists()
    assert (job / "work" / "x").exists() and (Path(paths["mlflow"]) / "x").exists()
    assert "pid" not in {p.name for p in job.iterdir()}


def test_several_teams_without_a_sandbox_refuse_to_start(tenants: dict[str, Path], monkeypatch) -> None:
    from tuneplane.api import create_app

    monkeypatch.setattr(sandbox, "problem", lambda config: "bubblewrap (`bwrap`) is not installed")
    with pytest.raises(ConfigError) as caught:
        create_app(confined_config(tenants))
    [(field, message)] = caught.value.problems
    assert field == "backend.isolation" and "2 teams share this machine" in message and "bwrap" in message
    create_app(
        confined_config(tenants, backend={"type": "local", "isolation": "none"})
    )  # said knowingly: it starts
    one_team = confined_config(tenants, teams=[{"name": "alpha"}])
    assert (
        sandbox.check_isolation(one_team)
        == "local jobs run without a sandbox: bubblewrap (`bwrap`) is not installed"
    )
