"""End to end over HTTP: a real API server (uvicorn, SQLite, local backend) running real training jobs.

Submit -> SUCCEEDED -> adapter listed in the registry, with the API killed and restarted mid-job; cancel mid-run
-> CANCELLED, the job's processes gone, its MLflow run KILLED.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.support.config import REPO, free_port
from tests.support.live import Server
from tuneplane.client import Client
from tuneplane.home import Home
from tuneplane.spec import load_spec

pytestmark = pytest.mark.slow  # `server` (tests/conftest.py): `tuneplane serve` in its own process


def quick_spec(tmp_path: Path, tiny_dir: Path, max_steps: int) -> Path:
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    spec["model"]["base"] = str(tiny_dir)
    spec["hyperparameters"].update(max_steps=max_steps, warmup_steps=2)
    spec["checkpointing"]["every_n_steps"] = 20
    spec["tracking"].update(log_every_n_steps=2, registered_model_name="e2e-adapter")
    spec["eval"].update(zero_shot_sources=[], gate=None, lm_eval=None)
    path = tmp_path / f"spec-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for(client: Client, job_id: str, predicate, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if predicate(job):
            return job
        time.sleep(0.5)
    raise AssertionError(
        f"timed out; last state {client.job(job_id)['state']}: {client.job(job_id)['message']}"
    )


def test_job_survives_an_api_crash_and_registers_its_adapter(
    server: Server, tmp_path: Path, tiny_dir: Path
) -> None:
    with Client(server.url, token="tok-alpha") as client:
        job_id = client.submit(quick_spec(tmp_path, tiny_dir, max_steps=60))["id"]
        wait_for(client, job_id, lambda j: j["state"] == "RUNNING")
    server.kill()  # like a crashed pod: no shutdown hooks
    time.sleep(2)
    server.start()
    with Client(server.url, token="tok-alpha") as client:
        final = client.wait(job_id, poll_s=1, timeout_s=400)
        assert final["state"] == "SUCCEEDED", final["message"]
        assert final["attempts"] == 1  # followed, not submitted again
        assert final["model_uri"] and final["model_uri"].startswith("models:/alpha.e2e-adapter/")
        assert [m["uri"] for m in client.models()] == [final["model_uri"]]
        # the job record and its registered version carry one spec hash: they join on it
        assert [m["spec_hash"] for m in client.models()] == [final["spec_hash"]]
        metrics = client.metrics(job_id, history=True)
        assert metrics["step"] == 60 and metrics["run_status"] == "FINISHED"
        assert len(metrics["history"]["loss"]) >= 20
        log = "\n".join(client.logs(job_id))
        assert '"model_uri"' in log  # the entrypoint's final summary
        _assert_plain_log(log, steps=60, every=2)
        transitions = [e["to_state"] for e in client.events(job_id) if e["to_state"]]
        assert transitions == ["PENDING", "VALIDATING", "QUEUED", "SUBMITTED", "RUNNING", "SUCCEEDED"]
    with Client(server.url, token="tok-beta") as other_team:
        assert other_team.models() == []  # beta sees no adapter of alpha's
        assert other_team.jobs()["items"] == []
    _assert_quiet_sample(final["model_uri"], Home(tmp_path).tracking_uri)


def _assert_quiet_sample(model_uri: str, tracking_uri: str) -> None:
    """`submit --wait --sample` (and so `make demo`) loads the registered model as a consumer does and prints only
    the platform's line: no library warning (shown here: -W default), progress bar or log line."""
    code = f"from tuneplane.cli.jobs import _sample; _sample({model_uri!r}, 'Is 41 even or odd?')"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]  # warnings, progress bars and library logs all go there
    assert done.stdout.startswith("sample: 'Is 41 even or odd?' -> "), done.stdout


def _assert_plain_log(log: str, steps: int, every: int) -> None:
    """The stored log has one line per event, in plain text: each logged step once, no terminal colour codes."""
    assert "\x1b[" not in log, "terminal escape codes in the stored log"
    step_lines = [
        line.split("[tuneplane] ", 1)[1] for line in log.splitlines() if "[tuneplane] step " in line
    ]
    numbers = [int(line.split()[1].split("/")[0]) for line in step_lines]
    assert sorted(numbers) == sorted(set(numbers)), f"step lines repeated: {numbers}"
    assert set(range(every, steps + 1, every)) <= set(numbers), numbers


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _running_in_group(pgid: int) -> list[str]:
    """Live members of a process group. Zombies are dead: this sandbox's init does not always reap orphans."""
    return [
        " ".join(p.info["cmdline"] or [])[:120]
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["status"] != psutil.STATUS_ZOMBIE and _pgid(p.pid) == pgid
    ]


def _ray_daemons() -> set[int]:
    found = set()
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        alive = p.info["status"] != psutil.STATUS_ZOMBIE
        if alive and (p.info["name"] in ("raylet", "gcs_server") or "ray/_private/workers" in cmd):
            found.add(p.pid)
    return found


