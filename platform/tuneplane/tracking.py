"""MLflow: one run per job (attempts counted), the flattened spec as params, and the tuned adapter published
to the Model Registry as a pyfunc that consumers load with `mlflow.pyfunc.load_model("models:/NAME/VERSION")`.

The pyfunc carries the adapter and tokenizer (and the base weights when the base is a local folder, else the
base URI) and runs base + adapter through PEFT: `mlflow.transformers` with a PEFT model reloads wrong weights.
Publishing itself (gate, chat template, model card, registry) is `tuneplane.publish`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneplane.spec import TuningSpec, spec_hash

if TYPE_CHECKING:
    from tuneplane.publish import Published

JOB_TAG = "tuneplane.job_id"
ATTEMPTS_TAG = "tuneplane.attempts"
SPEC_HASH_TAG = "tuneplane.spec_hash"  # tuneplane.spec.spec_hash: the same value the job record holds
BASE_MODEL_TAG = "tuneplane.base_model"
PARENT_TAG = "tuneplane.parent_model"  # the registered adapter a job started from (`model.adapter`)
FINGERPRINT_TAG = "tuneplane.dataset_fingerprint"
GATE_TAG = "tuneplane.gate"  # passed | failed | none, on the run and on a registered version
GATE_FAILURES_TAG = "tuneplane.gate.failures"  # one failed condition a line, with the numbers
SCORE_TAG_PREFIX = "tuneplane.score."  # a version's headline scores: tuneplane.score.zero_shot/mean = 0.42
_PARAM_LIMIT = 6000


def dataset_fingerprint(spec: TuningSpec) -> str:
    """Hash of every source file's URI, size and version marker (ETag or mtime): changes when the data does."""
    from fsspec.core import url_to_fs

    from tuneplane.data.records import expand

    digest = hashlib.sha256()
    for source in list(spec.data.sources) + list(spec.data.eval_sources):
        for uri in expand(source.uri):
            fs, path = url_to_fs(uri)
            info = fs.info(path)
            version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
            digest.update(f"{uri}|{info.get('size')}|{version}\n".encode())
    return digest.hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}.{i}"))
    else:
        out[prefix] = json.dumps(value) if not isinstance(value, str) else value
    return {k: v[:_PARAM_LIMIT] for k, v in out.items()}


class JobRun:
    """A job's MLflow run and every write to it, behind four hooks (anchor: Ray Train v2's callbacks):

        start   (driver)  create the run, or reuse it on a later attempt and count the attempt
        report  (rank 0)  step metrics, params the workers learn (parameter counts)
        finish  (driver)  the gate, final metrics, the pyfunc model, the model card, the registry version (only
                          when the gate passes); the run ends FINISHED
        fail / kill       the run ends FAILED / KILLED

    A run ends once: the first end wins (a SIGTERM's KILLED is not overwritten by the FAILED that follows as the
    driver unwinds). Without a tracking URI every hook does nothing, so callers never check.
    """

    def __init__(self, tracking_uri: str | None = None, run_id: str | None = None, team: str | None = None):
        self.tracking_uri, self.run_id, self.team = tracking_uri, run_id, team
        self._ended = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.tracking_uri and self.run_id)

    @classmethod
    def start(
        cls,
        spec: TuningSpec,
        job_id: str,
        tracking_uri: str | None,
        artifact_root: str | None = None,
        team: str | None = None,
    ) -> JobRun:
        """The job's run, created on the first attempt and reused (attempt count raised) on every later one,
        in the team's experiment (`experiment_name`)."""
        if not tracking_uri:
            return cls()
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunStatus

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = _experiment(client, spec, team, artifact_root)
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            attempts = int(found[0].data.tags.get(ATTEMPTS_TAG, "1")) + 1
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            tags = {
                JOB_TAG: job_id,
                SPEC_HASH_TAG: spec_hash(spec),
                BASE_MODEL_TAG: spec.model.base,
                FINGERPRINT_TAG: dataset_fingerprint(spec),
                "tuneplane.method": spec.method.type,
            }
            run_id = client.create_run(experiment_id, run_name=job_id, tags=tags).info.run_id
            params = [Param(k, v) for k, v in flatten(spec.to_dict()).items()]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i : i + 100])
            attempts = 1
        client.set_tag(run_id, ATTEMPTS_TAG, str(attempts))
        return cls(tracking_uri, run_id, team)

    def report(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client().log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params learnt while running (identical on every attempt: MLflow refuses a changed value)."""
        if self.enabled:
            from mlflow.entities import Param

            batch = [Param(k, str(v)) for k, v in params.items()]
            self._client().log_batch(self.run_id, params=batch)

    def log_data_report(self, report: dict[str, Any]) -> None:
        """The preflight report (counts, bad records, lengths, trained-token share) as a run artifact."""
        if self.enabled:
            self._client().log_dict(self.run_id, report, "data/preflight.json")

    def finish(
        self,
        spec: TuningSpec,
        job_id: str,
        model_dir: Path,
        metrics: dict[str, Any],
        data_figures: dict[str, Any] | None = None,
    ) -> Published:
        """Check the gate, publish the tuned model (`tuneplane.publish`: registered only when the gate passes)
        and end the run FINISHED. Without tracking the gate is still checked: the verdict is the driver's too."""
        from tuneplane import gate
        from tuneplane.publish import Published, publish

        if self.enabled:
            assert self.tracking_uri and self.run_id
            published = publish(
                spec, job_id, self.run_id, model_dir, self.tracking_uri, metrics, self.team, data_figures
            )
        else:
            published = Published(None, gate.check(spec.eval.gate, metrics))
        self._end("FINISHED")
        return published

    def fail(self) -> None:
        self._end("FAILED")

    def kill(self) -> None:
        self._end("KILLED")

    def _end(self, status: str) -> None:
        if self._ended.acquire(blocking=False) and self.enabled:
            self._client().set_terminated(self.run_id, status=status)

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


def experiment_name(spec: TuningSpec, team: str | None) -> str:
    """A job's MLflow experiment, `<team>/<name>` (the spec's `tracking.experiment`, else its name): one MLflow
    serves every team, and a team's names live under its own prefix, so no team can write into another team's
    experiment. A run outside the platform (no team) uses the name as it is."""
    name = spec.tracking.experiment or spec.name
    return f"{team}/{name}" if team else name


def registered_model_name(spec: TuningSpec, team: str | None) -> str | None:
    """Where a job registers its model: `<team>.<tracking.registered_model_name>`. Consumers load
    `models:/<team>.<name>/<version>` trusting the team in the name; no other team can publish a version there."""
    name = spec.tracking.registered_model_name
    return f"{team}.{name}" if name and team else name


def _experiment(client: Any, spec: TuningSpec, team: str | None, artifact_root: str | None) -> str:
    name = experiment_name(spec, team)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    # An absolute artifact location: otherwise artifacts land in whatever cwd a Ray worker has. Names are never
    # paths of their own (spec validation; team names are DNS labels), so it stays under the root.
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    return str(client.create_experiment(name, artifact_location=location))


def claim_names(tracking_uri: str, spec: TuningSpec, team: str, artifact_root: str | None) -> None:
    """With MLflow's authentication on (`tracking_auth`), as its admin before a job starts: create the job's
    experiment and registered model if missing, give `team` MANAGE on them and no other team anything (see
    mlflow_auth.py). Creating them here leaves no name for another team's job to take first."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tuneplane.mlflow_auth import claim

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment(client, spec, team, artifact_root)
    model = registered_model_name(spec, team)
    if model:
        try:
            client.create_registered_model(model)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    claim(tracking_uri, team, experiment_id, model)


# -- read side: what the control plane shows about a job (the API writes to MLflow only in claim_names) -----


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
