"""The control plane's side of MLflow: what a job logged and registered (read), and, with MLflow's
authentication on, claiming a job's experiment and model name for its team before it starts (the API's only
write)."""

from __future__ import annotations

from typing import Any

from tuneplane.spec import TuningSpec
from tuneplane.tracking.run import ensure_experiment
from tuneplane.tracking.tags import (
    BASE_MODEL_TAG,
    GATE_FAILURES_TAG,
    GATE_TAG,
    JOB_TAG,
    SCORE_TAG_PREFIX,
    SPEC_HASH_TAG,
    registered_model_name,
)


def claim_names(tracking_uri: str, spec: TuningSpec, team: str, artifact_root: str | None) -> None:
    """With MLflow's authentication on (`tracking_auth`), as its admin before a job starts: create the job's
    experiment and registered model if missing, give `team` MANAGE on them and no other team anything (see
    tracking/auth.py). Creating them here leaves no name for another team's job to take first."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tuneplane.tracking.auth import claim

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = ensure_experiment(client, spec, team, artifact_root)
    model = registered_model_name(spec, team)
    if model:
        try:
            client.create_registered_model(model)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    claim(tracking_uri, team, experiment_id, model)


# -- read side: what the control plane shows about a job ------------------------------------------------------


def find_job_run(tracking_uri: str, job_id: str) -> Any | None:
    """The MLflow run of a job, in whichever experiment its spec named; None before training started."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return None
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1)
    return runs[0] if runs else None


def job_metrics(tracking_uri: str, job_id: str, history: bool = True) -> dict[str, Any]:
    """Latest value of every metric, and with history each metric's (step, value) series."""
    from mlflow import MlflowClient

    run = find_job_run(tracking_uri, job_id)
    if run is None:
        return {"run_id": None, "status": None, "step": None, "latest": {}, "history": {}}
    client = MlflowClient(tracking_uri=tracking_uri)
    # The loss series is read even without history: its last step is the job's progress.
    keys = list(run.data.metrics) if history else [k for k in run.data.metrics if k == "loss"]
    series = {
        key: [{"step": m.step, "value": m.value} for m in client.get_metric_history(run.info.run_id, key)]
        for key in keys
    }
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "step": max((p["step"] for p in series.get("loss", [])), default=None),
        "latest": dict(run.data.metrics),
        "history": series if history else {},
    }


def gate_verdict(tracking_uri: str, job_id: str) -> dict[str, Any] | None:
    """What the job's gate decided, from its run's tags: {status: passed|failed|none, failures: [...]};
    None before the job published (no run, or a run that has not finished)."""
    run = find_job_run(tracking_uri, job_id)
    status = run.data.tags.get(GATE_TAG) if run is not None else None
    if run is None or status is None:
        return None
    failures = [line for line in run.data.tags.get(GATE_FAILURES_TAG, "").split("\n") if line]
    return {"status": status, "passed": status != "failed", "failures": failures, "run_id": run.info.run_id}


def model_versions(tracking_uri: str, job_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Registered versions published by Tuneplane jobs (optionally only those of the given jobs)."""
    from mlflow import MlflowClient

    if job_ids is not None and not job_ids:
        return []
    client = MlflowClient(tracking_uri=tracking_uri)
    # One job (the reconciler asking for its model): let the registry filter instead of listing every version.
    only = (
        f"tags.`{JOB_TAG}` = '{next(iter(job_ids))}'" if job_ids is not None and len(job_ids) == 1 else None
    )
    out = []
    for version in client.search_model_versions(filter_string=only, max_results=10_000):
        job_id = version.tags.get(JOB_TAG)
        if job_id is None or (job_ids is not None and job_id not in job_ids):
            continue
        out.append(
            {
                "name": version.name,
                "version": int(version.version),
                "uri": f"models:/{version.name}/{version.version}",
                "job_id": job_id,
                "run_id": version.run_id,
                "base_model": version.tags.get(BASE_MODEL_TAG),
                "spec_hash": version.tags.get(SPEC_HASH_TAG),
                "created_at": version.creation_timestamp,
                "gate": version.tags.get(GATE_TAG),  # None: registered before gates existed
                "scores": _scores(version.tags),
            }
        )
    return sorted(out, key=lambda v: (v["name"], v["version"]))


def _scores(tags: dict[str, str]) -> dict[str, float]:
    """A version's headline scores, from the tags publishing wrote (read with the version: no call per run)."""
    out = {}
    for key, value in tags.items():
        if key.startswith(SCORE_TAG_PREFIX):
            try:
                out[key.removeprefix(SCORE_TAG_PREFIX)] = float(value)
            except ValueError:  # a hand-edited tag: show the rest
                continue
    return out
