"""The NetworkPolicy around one job's Ray cluster (the KubeRay backend creates it with the RayJob).

Ray's own ports (GCS, raylets, object manager, workers) are many and partly dynamic, so the job's pods may talk
to each other on any port; everything else is listed: ingress from the KubeRay operator and the Tuneplane API
(the dashboard port by default), egress to DNS, MLflow, object storage and `extra_egress`. The peers come from
the platform config (`backend.network_policy`, tuneplane.config.JobNetworkPolicy). Rendering is pure.

The policy is defence in depth: the cluster also requires Ray's token (see `render_rayjob`), and a policy needs
a CNI that enforces NetworkPolicies.
"""

from __future__ import annotations

from typing import Any

from tuneplane.backends.base import BackendJob
from tuneplane.config.kuberay import JobNetworkPolicy, NetworkPeer, NetworkTarget

JOB_ID_LABEL = "tuneplane.io/job-id"
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def network_policy_name(job: BackendJob) -> str:
    return f"{job.id}-network"


def _peer(peer: NetworkPeer) -> dict[str, Any]:
    if peer.cidr is not None:
        block: dict[str, Any] = {"cidr": peer.cidr}
        if peer.except_cidrs:
            block["except"] = list(peer.except_cidrs)
        return {"ipBlock": block}
    out: dict[str, Any] = {}
    if peer.namespace_labels is not None:  # {} selects every namespace; no namespaceSelector: the job's
        out["namespaceSelector"] = _selector(peer.namespace_labels)
    if peer.pod_labels is not None:
        out["podSelector"] = _selector(peer.pod_labels)
    return out


def _selector(labels: dict[str, str]) -> dict[str, Any]:
    """A label selector; `{}` selects everything."""
    return {"matchLabels": dict(labels)} if labels else {}


def _rule(direction: str, target: NetworkTarget) -> dict[str, Any]:
    """One ingress ("from") or egress ("to") rule; no peers: any address, no ports: every port."""
    rule: dict[str, Any] = {}
    if target.peers:
        rule[direction] = [_peer(p) for p in target.peers]
    if target.ports:
        rule["ports"] = [{"protocol": "TCP", "port": port} for port in target.ports]
    return rule


def job_network_policy(job: BackendJob, settings: JobNetworkPolicy, labels: dict[str, str]) -> dict[str, Any]:
    """The NetworkPolicy selecting every pod of `job` (head, workers, submitter: they all carry its job id)."""

    def own() -> dict[str, Any]:  # a fresh dict each time: no shared sub-objects in the manifest
        return _selector({JOB_ID_LABEL: job.id})

    ingress = [{"from": [{"podSelector": own()}]}]
    ingress += [_rule("from", t) for t in (settings.kuberay_operator, settings.api) if t is not None]
    dns = _rule("to", NetworkTarget(peers=settings.dns))  # no DNS peers: port 53 of any address
    dns["ports"] = [dict(p) for p in DNS_PORTS]
    egress = [dns, {"to": [{"podSelector": own()}]}]
    egress += [
        _rule("to", t)
        for t in (settings.mlflow, settings.object_storage, *settings.extra_egress)
        if t is not None
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": network_policy_name(job), "namespace": job.namespace, "labels": labels},
        "spec": {
            "podSelector": own(),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }
