"""KubeRay backend: one `ray.io/v1` RayJob (plus a ConfigMap holding the spec and a NetworkPolicy) per job.

Rendering is pure (`render_configmap`, `render_rayjob`: job + config -> manifest dict) so manifests can be
validated and policy-checked without a cluster; `KubeRayBackend` only sends them and reads them back.

Security choices made here, in one place:
- the command is fixed (`python -m tuneplane.train --spec <mounted file>`); nothing from the spec reaches a
  command line, the spec travels as data in a ConfigMap;
- credentials only as `secretKeyRef`s named by the platform config, never as literal values;
- every container runs with the "restricted" Pod Security Standard settings;
- each job's Ray cluster requires a token (KubeRay makes it) and has its own NetworkPolicy (kuberay_network.py);
- error messages carry the object and the HTTP status/reason, never a request or response body.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from tuneplane.backends.base import BackendJob, RunPhase, RunStatus
from tuneplane.backends.capabilities import KUBERAY_ID_LENGTH, capabilities
from tuneplane.backends.kuberay_network import JOB_ID_LABEL, job_network_policy, network_policy_name
from tuneplane.backends.kuberay_pods import PodGroup, node_groups
from tuneplane.config import GpuPool, PlatformConfig
from tuneplane.config.kuberay import KubeRayBackend as KubeRaySettings
from tuneplane.config.kuberay import SecretRef
from tuneplane.errors import BackendError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
SPEC_DIR = "/etc/tuneplane/spec"
SPEC_KEY = "spec.yaml"
ENTRYPOINT = f"python -m tuneplane.train --spec {SPEC_DIR}/{SPEC_KEY}"
MANAGED_BY = "app.kubernetes.io/managed-by"
SUBMITTER = "ray-job-submitter"
# Ray images run as uid 1000; kubelet can only enforce runAsNonRoot for a numeric user, so state it.
RUN_AS_USER = 1000

_RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def settings(config: PlatformConfig) -> KubeRaySettings:
    """The config's KubeRay section; a BackendError when the platform runs another backend."""
    if config.kuberay is None:
        raise BackendError(f"the platform config's backend is {config.backend.type}, not kuberay")
    return config.kuberay


def spec_configmap_name(job: BackendJob) -> str:
    return f"{job.id}-spec"


def labels_for(job: BackendJob, config: PlatformConfig) -> dict[str, str]:
    # Operator-supplied labels first: ours must win, the watch selector depends on managed-by.
    return {
        **settings(config).labels,
        "app.kubernetes.io/name": "tuneplane",
        MANAGED_BY: "tuneplane",
        JOB_ID_LABEL: job.id,
        "tuneplane.io/team": job.team,
    }


def render_configmap(job: BackendJob, config: PlatformConfig) -> dict[str, Any]:
    """The spec as data: mounted read-only into the head and the workers at SPEC_DIR."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": spec_configmap_name(job),
            "namespace": job.namespace,
            "labels": labels_for(job, config),
        },
        "data": {SPEC_KEY: yaml.safe_dump(job.spec.to_dict(), sort_keys=False)},
    }


def render_network_policy(job: BackendJob, config: PlatformConfig) -> dict[str, Any]:
    """The job's NetworkPolicy (see kuberay_network.py)."""
    return job_network_policy(job, settings(config).network_policy, labels_for(job, config))


def _cpu(value: float) -> str:
    # Kubernetes quantities: whole cores as "8", fractions in millicores ("500m").
    return str(int(value)) if float(value).is_integer() else f"{math.ceil(value * 1000)}m"


def _gpu_pool(job: BackendJob, config: PlatformConfig) -> GpuPool | None:
    name = job.gpu_pool or job.spec.distributed.gpu_pool
    if name is None:
        return None
    if name not in config.gpu_pools:
        raise BackendError(f"job {job.id}: GPU pool '{name}' is not defined in the platform config")
    return config.gpu_pools[name]


def _env(job: BackendJob, config: PlatformConfig) -> list[dict[str, Any]]:
    kr = settings(config)
    env: list[dict[str, Any]] = [
        {"name": "TUNEPLANE_JOB_ID", "value": job.id},
        {"name": "TUNEPLANE_TEAM", "value": job.team},
        {"name": "TUNEPLANE_STORAGE_PATH", "value": kr.storage_path},
        {"name": "MLFLOW_TRACKING_URI", "value": kr.tracking_uri},
    ]
    if kr.artifact_root:
        env.append({"name": "TUNEPLANE_ARTIFACT_ROOT", "value": kr.artifact_root})
    pool = _gpu_pool(job, config)
    if pool and pool.accelerator_type:  # Ray Train places workers only on nodes of this accelerator type
        env.append({"name": "TUNEPLANE_ACCELERATOR_TYPE", "value": pool.accelerator_type})
    # Credentials are resolved by the kubelet from Secrets: the manifest only names them.
    secrets = sorted(kr.storage_env.items())
    if config.tracking_auth and kr.tracking_secret:  # the team's own MLflow user (tracking/auth.py)
        secrets += [
            ("MLFLOW_TRACKING_USERNAME", SecretRef(name=kr.tracking_secret, key="username")),
            ("MLFLOW_TRACKING_PASSWORD", SecretRef(name=kr.tracking_secret, key="password")),
        ]
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        for name, ref in secrets
    ]
    return env


def _resources(requests: dict[str, str], **extended: str) -> dict[str, Any]:
    # Limits equal requests (Ray sizes itself from the limits); extended resources (GPUs) are limits only.
    return {"requests": requests, "limits": {**requests, **extended}}


