"""Checks of rendered Kubernetes manifests, shared by the chart tests (tests/test_chart.py) and the KubeRay
backend tests (tests/test_kuberay.py): Kubernetes schema validation, a CRD's structural schema, and the Pod
Security policy every pod of the platform meets (each returns a list of problems, empty when all is well); and
what a NetworkPolicy admits (`policy_admits`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

# What every container states in its own securityContext (Pod Security Standard `restricted`); the pod's
# securityContext states runAsNonRoot and seccompProfile too. No container adds a capability.
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers, then containers, of a pod spec."""
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def restricted_problems(pod_spec: dict[str, Any]) -> list[str]:
    """Where a pod spec falls short of RESTRICTED_CONTAINER, uses a host namespace or mounts a hostPath."""
    pod_context = pod_spec.get("securityContext", {})
    problems = [
        f"securityContext.{key}: {pod_context.get(key)!r}"
        for key in ("runAsNonRoot", "seccompProfile")
        if pod_context.get(key) != RESTRICTED_CONTAINER[key]
    ]
    problems += [f"{key} set" for key in HOST_NAMESPACES if key in pod_spec]
    problems += [f"volume {v['name']}: hostPath" for v in pod_spec.get("volumes", []) if "hostPath" in v]
    for container in containers(pod_spec):
        context = container.get("securityContext", {})
        where = f"container {container['name']}: securityContext"
        problems += [
            f"{where}.{key}: {context.get(key)!r}"
            for key, wanted in RESTRICTED_CONTAINER.items()
            if context.get(key) != wanted
        ]
        if context.get("privileged"):
            problems.append(f"{where}.privileged")
    return problems


def validation_problems(obj: dict[str, Any], k8s_version: str) -> list[str]:
    """`obj` against the Kubernetes OpenAPI schema of `k8s_version` (kubernetes-validate), strict: unknown
    fields are errors, and so is a kind without a bundled schema (a custom resource)."""
    from kubernetes_validate import utils as kv

    what = f"{obj['kind']}/{obj['metadata']['name']}"
    try:
        kv.validate(obj, k8s_version, strict=True)
    except kv.ValidationError as exc:
        return [f"{what}: {'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    except kv.SchemaNotFoundError as exc:
        return [f"{what}: {exc.message}"]
    return []


def load_crd_schema(crd: Path, version: str = "v1") -> dict[str, Any]:
    """The openAPIV3Schema of one version of a CustomResourceDefinition file."""
    # 25k lines of YAML for KubeRay's RayJob: the C loader reads it in about a second, the pure-Python one in 8
    document = yaml.load(crd.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (found,) = [v for v in document["spec"]["versions"] if v["name"] == version]
    return found["schema"]["openAPIV3Schema"]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of `obj` that the structural schema does not declare. A CRD does not set additionalProperties:
    false, so a misspelt field would pass jsonschema and be pruned silently by the API server."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(obj, list):
        item_schema = schema.get("items", {})
        return [
            bad for i, item in enumerate(obj) for bad in unknown_fields(item, item_schema, f"{path}[{i}]")
        ]
    if not isinstance(obj, dict):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    bad: list[str] = []
    for key, value in obj.items():
        where = f"{path}.{key}" if path else key
        if props is not None and key in props:
            bad += unknown_fields(value, props[key], where)
        elif isinstance(extra, dict):  # a map (labels, resources, nodeSelector): any key, typed values
            bad += unknown_fields(value, extra, where)
        elif props is None and path.split(".")[-1] == "metadata":
            continue  # ObjectMeta is validated by the API server itself, not by the CRD
        else:
            bad.append(where)
    return bad


def schema_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """`obj` against a CRD's schema: jsonschema's errors, then the fields the schema does not declare."""
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + [f"{where}: not in the schema" for where in unknown_fields(obj, schema)]


# ------------------------------------------------------------------------------------------ NetworkPolicy


def _labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels only; `{}` selects everything) against an object's labels."""
    if set(selector) - {"matchLabels"}:
        raise ValueError(f"selector with {sorted(set(selector) - {'matchLabels'})}: not modelled here")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict[str, Any], policy_namespace: str, who: dict[str, Any]) -> bool:
    """One NetworkPolicyPeer against `who`: {"ip": ...} or {"namespace", "namespace_labels", "pod_labels"}."""
    import ipaddress

    if "ipBlock" in peer:
        if "ip" not in who:
            return False  # an ipBlock is for addresses outside the cluster's pods
        ip = ipaddress.ip_address(who["ip"])
        block = peer["ipBlock"]
        inside = ip in ipaddress.ip_network(block["cidr"])
        return inside and not any(ip in ipaddress.ip_network(c) for c in block.get("except", []))
    if "ip" in who:
        return False  # selectors only match pods
    if "namespaceSelector" in peer:
        if not _labels_match(peer["namespaceSelector"], who["namespace_labels"]):
            return False
    elif who["namespace"] != policy_namespace:
        return False  # a podSelector alone: pods of the policy's own namespace
    return _labels_match(peer.get("podSelector", {}), who["pod_labels"])


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(
        p.get("protocol", "TCP") == protocol
        and ("port" not in p or p["port"] <= port <= p.get("endPort", p["port"]))
        for p in ports
    )


def policy_admits(
    policy: dict[str, Any], direction: str, who: dict[str, Any], port: int, protocol: str = "TCP"
) -> bool:
    """Whether a NetworkPolicy lets traffic in from (`direction` "ingress") or out to ("egress") `who` on
    port/protocol, by the Kubernetes semantics: rules are ORed; within a rule the peers are ORed and so are the
    ports; a missing or empty from/to or ports list matches all. Only what this policy admits: the caller
    knows that the policy selects the pod in question. `who` is {"ip": "..."} or a pod: {"namespace": ...,
    "namespace_labels": {...}, "pod_labels": {...}}."""
    spec = policy["spec"]
    kind = "Ingress" if direction == "ingress" else "Egress"
    if kind not in spec.get("policyTypes", ["Ingress"]):
        return True  # not isolated in this direction
    key = "from" if direction == "ingress" else "to"
    namespace = policy["metadata"]["namespace"]
    for rule in spec.get(direction) or []:
        peers = rule.get(key) or []
        if _port_matches(rule.get("ports"), port, protocol) and (
            not peers or any(_peer_matches(p, namespace, who) for p in peers)
        ):
            return True
    return False
