"""The `tuneplane` job commands against a real API server (uvicorn on a loopback port, SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.support.config import REPO, free_port
from tests.support.live import api_in_thread
from tuneplane.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with api_in_thread(tmp_path_factory.mktemp("cli-home")) as url:
        yield url


def cli(url: str, *args: str, token: str = "tok-alpha"):
    return runner.invoke(
        app, list(args), env={"TUNEPLANE_URL": url, "TUNEPLANE_TOKEN": token, "COLUMNS": "200"}
    )


def test_submit_list_status_cancel(api_url: str) -> None:
    out = cli(api_url, "submit", str(REPO / "jobs" / "tiny-cpu.yaml"))
    assert out.exit_code == 0, out.output
    job_id = out.output.split("submitted ")[1].split()[0]
    listed = cli(api_url, "jobs")
    assert job_id in listed.output and "PENDING" in listed.output
    status = cli(api_url, "status", job_id)
    assert status.exit_code == 0 and "state=PENDING" in status.output and "-> PENDING" in status.output
    cancelled = cli(api_url, "cancel", job_id)
    assert cancelled.exit_code == 0 and f"{job_id}: CANCELLED" in cancelled.output
    assert job_id not in cli(api_url, "jobs", token="tok-beta").output  # another team's list


def test_bad_spec_and_unknown_job_give_clear_errors(api_url: str, tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "jobs" / "tiny-cpu.yaml").read_text())
    spec["distributed"]["gpu_pool"] = "h100"
    spec["distributed"]["gpus_per_worker"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(spec)
        .replace("../build", str(REPO / "build"))
        .replace("data/", f"{REPO}/jobs/data/")
        .replace("tasks_dir: evals", f"tasks_dir: {REPO}/jobs/evals")
    )
    out = cli(api_url, "submit", str(bad), token="tok-beta")  # beta may not use the h100 pool
    assert out.exit_code == 2, out.output
    assert "distributed.gpu_pool: team beta may not use pool 'h100'" in out.output
    assert "Traceback" not in out.output
    missing = cli(api_url, "status", "no-such-job")
    assert missing.exit_code == 1 and "404 not found" in missing.output


def test_unreachable_api_is_one_line_not_a_traceback() -> None:
    out = cli(f"http://127.0.0.1:{free_port()}", "jobs")
    assert out.exit_code == 1 and "cannot reach the API" in out.output and "Traceback" not in out.output


def test_token_command_prints_a_config_entry_matching_the_token() -> None:
    from tuneplane.config import hash_token

    out = runner.invoke(app, ["token", "--team", "alpha"])
    token = out.output.split("it is not stored): ")[1].split()[0]
    assert f"sha256: {hash_token(token)}, team: alpha, role: member" in out.output


def test_config_check_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "platform.yaml"
    bad.write_text(
        yaml.safe_dump({"teams": [{"name": "a", "quota": {"max_gpus": -1}, "gpu_pools": ["h100"]}]})
    )
    out = runner.invoke(app, ["config", "check", str(bad)])
    assert out.exit_code == 2 and "teams.0.quota.max_gpus" in out.output and "Traceback" not in out.output
    # Several teams on the local backend must say which folders they may read (issue 20).
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump({"teams": [{"name": "a"}, {"name": "b"}]}))
    out = runner.invoke(app, ["config", "check", str(shared)])
    assert out.exit_code == 2 and "data_roots" in out.output and "Traceback" not in out.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"teams": [{"name": "a"}, {"name": "b"}], "data_roots": [str(tmp_path)]}))
    out = runner.invoke(app, ["config", "check", str(good)])
    assert out.exit_code == 0 and "teams a, b" in out.output
    # The backend is one section tagged by its type; the older top-level sections get a message saying so.
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"backend": "kuberay", "kuberay": {"image": "runtime:1"}}))
    out = runner.invoke(app, ["config", "check", str(old)])
    assert out.exit_code == 2 and "backend: {type: kuberay, ...}" in out.output, out.output
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(yaml.safe_dump({"backend": {"type": "kuberay", "image": "runtime:1"}}))
    assert runner.invoke(app, ["config", "check", str(tagged)]).exit_code == 0
    schema = runner.invoke(app, ["config", "schema"])
    assert '"gpu_pools"' in schema.output


@pytest.mark.parametrize(
    ("latest", "line"),
    [
        ({}, "loss -"),
        ({"loss": 1.23456, "learning_rate": 1e-4}, "loss 1.2346"),
        (
            {"loss": 0.5, "rewards/accuracy": 0.875, "rewards/margin": 0.1234, "rewards/chosen": 0.2},
            "loss 0.5000  reward acc 0.88  margin 0.123",
        ),
    ],
)
def test_the_progress_line_shows_preference_rewards_next_to_the_loss(latest: dict, line: str) -> None:
    from tuneplane.cli.jobs import step_figures

    assert step_figures(latest) == line