def _pod_template(
    job: BackendJob, config: PlatformConfig, container: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    kr = settings(config)
    container = {"image": kr.image, "imagePullPolicy": kr.image_pull_policy, **container}
    container["securityContext"] = copy.deepcopy(_RESTRICTED)  # no shared sub-dicts between containers
    pod: dict[str, Any] = {
        # Ray needs no Kubernetes API access (no autoscaler): do not hand the job a token.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        **spec,
    }
    if kr.service_account:
        pod["serviceAccountName"] = kr.service_account
    return {"metadata": {"labels": labels_for(job, config)}, "spec": pod}


def _ray_pod(
    job: BackendJob, config: PlatformConfig, name: str, resources: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    """Head or worker pod: the job's environment, the spec mounted read-only, /dev/shm in memory."""
    container = {
        "name": name,
        "env": _env(job, config),
        "resources": resources,
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    volumes = [
        {"name": "spec", "configMap": {"name": spec_configmap_name(job)}},
        # NCCL and torch use /dev/shm for intra-node transfers; the container default (64 MiB) is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    return _pod_template(job, config, container, volumes=volumes, **spec)


def _worker_groups(job: BackendJob, config: PlatformConfig) -> list[dict[str, Any]]:
    """The workerGroupSpecs: one group per pod shape of the job's packing (kuberay_pods.node_groups)."""
    dist, pool = job.spec.distributed, _gpu_pool(job, config)
    try:
        groups = node_groups(dist, pool)
    except ValueError as exc:
        raise BackendError(f"job {job.id}: {exc}") from None
    placement: dict[str, Any] = {}
    if pool:
        placement["nodeSelector"] = dict(pool.node_selector)
        placement["tolerations"] = [t.model_dump(exclude_none=True) for t in pool.tolerations]
    gpu_resource = pool.resource_name if pool else "nvidia.com/gpu"
    return [_worker_group(job, config, group, gpu_resource, placement) for group in groups]


def _worker_group(
    job: BackendJob, config: PlatformConfig, group: PodGroup, gpu_resource: str, placement: dict[str, Any]
) -> dict[str, Any]:
    requests = {"cpu": _cpu(group.cpus)}
    if group.memory:
        requests["memory"] = group.memory
    gpus: dict[str, str] = {}
    params: dict[str, str] = {}
    if group.gpus:
        gpus[gpu_resource] = str(group.gpus)
        # Ray only auto-detects nvidia.com/gpu; state the count so other resource names work too.
        params["num-gpus"] = str(group.gpus)
    if group.node_sized:  # a node-sized pod says what it holds; a one-worker pod lets Ray read its limits
        params["num-cpus"] = group.ray_cpus
    return {
        "groupName": group.name,
        "replicas": group.replicas,
        "minReplicas": group.replicas,
        "maxReplicas": group.replicas,
        "rayStartParams": params,
        "template": _ray_pod(job, config, "ray-worker", _resources(requests, **gpus), **placement),
    }


def render_rayjob(job: BackendJob, config: PlatformConfig) -> dict[str, Any]:
    """The RayJob for a job: a fresh Ray cluster (a head without GPU, and the job's worker groups: one pod per
    worker, or one per node when the pool states its node shape) that runs the fixed entrypoint."""
    # KubeRay's own limit (capabilities.py): failing at submit gives the caller a clearer error than KubeRay's.
    if len(job.id) > KUBERAY_ID_LENGTH:
        raise BackendError(
            f"job id '{job.id}' is longer than the {KUBERAY_ID_LENGTH} characters KubeRay accepts"
        )
    kr = settings(config)
    submitter = {"name": SUBMITTER, "resources": _resources({"cpu": "1", "memory": "1Gi"})}

    spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": kr.ttl_seconds_after_finished,
        "backoffLimit": kr.backoff_limit,
        "activeDeadlineSeconds": config.max_job_duration_s,
        # Without a template KubeRay builds the submitter pod with no security context: give it one.
        "submitterPodTemplate": _pod_template(job, config, submitter, restartPolicy="Never"),
        "rayClusterSpec": {
            "rayVersion": kr.ray_version,
            "enableInTreeAutoscaling": False,
            # Ray token auth (Ray >= 2.52). With no secretName KubeRay creates a Secret with a random token per
            # RayCluster (deleted with it) and adds RAY_AUTH_MODE and RAY_AUTH_TOKEN (a secretKeyRef) to the
            # head, the workers and the K8sJobMode submitter (KubeRay rayjob_controller.go, in
            # configureSubmitterContainer: common.SetContainerTokenAuthEnvVars; docs.ray.io, "Configure Ray
            # clusters to use token authentication"). The token never passes through Tuneplane.
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                # The dashboard must listen on the pod network: the KubeRay operator polls job status
                # there and the K8sJobMode submitter submits through it (binding 127.0.0.1 breaks both).
                # It stays inside the cluster (ClusterIP service, no ingress), answers only with the token,
                # and the job's NetworkPolicy admits only the job's pods, the operator and the API.
                "serviceType": "ClusterIP",
                "enableIngress": False,
                # num-cpus 0: Ray schedules no training task on the head.
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                "template": _ray_pod(
                    job, config, "ray-head", _resources({"cpu": kr.head_cpu, "memory": kr.head_memory})
                ),
            },
            "workerGroupSpecs": _worker_groups(job, config),
        },
    }
    labels = labels_for(job, config)
    if kr.kueue.enabled:
        labels["kueue.x-k8s.io/queue-name"] = kr.kueue.queue_name.replace("{team}", job.team)
        spec["suspend"] = True  # Kueue admits (unsuspends) the job when the team's queue has quota
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {"name": job.id, "namespace": job.namespace, "labels": labels},
        "spec": spec,
    }


_TERMINAL = {"SUCCEEDED": RunPhase.SUCCEEDED, "FAILED": RunPhase.FAILED, "STOPPED": RunPhase.STOPPED}


def rayjob_status(obj: dict[str, Any]) -> RunStatus:
    """Map a RayJob's `.status` to a RunStatus. Only a terminal jobDeploymentStatus ends a run: during
    `Running` a FAILED jobStatus may still be retried (backoffLimit)."""
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or ""
    job_status = status.get("jobStatus") or ""
    message = status.get("message") or status.get("reason") or ""
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        phase = RunPhase.STOPPED
    elif deployment == "Complete":
        phase = _TERMINAL.get(job_status, RunPhase.SUCCEEDED)
    elif deployment in ("Failed", "ValidationFailed"):
        phase = RunPhase.FAILED
    elif deployment in ("Running", "Retrying"):
        phase = RunPhase.RUNNING
    else:  # "", New, Initializing, Waiting, Suspending, Suspended (Kueue has not admitted it yet)
        phase = RunPhase.PENDING
        if deployment in ("Suspending", "Suspended") and not message:
            message = "suspended: waiting for admission"
    return RunStatus(phase, message)


class KubeRayBackend:
    name = "kuberay"

    def __init__(self, config: PlatformConfig, api_client: Any | None = None):
        self.config = config
        self.capabilities = capabilities(config)
        self.api_client = api_client if api_client is not None else _build_api_client(config)
        self._core = k8s.CoreV1Api(self.api_client)
        self._custom = k8s.CustomObjectsApi(self.api_client)
        self._net = k8s.NetworkingV1Api(self.api_client)

    def submit(self, job: BackendJob) -> None:
        configmap, rayjob = render_configmap(job, self.config), render_rayjob(job, self.config)
        # ConfigMap and NetworkPolicy first: pods never start without their spec or their fence.
        # 409 = created by an earlier submit.
        what = f"create ConfigMap {job.namespace}/{configmap['metadata']['name']}"
        self._call(what, self._core.create_namespaced_config_map, job.namespace, configmap, ignore=(409,))
        if settings(self.config).network_policy.enabled:
            policy = render_network_policy(job, self.config)
            what = f"create NetworkPolicy {job.namespace}/{network_policy_name(job)}"
            self._call(what, self._net.create_namespaced_network_policy, job.namespace, policy, ignore=(409,))
        what = f"create RayJob {job.namespace}/{job.id}"
        self._rayjobs(what, "create", job.namespace, rayjob, ignore=(409,))

    def status(self, job: BackendJob) -> RunStatus:
        what = f"get RayJob {job.namespace}/{job.id}"
        obj = self._rayjobs(what, "get", job.namespace, job.id, ignore=(404,))
        return rayjob_status(obj) if obj else RunStatus(RunPhase.MISSING, "no RayJob of this name")

    def watch(self, namespace: str, timeout_seconds: int = 60) -> Iterator[tuple[str, RunStatus]]:
        """(job id, status) for every change of a tuneplane RayJob in `namespace`, for up to timeout_seconds.
        The first events describe the RayJobs that exist when the watch starts."""
        watcher = k8s_watch.Watch()
        stream = watcher.stream(
            self._custom.list_namespaced_custom_object,
            *(GROUP, VERSION, namespace, PLURAL),
            label_selector=f"{MANAGED_BY}=tuneplane",
            timeout_seconds=int(timeout_seconds),
            # Client-side guard in case the server does not honour timeout_seconds.
            _request_timeout=(10, timeout_seconds + 10),
        )
        try:
            for event in self._guard(f"watch RayJobs in {namespace}", stream):
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(obj, dict):
                    continue
                meta = obj.get("metadata") or {}
                if (meta.get("labels") or {}).get(MANAGED_BY) != "tuneplane":
                    continue  # the server filters by label; this only guards against one that does not
                if event.get("type") == "DELETED":
                    yield meta.get("name", ""), RunStatus(RunPhase.MISSING, "the RayJob was deleted")
                else:
                    yield meta.get("name", ""), rayjob_status(obj)
        finally:
            watcher.stop()
            stream.close()

    def cancel(self, job: BackendJob) -> None:
        # Background propagation: the API returns at once, the RayCluster and pods are collected after.
        what = f"delete RayJob {job.namespace}/{job.id}"
        self._rayjobs(what, "delete", job.namespace, job.id, propagation_policy="Background", ignore=(404,))
        name = spec_configmap_name(job)
        what = f"delete ConfigMap {job.namespace}/{name}"
        self._call(what, self._core.delete_namespaced_config_map, name, job.namespace, ignore=(404,))
        # The pods still terminating keep requiring the token.
        if settings(self.config).network_policy.enabled:
            name = network_policy_name(job)
            what = f"delete NetworkPolicy {job.namespace}/{name}"
            self._call(what, self._net.delete_namespaced_network_policy, name, job.namespace, ignore=(404,))

    def logs(self, job: BackendJob, follow: bool = False) -> Iterator[str]:
        """Logs of the K8sJobMode submitter pod: `ray job submit` tails the driver's output there."""
        what = f"list pods of job {job.namespace}/{job.id}"
        pods = self._call(
            what, self._core.list_namespaced_pod, job.namespace, label_selector=f"job-name={job.id}"
        )
        items = [p for p in (pods.items or []) if p.status is None or p.status.phase != "Pending"]
        if not items:
            return  # not started yet: no logs so far
        # The submitter Job may retry: the newest pod has the current attempt.
        pod = max(items, key=lambda p: str(p.metadata.creation_timestamp or ""))
        what = f"read logs of pod {job.namespace}/{pod.metadata.name}"
        read = functools.partial(
            self._core.read_namespaced_pod_log, pod.metadata.name, job.namespace, container=SUBMITTER
        )
        if not follow:
            yield from (self._call(what, read) or "").splitlines()
            return
        # _preload_content=False: a raw urllib3 response, read as the lines come
        resp = self._call(what, read, follow=True, _preload_content=False)
        try:
            buffer = b""
            for chunk in self._guard(what, resp.stream(4096, decode_content=True)):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                yield from (line.decode("utf-8", "replace") for line in lines)
            if buffer:
                yield buffer.decode("utf-8", "replace")
        finally:
            resp.release_conn()

    def close(self) -> None:
        self.api_client.close()

    def _rayjobs(self, what: str, verb: str, namespace: str, *args: Any, **kw: Any) -> Any:
        """`<verb>_namespaced_custom_object` for RayJobs in `namespace`, through `_call`."""
        fn = getattr(self._custom, f"{verb}_namespaced_custom_object")
        return self._call(what, fn, GROUP, VERSION, namespace, PLURAL, *args, **kw)

    def _call(
        self, what: str, fn: Callable[..., Any], *args: Any, ignore: tuple[int, ...] = (), **kw: Any
    ) -> Any:
        """Run one API call; statuses in `ignore` return None, other failures become a BackendError."""
        try:
            return fn(*args, **kw)
        except k8s.ApiException as exc:
            if exc.status in ignore:
                return None
            raise _api_error(what, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(what, exc) from None

    def _guard(self, what: str, items: Iterator[Any]) -> Iterator[Any]:
        """Iterate a streaming response; a read timeout ends it, other failures become a BackendError."""
        try:
            yield from items
        except urllib3.exceptions.ReadTimeoutError:
            return
        except k8s.ApiException as exc:
            raise _api_error(what, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(what, exc) from None

    def _unreachable(self, what: str, exc: Exception) -> BackendError:
        host = self.api_client.configuration.host
        return BackendError(f"{what}: cannot reach the Kubernetes API at {host} ({type(exc).__name__})")


def _api_error(what: str, exc: Any) -> BackendError:
    # Status and HTTP reason only: the exception's text includes the response body, which may quote the
    # object (a validation message echoes field values).
    return BackendError(f"{what}: HTTP {exc.status} {exc.reason}")


def _build_api_client(config: PlatformConfig) -> Any:
    kr = settings(config)
    configuration = k8s.Configuration()
    try:
        if kr.kubeconfig:
            k8s_config.load_kube_config(config_file=str(kr.kubeconfig), client_configuration=configuration)
        elif not kr.api_server:
            k8s_config.load_incluster_config(client_configuration=configuration)
    except (k8s_config.ConfigException, OSError) as exc:
        source = f"kubeconfig {kr.kubeconfig}" if kr.kubeconfig else "the in-cluster service account"
        raise BackendError(f"cannot load Kubernetes credentials from {source}: {exc}") from None
    if kr.api_server:
        configuration.host = kr.api_server
    return k8s.ApiClient(configuration)
