"""MLflow: one run per job (attempts counted), the flattened spec as params, and the tuned adapter published
to the Model Registry as a pyfunc that consumers load with `mlflow.pyfunc.load_model("models:/NAME/VERSION")`.

The pyfunc carries the adapter and tokenizer (and the base weights when the base is a local folder, else the
base URI) and runs base + adapter through PEFT: `mlflow.transformers` with a PEFT model reloads wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from tuneplane.spec import TuningSpec, is_local_path

JOB_TAG = "tuneplane.job_id"
ATTEMPTS_TAG = "tuneplane.attempts"
_PARAM_LIMIT = 6000


def spec_hash(spec: TuningSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


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


def start_job_run(spec: TuningSpec, job_id: str, tracking_uri: str, artifact_root: str | None = None) -> str:
    """The job's run, created on the first attempt and reused (attempt count raised) on every later one."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunStatus

    client = MlflowClient(tracking_uri=tracking_uri)
    name = spec.tracking.experiment or spec.name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # An absolute artifact location: otherwise artifacts land in whatever cwd a Ray worker has.
        location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        attempts = int(found[0].data.tags.get(ATTEMPTS_TAG, "1")) + 1
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    else:
        tags = {
            JOB_TAG: job_id,
            "tuneplane.spec_hash": spec_hash(spec),
            "tuneplane.base_model": spec.model.base,
            "tuneplane.dataset_fingerprint": dataset_fingerprint(spec),
            "tuneplane.method": spec.method.type,
        }
        run_id = client.create_run(experiment_id, run_name=job_id, tags=tags).info.run_id
        params = [Param(k, v) for k, v in flatten(spec.to_dict()).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        attempts = 1
    client.set_tag(run_id, ATTEMPTS_TAG, str(attempts))
    return run_id


def log_data_report(tracking_uri: str, run_id: str, report: dict[str, Any]) -> None:
    """The preflight report (counts, bad records, lengths, trained-token share) as a run artifact."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).log_dict(run_id, report, "data/preflight.json")


def end_job_run(tracking_uri: str, run_id: str, status: str) -> None:
    """status: FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)


def publish_model(
    spec: TuningSpec, job_id: str, run_id: str, model_dir: Path, tracking_uri: str, metrics: dict[str, float]
) -> str | None:
    """Log the tuned model as a pyfunc in the job's run and register it; returns `models:/NAME/VERSION`."""
    import mlflow

    from tuneplane import pyfunc_model

    mlflow.set_tracking_uri(tracking_uri)
    name = spec.tracking.registered_model_name
    if name:  # a re-run of a finished job publishes nothing new
        existing = mlflow.MlflowClient().search_model_versions(
            f"name = '{name}' and tags.`{JOB_TAG}` = '{job_id}'"
        )
        if existing:
            return f"models:/{name}/{existing[0].version}"
    artifacts = {"model": str(model_dir)}
    model_config = {
        "template": spec.data.template,
        "system_prompt": spec.data.system_prompt or "",
        "base_uri": spec.model.base,
        "max_new_tokens": spec.eval.max_new_tokens,
    }
    is_adapter = (model_dir / "adapter_config.json").exists()
    if is_adapter and is_local_path(spec.model.base) and Path(spec.model.base).is_dir():
        artifacts["base"] = (
            spec.model.base
        )  # the embedded default: ship the base so the model is self-contained
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if spec.tracking.export_merged and is_adapter:
            with tempfile.TemporaryDirectory() as merged:
                _merge(artifacts.get("base") or spec.model.base, model_dir, Path(merged))
                mlflow.log_artifacts(merged, "merged")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.AdapterModel(),
            artifacts=artifacts,
            model_config=model_config,
            pip_requirements=["tuneplane", "torch", "transformers", "peft"],
        )
    if not name:
        return None
    # Tagged on the run when it was created: listing every data file again here would repeat that I/O.
    run_tags = mlflow.MlflowClient().get_run(run_id).data.tags
    version = mlflow.register_model(
        info.model_uri,
        name,
        tags={
            JOB_TAG: job_id,
            "tuneplane.base_model": spec.model.base,
            "tuneplane.spec_hash": run_tags["tuneplane.spec_hash"],
            "tuneplane.dataset_fingerprint": run_tags["tuneplane.dataset_fingerprint"],
        },
    )
    return f"models:/{name}/{version.version}"


def _merge(base: str, adapter_dir: Path, out: Path) -> None:
    """Base + adapter folded into plain weights: loadable without PEFT (vLLM, TGI, transformers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneplane.pretrained import local_copy

    model = AutoModelForCausalLM.from_pretrained(str(local_copy(base)) if "://" in base else base)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out))


# -- read side: what the control plane shows about a job (the API never writes to MLflow) ---------------------


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
                "base_model": version.tags.get("tuneplane.base_model"),
                "spec_hash": version.tags.get("tuneplane.spec_hash"),
                "created_at": version.creation_timestamp,
            }
        )
    return sorted(out, key=lambda v: (v["name"], v["version"]))
