"""The job's MLflow run and every write a job makes to it: the driver starts and ends it, rank 0 reports to it.

The pyfunc model, the card and the registry version are written by `tuneplane.publishing` in the run before the
driver ends it (`finish`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

from tuneplane.spec import TuningSpec, spec_hash
from tuneplane.tracking.tags import (
    ATTEMPTS_TAG,
    BASE_MODEL_TAG,
    FINGERPRINT_TAG,
    JOB_TAG,
    METHOD_TAG,
    SPEC_HASH_TAG,
    experiment_name,
)

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
        finish  (driver)  the run ends FINISHED, after `publishing.publish` wrote the gate, final metrics, the
                          pyfunc model, the card and the registry version into it
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
        experiment_id = ensure_experiment(client, spec, team, artifact_root)
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
                METHOD_TAG: spec.method.type,
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

    def finish(self) -> None:
        """The run ends FINISHED: the driver calls it once the result is published (`tuneplane.publishing`)."""
        self._end("FINISHED")

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


def ensure_experiment(client: Any, spec: TuningSpec, team: str | None, artifact_root: str | None) -> str:
    name = experiment_name(spec, team)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    # An absolute artifact location: otherwise artifacts land in whatever cwd a Ray worker has. Names are never
    # paths of their own (spec validation; team names are DNS labels), so it stays under the root.
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    return str(client.create_experiment(name, artifact_location=location))
