"""MLflow's own authentication (issue #20): one MLflow user per team, made by the platform, with permissions on
its own experiments and registered models only; a job logs as its team. Against a real `mlflow server --app-name
basic-auth` (default permission NO_PERMISSIONS, as the chart runs it): what team beta's job may not do to team
alpha's names is refused by MLflow itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.support.backends import RecordingBackend
from tests.support.config import REPO
from tests.support.mlflow_server import ADMIN, mlflow_server
from tests.support.tenants import ALPHA, confined_config, spec_reading
from tuneplane.spec import parse_spec
from tuneplane.tracking import auth as mlflow_auth
from tuneplane.tracking.registry import claim_names
from tuneplane.tracking.run import JobRun
from tuneplane.tracking.tags import experiment_name

ADMIN_ENV = {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), auth=True) as url:
        yield url


@pytest.fixture
def as_admin(monkeypatch: pytest.MonkeyPatch, server: str) -> str:
    for key, value in ADMIN_ENV.items():
        monkeypatch.setenv(key, value)
    mlflow_auth.ensure_users(server, ["alpha", "beta"])
    return server


def _as(team: str, monkeypatch: pytest.MonkeyPatch, url: str) -> MlflowClient:
    """A client with the credentials the platform gives a job of `team` (MLflow reads them per request)."""
    for key, value in mlflow_auth.job_env(team, ADMIN_ENV).items():
        monkeypatch.setenv(key, value)
    return MlflowClient(tracking_uri=url)


def _refused(call) -> None:
    with pytest.raises(MlflowException) as caught:
        call()
    assert "403" in str(caught.value) or "PERMISSION_DENIED" in str(caught.value), caught.value


def _spec(name: str, model: str | None):
    spec = spec_reading(str(REPO / "jobs" / "data" / "tasks-alpaca.jsonl"))
    spec["name"] = name
    spec["tracking"] = {"registered_model_name": model} if model else {}
    return parse_spec(spec)


def test_a_team_writes_only_its_own_experiments_and_models(as_admin: str, monkeypatch) -> None:
    url = as_admin
    spec = _spec("tiny", "tiny-adapter")
    claim_names(url, spec, "alpha", None)  # what the reconciler does before handing the job over
    alpha = _as("alpha", monkeypatch, url)
    run = JobRun.start(spec, "tiny-1", url, team="alpha")  # the job's own tracking code, as alpha
    run.report({"loss": 1.0}, step=1)
    experiment = alpha.get_experiment_by_name(experiment_name(spec, "alpha"))
    assert experiment is not None
    source = f"runs:/{run.run_id}/model"
    version = alpha.create_model_version("alpha.tiny-adapter", source=source, run_id=run.run_id)
    assert version.version == "1"

    beta = _as("beta", monkeypatch, url)
    _refused(lambda: beta.create_run(experiment.experiment_id))
    _refused(lambda: beta.log_metric(run.run_id, "loss", 9.0))
    _refused(lambda: beta.set_tag(run.run_id, "tuneplane.publishing.gate", "passed"))
    _refused(lambda: beta.create_model_version("alpha.tiny-adapter", source=source, run_id=run.run_id))
    _refused(lambda: beta.get_experiment(experiment.experiment_id))
    _refused(lambda: beta.get_registered_model("alpha.tiny-adapter"))
    assert experiment_name(spec, "alpha") not in [e.name for e in beta.search_experiments()]
    # Nothing beta tried changed alpha's run.
    admin = MlflowClient(tracking_uri=url)
    for key, value in ADMIN_ENV.items():
        monkeypatch.setenv(key, value)
    assert [m.value for m in admin.get_metric_history(run.run_id, "loss")] == [1.0]
    assert [v.version for v in admin.search_model_versions("name='alpha.tiny-adapter'")] == ["1"]


def test_a_name_another_team_took_first_is_taken_back(as_admin: str, monkeypatch) -> None:
    url = as_admin
    beta = _as("beta", monkeypatch, url)
    squatted = beta.create_experiment("alpha/later")  # a name alpha has not used yet
    beta.create_registered_model("alpha.later-adapter")
    for key, value in ADMIN_ENV.items():
        monkeypatch.setenv(key, value)
    claim_names(url, _spec("later", "later-adapter"), "alpha", None)
    beta = _as("beta", monkeypatch, url)
    _refused(lambda: beta.create_run(squatted))
    _refused(lambda: beta.create_model_version("alpha.later-adapter", source="runs:/0/model"))
    alpha = _as("alpha", monkeypatch, url)
    assert alpha.create_run(squatted).info.experiment_id == squatted


def test_jobs_get_their_teams_user_never_the_admin(tenants: dict[str, Path], as_admin: str) -> None:
    from tuneplane.backends.base import BackendJob
    from tuneplane.backends.local import job_environment

    config = confined_config(tenants, tracking_uri=as_admin, tracking_auth=True)
    job = BackendJob(id="j1", team="beta", namespace="beta", spec=_spec("tiny", None))
    env = job_environment(config, job, {"PATH": "/usr/bin", **ADMIN_ENV})
    assert env["MLFLOW_TRACKING_USERNAME"] == "tuneplane-beta"
    assert env["MLFLOW_TRACKING_PASSWORD"] == mlflow_auth.team_password("beta", ADMIN_ENV)
    assert ADMIN[1] not in env.values()


def test_the_reconciler_claims_a_jobs_names_before_it_starts(
    tenants: dict[str, Path], as_admin: str, monkeypatch
) -> None:
    from fastapi.testclient import TestClient

    from tuneplane.api import create_app

    url = as_admin
    backend = RecordingBackend()
    config = confined_config(tenants, tracking_uri=url, tracking_auth=True, validate_data=False)
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"))
    spec["name"], spec["tracking"] = "via-api", {"registered_model_name": "via-api-adapter"}
    with TestClient(create_app(config, backend=backend, run_reconciler=False)) as api:
        job_id = api.post("/v1/jobs", json=spec, headers=ALPHA).json()["id"]
        reconciler = api.app.state.services.reconciler
        for _ in range(5):
            reconciler.run_once()
            if backend.submits:
                break
    assert list(backend.submits) == [job_id]
    alpha = _as("alpha", monkeypatch, url)
    experiment = alpha.get_experiment_by_name("alpha/via-api")
    assert experiment is not None and alpha.get_registered_model("alpha.via-api-adapter")
    beta = _as("beta", monkeypatch, url)
    _refused(lambda: beta.create_run(experiment.experiment_id))


def test_tracking_auth_needs_a_server_and_the_admins_credentials(
    tenants: dict[str, Path], monkeypatch
) -> None:
    from tuneplane.errors import ConfigError

    with pytest.raises(ConfigError, match="needs an MLflow tracking server"):
        confined_config(tenants, tracking_auth=True)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    with pytest.raises(mlflow_auth.TrackingAuthError, match="MLFLOW_TRACKING_PASSWORD"):
        mlflow_auth.job_env("alpha")
