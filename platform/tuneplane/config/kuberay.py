"""The KubeRay backend's settings: runtime image, Ray cluster shape, storage, Kueue, and the NetworkPolicy every
job's Ray cluster gets."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from tuneplane.config._strict import Strict


class Kueue(Strict):
    enabled: bool = Field(
        False,
        description="Queue the RayJobs through Kueue (queue label + suspend); the LocalQueues must exist.",
    )
    queue_name: str = Field("{team}", description="LocalQueue per team; `{team}` is replaced.")


# A Kubernetes object name (DNS subdomain) and a resource quantity (CPU or memory), as the API server checks them.
_OBJECT_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
_K8S_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class SecretRef(Strict):
    name: str = Field(pattern=_OBJECT_NAME)
    key: str = Field(min_length=1)


class NetworkPeer(Strict):
    """One NetworkPolicy peer: pods by labels (in namespaces by labels), or an IP block."""

    pod_labels: dict[str, str] | None = Field(
        None,
        description="Labels of the pods; unset (with `namespace_labels`): every pod of those namespaces.",
    )
    namespace_labels: dict[str, str] | None = Field(
        None, description="Labels of the pods' namespaces; `{}`: any namespace; unset: the job's namespace."
    )
    cidr: str | None = Field(None, description="An IP block instead of pods, e.g. `10.20.0.0/16`.")
    except_cidrs: list[str] = Field(default_factory=list, description="Parts of `cidr` left out.")

    @model_validator(mode="after")
    def _pods_or_cidr(self) -> NetworkPeer:

        if self.cidr is None:
            if self.pod_labels is None and self.namespace_labels is None:
                raise ValueError("give pod_labels, namespace_labels or cidr")
            if self.except_cidrs:
                raise ValueError("except_cidrs needs a cidr")
            return self
        if self.pod_labels is not None or self.namespace_labels is not None:
            raise ValueError("a peer is either a cidr or pods by labels, not both")
        for cidr in [self.cidr, *self.except_cidrs]:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise ValueError(f"not a CIDR: {cidr!r}") from None
        return self


class NetworkTarget(Strict):
    """Peers and TCP ports of one NetworkPolicy rule."""

    peers: list[NetworkPeer] = Field(default_factory=list, description="Empty: any address (egress only).")
    ports: list[Port] = Field(default_factory=list, description="TCP ports; empty: every port.")


def _pods(**labels: str) -> list[NetworkPeer]:
    """Pods with these labels in any namespace."""
    return [NetworkPeer(pod_labels=labels, namespace_labels={})]


def _tuneplane(component: str) -> list[NetworkPeer]:
    return _pods(**{"app.kubernetes.io/name": "tuneplane", "app.kubernetes.io/component": component})


# An ingress rule needs peers: an empty list admits everyone.
class OperatorIngress(NetworkTarget):
    peers: list[NetworkPeer] = Field(
        default_factory=lambda: _pods(**{"app.kubernetes.io/name": "kuberay-operator"}),
        min_length=1,
        description="Default: the pods of KubeRay's Helm chart in any namespace; name the operator's namespace.",
    )
    ports: list[Port] = Field(default_factory=lambda: [8265], description="The Ray dashboard.")


class ApiIngress(NetworkTarget):
    peers: list[NetworkPeer] = Field(
        default_factory=lambda: _tuneplane("api"), min_length=1, description="Default: the chart's API pods."
    )
    ports: list[Port] = Field(default_factory=lambda: [8265], description="The Ray dashboard.")


class MlflowEgress(NetworkTarget):
    peers: list[NetworkPeer] = Field(
        default_factory=lambda: _tuneplane("mlflow"), description="Default: the chart's MLflow pods."
    )
    ports: list[Port] = Field(default_factory=lambda: [5000], description="TCP ports; empty: every port.")


class StorageEgress(NetworkTarget):
    peers: list[NetworkPeer] = Field(
        default_factory=list,
        description="Default: any address, which is wide: name the storage endpoints' CIDRs or pods.",
    )
    ports: list[Port] = Field(default_factory=lambda: [443], description="TCP ports; empty: every port.")


class JobNetworkPolicy(Strict):
    """The NetworkPolicy the KubeRay backend creates with every job: its pods accept traffic only from each
    other and the peers below, and reach only each other, DNS and the peers below."""

    enabled: bool = True
    kuberay_operator: OperatorIngress = Field(
        default_factory=OperatorIngress,
        description="Ingress: the KubeRay operator, which follows and stops the job through the Ray dashboard.",
    )
    api: ApiIngress | None = Field(
        default_factory=ApiIngress, description="Ingress: the Tuneplane API pods (null: none)."
    )
    dns: list[NetworkPeer] = Field(
        default_factory=lambda: [
            NetworkPeer(
                pod_labels={"k8s-app": "kube-dns"},
                namespace_labels={"kubernetes.io/metadata.name": "kube-system"},
            )
        ],
        description="Egress on port 53 (UDP and TCP): the cluster DNS; empty: any address.",
    )
    mlflow: MlflowEgress | None = Field(
        default_factory=MlflowEgress, description="Egress: the MLflow tracking server (`tracking_uri`)."
    )
    object_storage: StorageEgress = Field(
        default_factory=StorageEgress, description="Egress: object storage (data, models, checkpoints)."
    )
    extra_egress: list[NetworkTarget] = Field(
        default_factory=list, description="More egress, e.g. a model hub or an external MLflow."
    )

    @model_validator(mode="after")
    def _no_open_rules(self) -> JobNetworkPolicy:
        # (An ingress rule without peers is refused by its model: `min_length`.)
        egress = [self.mlflow, self.object_storage, *self.extra_egress]
        if any(t is not None and not t.peers and not t.ports for t in egress):
            raise ValueError("an egress rule needs peers or ports (neither admits everything)")
        return self


# Set by the KubeRay operator in every Ray container when token authentication is on.
_RAY_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


class KubeRayBackend(Strict):
    """Jobs as KubeRay RayJobs on a Kubernetes cluster, in each team's namespace."""

    type: Literal["kuberay"] = "kuberay"
    image: str = Field("ghcr.io/tuneplane/runtime:0.1.0", description="Training runtime image (pinned tag).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    ray_version: str = Field(
        "2.60.0",
        json_schema_extra={"pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},  # for the chart; the validator explains
        description="Ray of the runtime image: 2.52.0 or newer (every job uses Ray token authentication).",
    )
    service_account: str | None = Field(
        None, description="Service account of the job pods in the team namespaces (must exist there)."
    )
    head_cpu: str = Field("2", pattern=_K8S_QUANTITY, description="CPU of each job's Ray head.")
    head_memory: str = Field("8Gi", pattern=_K8S_QUANTITY, description="Memory of each job's Ray head.")
    ttl_seconds_after_finished: int = Field(
        3600, ge=0, description="Seconds a finished RayJob is kept before KubeRay deletes it."
    )
    backoff_limit: int = Field(
        0, ge=0, description="RayJob retries of the whole job (Ray Train retries too)."
    )
    storage_path: str = Field(
        "s3://tuneplane/runs", min_length=1, description="Ray Train storage for checkpoints."
    )
    storage_env: dict[EnvName, SecretRef] = Field(
        default_factory=dict,
        description="Environment of the job's pods taken from Secrets, e.g. AWS_ACCESS_KEY_ID.",
    )
    tracking_uri: str = Field("http://tuneplane-mlflow:5000", description="MLflow as seen from the cluster.")
    artifact_root: str | None = Field(
        None, description="MLflow artifact location for new experiments (default: the tracking server's)."
    )
    tracking_secret: str | None = Field(
        None,
        pattern=_OBJECT_NAME,
        description="With `tracking_auth`: the Secret, in every team namespace, holding that team's MLflow user "
        "(keys `username`, `password`; `tuneplane mlflow-credentials` prints them). Job pods get it as "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.",
    )
    kueue: Kueue = Field(default_factory=Kueue)
    kubeconfig: Path | None = Field(None, description="Outside a cluster; in one, the pod's service account.")
    api_server: str | None = Field(None, description="Kubernetes API URL override (tests).")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object.")
    network_policy: JobNetworkPolicy = Field(
        default_factory=JobNetworkPolicy,
        description="A NetworkPolicy per job around its Ray cluster (created and deleted with the RayJob).",
    )

    @field_validator("ray_version")
    @classmethod
    def _ray_has_token_auth(cls, version: str) -> str:
        # Every job's Ray cluster uses token authentication, which Ray has from 2.52.0 on.
        try:
            parts = tuple(int(p) for p in version.split(".")[:2])
        except ValueError:
            raise ValueError("expected a Ray version such as 2.60.0") from None
        if parts < (2, 52):
            raise ValueError("Ray token authentication needs Ray 2.52.0 or newer")
        return version

    @field_validator("storage_env")
    @classmethod
    def _no_ray_auth_env(cls, env: dict[EnvName, SecretRef]) -> dict[EnvName, SecretRef]:
        # The KubeRay operator only adds these when a container lacks them: ours would replace its token.
        if clash := sorted(_RAY_AUTH_ENV & set(env)):
            raise ValueError(f"{', '.join(clash)}: set by the KubeRay operator (token authentication)")
        return env
