"""Checks of rendered Kubernetes manifests, shared by the chart tests (tests/test_chart.py) and the KubeRay
backend tests (tests/test_kuberay.py): Kubernetes schema validation, a CRD's structural schema, and the Pod
Security policy every pod of the platform meets. Each returns a list of problems, empty when all is well."""

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