def _assert_fenced(pgid: int, ray_pids: set[int], record: dict) -> None:
    """A running local job (issue #20): it runs under bubblewrap in a PID namespace of its own, its environment
    is the allow-list (nothing of the API's own), its Ray asks for a token of its own that no record shows, and
    every socket its processes listen on is loopback."""
    environ = psutil.Process(pgid).environ()  # the job's runner: what the backend gave the job
    group = [p for p in psutil.process_iter(["cmdline"]) if _pgid(p.pid) == pgid and p.info["cmdline"]]
    assert any(p.info["cmdline"][0] == "bwrap" for p in group), "the training process runs under bubblewrap"
    trainer = next(
        p for p in group if p.info["cmdline"][0] != "bwrap" and "tuneplane.train" in p.info["cmdline"]
    )
    status = Path(f"/proc/{trainer.pid}/status").read_text().splitlines()
    nspid = next(line for line in status if line.startswith("NSpid"))
    assert len(nspid.split()) == 3, nspid  # a pid here and one in its own namespace
    assert "TUNEPLANE_TEST_API_SECRET" not in environ and "TUNEPLANE_CONFIG" not in environ
    assert environ["RAY_AUTH_MODE"] == "token" and len(environ["RAY_AUTH_TOKEN"]) == 64
    assert environ["RAY_AUTH_TOKEN"] not in str(record)
    members = {p.pid for p in psutil.process_iter() if _pgid(p.pid) == pgid} | ray_pids
    assert ray_pids, "no Ray daemon of the job found"
    listening = set()
    for pid in members:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.add(conn.laddr.ip)
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_cancel_mid_run_stops_everything_and_marks_the_run_killed(
    server: Server, tmp_path: Path, tiny_dir: Path
) -> None:
    from mlflow import MlflowClient

    before = _ray_daemons()
    with Client(server.url, token="tok-alpha") as client:
        job_id = client.submit(quick_spec(tmp_path, tiny_dir, max_steps=100_000))["id"]
        wait_for(client, job_id, lambda j: j["state"] == "RUNNING")
        deadline = time.monotonic() + 240
        while (client.metrics(job_id).get("step") or 0) < 4 and time.monotonic() < deadline:
            time.sleep(1)
        pgid = int((tmp_path / "jobs" / job_id / "pid").read_text())
        _assert_fenced(pgid, _ray_daemons() - before, client.job(job_id))
        assert client.cancel(job_id)["cancel_requested"]
        final = client.wait(job_id, poll_s=1, timeout_s=120)
        assert final["state"] == "CANCELLED"
    deadline = time.monotonic() + 60
    while _running_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _running_in_group(pgid), (
        f"processes of the cancelled job are still running: {_running_in_group(pgid)}"
    )
    while _ray_daemons() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not (_ray_daemons() - before), "the job's Ray is still running"
    tracking = MlflowClient(Home(tmp_path).tracking_uri)
    runs = tracking.search_runs(
        [e.experiment_id for e in tracking.search_experiments()],
        filter_string=f"tags.`tuneplane.job_id` = '{job_id}'",
    )
    assert [r.info.status for r in runs] == ["KILLED"]
    log = (tmp_path / "jobs" / job_id / "train.log").read_text()
    # One line says so, and no traceback of the cancel follows (it once ended in `_Terminated`).
    assert "[tuneplane] cancelled" in log and "launcher.Cancelled" not in log, log[-3000:]


def test_the_demo_prints_only_the_platforms_lines(tmp_path: Path, tiny_dir: Path) -> None:
    """`make demo` as a new user runs it, on a fresh home (a shorter job): `validate`, then `demo` (the embedded
    API, the job followed to the end, a sample from the registered model). Every line is the platform's: no
    Python warning (with Python's default filters, as a user runs it), library log line, progress bar or
    traceback."""
    shutil.copytree(REPO / "jobs" / "data", tmp_path / "data")
    shutil.copytree(tiny_dir, tmp_path / "tiny")
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    spec["model"]["base"] = str(tmp_path / "tiny")
    spec["data"]["sources"] = [
        {**s, "uri": s["uri"].replace(str(REPO / "jobs" / "data"), "data")} for s in spec["data"]["sources"]
    ]
    spec["hyperparameters"].update(max_steps=4, warmup_steps=1)
    spec["eval"].update(zero_shot_sources=[], gate=None, lm_eval=None)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(spec))
    # A shell's MLflow (here: another test's) does not hold the demo's model: the demo samples from its own.
    env = {**os.environ, "TUNEPLANE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    env.pop("TUNEPLANE_CONFIG", None)
    cli = [sys.executable, "-m", "tuneplane.cli"]
    output = ""
    for args in (
        ["validate", "demo.yaml", "--max-records", "500"],
        ["demo", "demo.yaml", "--sample", "Is 41 even or odd?", "--port", str(free_port())],
    ):
        done = subprocess.run(
            [*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        output += done.stdout + done.stderr
    assert "SUCCEEDED" in output and "sample: 'Is 41 even or odd?' -> " in output, output[-3000:]
    noise = [
        line
        for line in output.splitlines()
        if any(mark in line for mark in ("Warning", " INFO ", "Traceback", "it/s]", "\x1b["))
    ]
    assert noise == [], noise
