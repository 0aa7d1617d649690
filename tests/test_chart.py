"""The Helm chart in charts/tuneplane: lint, render, schema validation of every manifest and policy checks.

Needs a helm binary (`scripts/install-helm.sh` installs one into build/bin/helm); without it the tests that run
helm skip, the static checks of the chart's files still run.
Each values set (chart defaults, ci/minimal-values.yaml, ci/production-values.yaml) is rendered once.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.support.config import REPO
from tests.support.manifests import containers, policy_admits, restricted_problems, validation_problems

if TYPE_CHECKING:
    from tuneplane.config import PlatformConfig
from tuneplane.config.kuberay import NetworkPeer

CHART = REPO / "charts" / "tuneplane"
RELEASE, NAMESPACE = "tuneplane", "tuneplane"


def _find_helm() -> str | None:
    candidates = [
        os.environ.get("HELM"),
        shutil.which("helm"),
        REPO / "build/bin/helm",
        REPO / ".venv/bin/helm",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


HELM = _find_helm()
needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="no helm binary (PATH, $HELM, build/bin/helm, .venv/bin/helm): run scripts/install-helm.sh",
)

VALUES = {
    "default": [],
    "minimal": ["-f", str(CHART / "ci" / "minimal-values.yaml")],
    "production": ["-f", str(CHART / "ci" / "production-values.yaml")],
}
K8S_VERSIONS = ["1.30.0", "1.33.0"]
STANDARD_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
]
# Exactly what tuneplane.backends.kuberay needs in a team namespace: (apiGroup, resource) -> verbs.
EXPECTED_RULES = {
    ("ray.io", "rayjobs"): {"create", "get", "list", "watch", "delete", "patch"},
    ("ray.io", "rayjobs/status"): {"get"},
    ("", "configmaps"): {"create", "get", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"create", "delete"},  # one per job; no Secrets at all
    ("", "pods"): {"get", "list"},
    ("", "pods/log"): {"get"},
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


@functools.cache
def offline_chart() -> Path:
    """A copy of the chart without its `dependencies` block. The optional kuberay-operator dependency cannot be
    fetched here (no chart repository is reachable) and Helm refuses to lint or render a chart whose declared
    dependency is missing, even when its condition is false; everything else is the chart itself."""
    copy = Path(tempfile.mkdtemp(prefix="tuneplane-chart-")) / "tuneplane"
    shutil.copytree(CHART, copy)
    meta = yaml.safe_load((copy / "Chart.yaml").read_text())
    meta.pop("dependencies")
    (copy / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return copy


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, check=False)


def template(*args: str) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(offline_chart()), "--namespace", NAMESPACE, *args)


@functools.cache
def rendered_text(name: str) -> str:
    result = template(*VALUES[name])
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(rendered_text(name)) if doc)


@functools.cache
def chart_values(name: str) -> dict[str, Any]:
    """The values as Helm merges them (chart defaults + the values file), for expectations."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if VALUES[name]:
        _merge(values, yaml.safe_load(Path(VALUES[name][1]).read_text()))
    return values


def _merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def kinds(objs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[dict[str, Any], ...], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in kinds(objs, kind)
        if component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def pod_templates(objs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod template {metadata, spec}) of every workload and bare Pod (test hooks)."""
    pods = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in WORKLOADS:
            pods.append((name, o["spec"]["template"]))
        elif o["kind"] == "CronJob":
            pods.append((name, o["spec"]["jobTemplate"]["spec"]["template"]))
        elif o["kind"] == "Pod":
            pods.append((name, o))
    return pods


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def api_deployment(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(objs, "Deployment", "api")


def platform_config_text(objs: tuple[dict[str, Any], ...]) -> str:
    return one(objs, "ConfigMap", "api")["data"]["config.yaml"]


def platform_config(objs: tuple[dict[str, Any], ...]) -> PlatformConfig:
    """The rendered platform config, parsed by the app's own model (tuneplane.config.PlatformConfig)."""
    from tuneplane.config import PlatformConfig

    return PlatformConfig.model_validate(yaml.safe_load(platform_config_text(objs)))


def release_pods(component: str) -> list[NetworkPeer]:
    """The NetworkPeer of this release's pods of one component, in the release namespace only."""
    from tuneplane.config.kuberay import NetworkPeer

    labels = {
        "app.kubernetes.io/name": "tuneplane",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": component,
    }
    return [NetworkPeer(pod_labels=labels, namespace_labels={"kubernetes.io/metadata.name": NAMESPACE})]


def job_peers(peers: list[dict[str, Any]]) -> list[NetworkPeer]:
    """NetworkPolicyPeer objects of the values (networkPolicy.dns) as tuneplane.config.NetworkPeer objects: a
    missing namespaceSelector means the job's namespace, `{}` any namespace (the same in both)."""
    from tuneplane.config.kuberay import NetworkPeer

    selectors = {"namespaceSelector": "namespace_labels", "podSelector": "pod_labels"}
    return [
        NetworkPeer.model_validate(
            {field: peer[key].get("matchLabels", {}) for key, field in selectors.items() if key in peer}
        )
        for peer in peers
    ]


# -- lint and schema validation of the manifests --------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_lint_strict(name: str) -> None:
    result = helm("lint", "--strict", str(offline_chart()), "--namespace", NAMESPACE, *VALUES[name])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@needs_helm
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", VALUES)
def test_manifests_validate_strict(name: str, version: str) -> None:
    """Every object against the Kubernetes OpenAPI schema, strict (unknown fields are errors). The chart renders
    no custom resource, so a kind without a bundled schema is a failure too."""
    problems = [problem for obj in rendered(name) for problem in validation_problems(obj, version)]
    assert not problems, "\n".join(problems)


# -- policies -------------------------------------------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_every_pod_meets_restricted_pod_security(name: str) -> None:
    pods = pod_templates(rendered(name))
    assert {p[0].split("/")[0] for p in pods} == {"Deployment", "Pod"}  # API, MLflow, test hook
    for what, pod in pods:
        spec = pod["spec"]
        assert restricted_problems(spec) == [], what
        pod_sc = spec["securityContext"]
        assert isinstance(pod_sc.get("runAsUser"), int) and pod_sc["runAsUser"] > 0, what
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        # Only the API talks to the Kubernetes API; every other pod goes without a token.
        assert spec.get("automountServiceAccountToken") is (component == "api"), what
        for c in containers(spec):
            where = f"{what} container {c['name']}"
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in empty_dirs, f"{where}: /tmp must be an emptyDir"


@needs_helm
def test_api_home_is_a_writable_emptydir() -> None:
    objs = rendered("default")
    spec = api_deployment(objs)["spec"]["template"]["spec"]
    home = yaml.safe_load(platform_config_text(objs))["home"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts[home]]


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_every_container_has_resources(name: str) -> None:
    for what, pod in pod_templates(rendered(name)):
        for c in containers(pod["spec"]):
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{what}/{c['name']}: {part}"


def _image_tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_images_are_pinned(name: str) -> None:
    objs = rendered(name)
    images = [c["image"] for _, pod in pod_templates(objs) for c in containers(pod["spec"])]
    images.append(yaml.safe_load(platform_config_text(objs))["backend"]["image"])  # the jobs' runtime image
    for image in images:
        tag = _image_tag(image)
        assert tag, f"{image}: no tag"
        assert tag != "latest", f"{image}: latest"
    api_image = api_deployment(objs)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert api_image.startswith("ghcr.io/tuneplane/api:0.1.0")
    if name == "production":  # a digest pins the API image completely
        assert re.search(r"@sha256:[0-9a-f]{64}$", api_image)


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_no_plain_text_secrets(name: str) -> None:
    objs = rendered(name)
    for secret in kinds(objs, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), secret["metadata"]["name"]
    secret_like = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|DATABASE_URL|BACKEND_STORE_URI)")
    for what, pod in pod_templates(objs):
        for c in containers(pod["spec"]):
            for env in c.get("env", []):
                if not secret_like.search(env["name"]):
                    continue
                if env["name"] == "MLFLOW_BACKEND_STORE_URI" and env.get("value", "").startswith("sqlite:"):
                    continue  # the trial's SQLite file: a path, no credential
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{what}/{c['name']}: {env['name']}"
            assert not c.get("envFrom"), what
    for cm in kinds(objs, "ConfigMap"):
        text = yaml.safe_dump(cm.get("data", {}))
        assert "password" not in text.lower(), cm["metadata"]["name"]
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), (
            f"{cm['metadata']['name']}: credentials in a URL"
        )


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_standard_labels_everywhere(name: str) -> None:
    objs = rendered(name)
    labelled = [(f"{o['kind']}/{o['metadata']['name']}", o["metadata"].get("labels", {})) for o in objs]
    labelled += [(f"pod of {what}", pod["metadata"].get("labels", {})) for what, pod in pod_templates(objs)]
    for what, labels in labelled:
        missing = [key for key in STANDARD_LABELS if not labels.get(key)]
        assert not missing, f"{what}: missing {missing}"
        assert labels.get("app.kubernetes.io/part-of") or labels.get("helm.sh/chart"), what
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_rbac_is_namespaced_with_exact_verbs(name: str) -> None:
    objs = rendered(name)
    assert not kinds(objs, "ClusterRole") and not kinds(objs, "ClusterRoleBinding")
    teams = chart_values(name)["config"]["teams"]
    team_namespaces = {t.get("namespace") or t["name"] for t in teams}
    roles = kinds(objs, "Role")
    assert {r["metadata"]["namespace"] for r in roles} == team_namespaces
    assert len(roles) == len(team_namespaces)
    for role in roles:
        rules: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules.setdefault((group, resource), set()).update(rule["verbs"])
        assert rules == EXPECTED_RULES, role["metadata"]["namespace"]
    sa = api_deployment(objs)["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(objs, "ServiceAccount")["metadata"]["name"] == sa
    bindings = kinds(objs, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == team_namespaces
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[0]["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_created_namespaces_enforce_restricted(name: str) -> None:
    namespaces = kinds(rendered(name), "Namespace")
    wanted = {
        t.get("namespace") or t["name"]
        for t in chart_values(name)["config"]["teams"]
        if t.get("create_namespace")
    }
    assert {n["metadata"]["name"] for n in namespaces} == wanted
    for ns in namespaces:
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_platform_config_is_valid_for_the_app(name: str) -> None:
    objs = rendered(name)
    values = chart_values(name)
    config = platform_config(objs)
    assert config.backend.type == "kuberay"
    assert [t.name for t in config.teams] == [t["name"] for t in values["config"]["teams"]]
    assert set(config.gpu_pools) == set(values["config"]["gpu_pools"])
    assert config.kuberay.image == "ghcr.io/tuneplane/runtime:0.1.0"
    mlflow_url = f"http://{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert config.tracking_uri == config.kuberay.tracking_uri == mlflow_url
    assert config.kuberay.kueue.enabled is (name == "production")
    # The tokens file is where the auth Secret is mounted.
    spec = api_deployment(objs)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    auth = next(v for v in spec["volumes"] if v["name"] == "auth")
    assert auth["secret"]["secretName"] == values["auth"]["existingSecret"]
    assert auth["secret"]["items"] == [{"key": "tokens.yaml", "path": "tokens.yaml"}]
    assert str(config.auth.tokens_file) == f"{mounts['auth']}/tokens.yaml"
    if name == "production":
        assert config.kuberay.kueue.queue_name == "{team}-gpu"
        nlp = config.team("nlp")
        assert nlp is not None and nlp.gpu_pools == ["h100", "a100"]
        assert config.gpu_pools["h100"].accelerator_type == "H100"
        assert config.gpu_pools["h100"].tolerations[0].operator == "Exists"
        assert config.kuberay.storage_env["AWS_ACCESS_KEY_ID"].name == "tuneplane-job-s3"


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_platform_config_carries_quotas_and_timeouts(name: str) -> None:
    config = platform_config(rendered(name))
    values = chart_values(name)["config"]
    waiting = {t.name: t.quota.max_waiting_jobs for t in config.teams}
    # A team without the key gets the model's default (the minimal values' team).
    assert waiting == {t["name"]: t.get("quota", {}).get("max_waiting_jobs", 100) for t in values["teams"]}
    assert config.validation_timeout_s == values.get("validation_timeout_s", 60)
    if name == "production":  # non-default values arrive
        assert waiting == {"nlp": 40, "search": 10}
        assert config.validation_timeout_s == 120
    else:
        assert set(waiting.values()) == {100} and config.validation_timeout_s == 60


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_platform_config_carries_the_job_network_policy(name: str) -> None:
    from tuneplane.config.kuberay import JobNetworkPolicy, OperatorIngress, StorageEgress

    objs = rendered(name)
    values = chart_values(name)
    given = values["config"]["backend"]["network_policy"]
    policy = platform_config(objs).kuberay.network_policy
    assert policy.enabled is given["enabled"] is True
    # The API and MLflow peers are this release's pods in the release namespace, not the model's default (those
    # labels in any namespace); MLflow on its container's port, which is what a NetworkPolicy sees.
    assert policy.api is not None and policy.api.peers == release_pods("api") and policy.api.ports == [8265]
    assert policy.mlflow is not None and policy.mlflow.peers == release_pods("mlflow")
    mlflow_container = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert policy.mlflow.ports == [p["containerPort"] for p in mlflow_container["ports"]] == [5000]
    # The jobs resolve names through the DNS the chart's own pods use.
    assert policy.dns == job_peers(values["networkPolicy"]["dns"]) == JobNetworkPolicy().dns
    # The rest is the values' section as it is.
    passed = {k: v for k, v in given.items() if k not in ("api", "mlflow", "dns")}
    assert policy.model_dump(include=set(passed)) == JobNetworkPolicy.model_validate(passed).model_dump(
        include=set(passed)
    )
    if name == "production":  # the operator's namespace pinned, storage and extra egress by address or pods
        (operator,) = policy.kuberay_operator.peers
        assert operator.namespace_labels == {"kubernetes.io/metadata.name": "kuberay-system"}
        assert operator.pod_labels == {"app.kubernetes.io/name": "kuberay-operator"}
        assert [p.cidr for p in policy.object_storage.peers] == ["52.92.0.0/17", "3.5.64.0/21"]
        mirror, proxy = (t.peers[0] for t in policy.extra_egress)
        assert mirror.namespace_labels == {"kubernetes.io/metadata.name": "model-cache"}
        assert (proxy.cidr, proxy.except_cidrs) == ("10.40.0.0/16", ["10.40.9.0/24"])
    else:  # the model's defaults
        assert policy.kuberay_operator == OperatorIngress()
        assert policy.object_storage == StorageEgress()
        assert policy.extra_egress == []


def _pod(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod as `policy_admits` sees it (namespaces carry their automatic kubernetes.io/metadata.name)."""
    return {
        "namespace": namespace,
        "namespace_labels": {"kubernetes.io/metadata.name": namespace},
        "pod_labels": labels,
    }


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_job_network_policy_admits_this_release_only(name: str) -> None:
    """The NetworkPolicy the backend creates for a job, from the rendered config: valid, and its API and MLflow
    rules match this release's pods as rendered, not the same labels in another namespace or release."""
    from tuneplane.backends.base import BackendJob
    from tuneplane.backends.kuberay import render_network_policy
    from tuneplane.spec import load_spec

    objs = rendered(name)
    config = platform_config(objs)
    team = config.teams[0]
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    job = BackendJob(id="tiny-cpu-20260101-000000", team=team.name, namespace=team.namespace, spec=spec)
    policy = render_network_policy(job, config)
    for version in K8S_VERSIONS:
        assert validation_problems(policy, version) == []

    api = api_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    mlflow = one(objs, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    other_release = {"app.kubernetes.io/instance": "other"}
    assert policy_admits(policy, "ingress", _pod(NAMESPACE, api), 8265)
    assert not policy_admits(policy, "ingress", _pod(NAMESPACE, api), 6379)
    assert not policy_admits(policy, "ingress", _pod("elsewhere", api), 8265)
    assert not policy_admits(policy, "ingress", _pod(NAMESPACE, {**api, **other_release}), 8265)
    assert policy_admits(policy, "egress", _pod(NAMESPACE, mlflow), 5000)
    assert not policy_admits(policy, "egress", _pod("elsewhere", mlflow), 5000)
    assert not policy_admits(policy, "egress", _pod(NAMESPACE, {**mlflow, **other_release}), 5000)
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    assert policy_admits(policy, "ingress", _pod("kuberay-system", operator), 8265)
    # Production pins the operator's namespace: the same labels elsewhere are refused.
    assert policy_admits(policy, "ingress", _pod("elsewhere", operator), 8265) is (name != "production")


@needs_helm
def test_config_checksum_rolls_the_pods() -> None:
    def checksum(*args: str) -> str:
        result = template("--show-only", "templates/deployment.yaml", *args)
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert re.fullmatch(r"[0-9a-f]{64}", checksum())
    assert checksum() != checksum("--set", "config.max_request_bytes=2048")


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_api_deployment(name: str) -> None:
    objs = rendered(name)
    values = chart_values(name)
    deployment = api_deployment(objs)
    spec = deployment["spec"]["template"]["spec"]
    api = spec["containers"][0]
    env = env_of(api)
    hpa = kinds(objs, "HorizontalPodAutoscaler")
    pdb = kinds(objs, "PodDisruptionBudget")
    if name == "production":
        assert "replicas" not in deployment["spec"] and hpa[0]["spec"]["minReplicas"] == 3
        assert hpa[0]["apiVersion"] == "autoscaling/v2"
    else:
        assert deployment["spec"]["replicas"] == {"default": 2, "minimal": 1}[name] and not hpa
    if name == "minimal":  # SQLite trial: no PostgreSQL URL, one pod, no PDB
        assert "TUNEPLANE_DATABASE_URL" not in env and not pdb
    else:
        ref = env["TUNEPLANE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": values["database"]["existingSecret"], "key": values["database"]["secretKey"]}
        assert pdb[0]["spec"]["minAvailable"] == 1
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert api["args"][:1] == ["serve"] and "--config" in api["args"]
    assert env["TUNEPLANE_CONFIG"]["value"] == api["args"][api["args"].index("--config") + 1]
    service = one(objs, "Service", "api")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8421, "targetPort": "http", "protocol": "TCP"}
    ]
    ingresses = kinds(objs, "Ingress")
    if name == "production":
        assert ingresses[0]["spec"]["tls"] == [
            {"secretName": "tuneplane-tls", "hosts": ["tuneplane.example.com"]}
        ]
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "tuneplane-s3"
    else:
        assert not ingresses


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_bundled_mlflow(name: str) -> None:
    objs = rendered(name)
    values = chart_values(name)
    deployment = one(objs, "Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:*" in allowed
    assert one(objs, "Service", "mlflow")["spec"]["type"] == "ClusterIP"
    assert not [i for i in kinds(objs, "Ingress") if "mlflow" in i["metadata"]["name"]]
    destination = next(a for a in container["args"] if a.startswith("--artifacts-destination="))
    if name == "minimal":
        assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("sqlite:")
    else:
        ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == values["mlflow"]["backendStore"]["existingSecret"]
        assert destination == f"--artifacts-destination={values['mlflow']['artifactsDestination']}"


@needs_helm
def test_external_mlflow_replaces_the_bundled_one() -> None:
    uri = "https://mlflow.example.com"
    result = template("--set", "mlflow.enabled=false", "--set", f"mlflow.externalUri={uri}")
    assert result.returncode == 0, result.stderr
    objs = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    assert not [o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component") == "mlflow"]
    config = yaml.safe_load(platform_config_text(objs))
    assert config["tracking_uri"] == config["backend"]["tracking_uri"] == uri
    # The jobs' MLflow egress: by default any address on the URI's port (no bundled pods to name).
    mlflow = platform_config(objs).kuberay.network_policy.mlflow
    assert mlflow is not None and mlflow.peers == [] and mlflow.ports == [443]


@pytest.mark.parametrize(
    ("uri", "given", "peers", "ports"),
    [
        ("http://mlflow.example.com", {}, [], [80]),
        ("http://mlflow.example.com:8080/", {}, [], [8080]),
        (
            "https://mlflow.example.com",
            {"peers": [{"cidr": "10.30.0.0/16"}]},
            [{"cidr": "10.30.0.0/16"}],
            [443],
        ),
        (
            "http://mlflow.tracking.svc:5000",
            {
                "peers": [
                    {
                        "namespace_labels": {"kubernetes.io/metadata.name": "tracking"},
                        "pod_labels": {"app": "mlflow"},
                    }
                ],
                "ports": [5000, 5001],
            },
            [
                {
                    "namespace_labels": {"kubernetes.io/metadata.name": "tracking"},
                    "pod_labels": {"app": "mlflow"},
                }
            ],
            [5000, 5001],
        ),
    ],
)
@needs_helm
def test_external_mlflow_peer_comes_from_values(
    uri: str, given: dict[str, Any], peers: list[dict[str, Any]], ports: list[int]
) -> None:
    from tuneplane.config.kuberay import NetworkPeer

    args = ["--set", "mlflow.enabled=false", "--set", f"mlflow.externalUri={uri}"]
    if given:
        args += ["--set-json", f"config.backend.network_policy.mlflow={json.dumps(given)}"]
    result = template("--show-only", "templates/configmap.yaml", *args)
    assert result.returncode == 0, result.stderr
    mlflow = platform_config(tuple(yaml.safe_load_all(result.stdout))).kuberay.network_policy.mlflow
    assert mlflow is not None
    assert mlflow.peers == [NetworkPeer.model_validate(p) for p in peers] and mlflow.ports == ports


@needs_helm
def test_job_network_policy_can_be_turned_off() -> None:
    args = ["--set", "config.backend.network_policy.enabled=false"]
    args += ["--set-json", "config.backend.network_policy.api=null"]
    result = template("--show-only", "templates/configmap.yaml", *args)
    assert result.returncode == 0, result.stderr
    policy = platform_config(tuple(yaml.safe_load_all(result.stdout))).kuberay.network_policy
    assert policy.enabled is False and policy.api is None


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_network_policies(name: str) -> None:
    objs = rendered(name)
    policies = kinds(objs, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1, "one default-deny policy"
    for what, pod in pod_templates(objs):
        labels = pod["metadata"]["labels"]
        assert _selects(deny[0]["spec"]["podSelector"], labels), f"{what} escapes the default deny"
    by_component = {p["metadata"]["labels"].get("app.kubernetes.io/component"): p["spec"] for p in policies}

    api = by_component["api"]
    assert [p["port"] for rule in api["ingress"] for p in rule["ports"]] == [8421]
    egress_ports = {p["port"] for rule in api["egress"] for p in rule["ports"]}
    assert {53, 443, 5000} <= egress_ports
    assert (5432 in egress_ports) is (name != "minimal")
    if name == "production":  # restricted to the ingress controller, monitoring and the test pod
        assert len(api["ingress"][0]["from"]) == 3
        kube_api = next(r for r in api["egress"] if {p["port"] for p in r["ports"]} == {443, 6443})
        assert [t["ipBlock"]["cidr"] for t in kube_api["to"]] == ["10.0.0.1/32", "172.16.0.0/28"]

    mlflow = by_component["mlflow"]
    sources = mlflow["ingress"][0]["from"]
    assert [p["port"] for p in mlflow["ingress"][0]["ports"]] == [5000]
    assert sources[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    team_namespaces = sorted({t.get("namespace") or t["name"] for t in chart_values(name)["config"]["teams"]})
    assert sources[1]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": team_namespaces}
    ]
    assert len(sources) == 2  # nothing else by default


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_helm_test_hook_calls_readyz(name: str) -> None:
    hooks = [
        o for o in kinds(rendered(name), "Pod") if o["metadata"]["annotations"].get("helm.sh/hook") == "test"
    ]
    assert len(hooks) == 1
    spec = hooks[0]["spec"]
    assert spec["restartPolicy"] == "Never"
    command = " ".join([*spec["containers"][0].get("command", []), *spec["containers"][0].get("args", [])])
    assert f"http://{RELEASE}.{NAMESPACE}.svc:8421/readyz" in command


@needs_helm
@pytest.mark.parametrize("name", VALUES)
def test_one_kind_of_resource_per_template(name: str) -> None:
    """Each template file renders one kind of resource (it may render several, e.g. a Role per team namespace)."""
    kinds_by_template: dict[str, set[str]] = {}
    for text in rendered_text(name).split("\n---\n"):
        doc = yaml.safe_load(text)
        source = re.search(r"^# Source: (\S+)$", text, re.MULTILINE)
        if doc:
            assert source, doc["kind"]
            kinds_by_template.setdefault(source.group(1), set()).add(doc["kind"])
    assert {t: k for t, k in kinds_by_template.items() if len(k) > 1} == {}


# -- values: failures with clear messages, schema, documentation ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "database.existingSecret="], "database.existingSecret is required"),
        (["--set", "database.sqlite=true"], "database.sqlite keeps the database in one pod's emptyDir"),
        (["--set", "auth.existingSecret="], "auth.existingSecret is required"),
        (["--set", "mlflow.externalUri=http://mlflow:5000"], "set either mlflow.enabled"),
        (["--set", "mlflow.enabled=false"], "the jobs need an MLflow tracking server"),
        (
            ["--set-json", 'config.teams=[{"name":"a","gpu_pools":["h100"]}]'],
            'GPU pool "h100" is not defined',
        ),
        (
            [
                "--set-json",
                'networkPolicy.dns=[{"podSelector":{"matchExpressions":[{"key":"a","operator":"Exists"}]}}]',
            ],
            "networkPolicy.dns[0].podSelector: only matchLabels is supported in the job NetworkPolicy",
        ),
    ],
)
@needs_helm
def test_invalid_values_fail_with_a_clear_message(args: list[str], message: str) -> None:
    result = template(*args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
        (["--set", "image.tag=latest"], "/image/tag"),
        (["--set", "mlflow.image.tag=latest"], "/mlflow/image/tag"),
        (["--set", "config.teams[0].name=Bad_Name"], "/config/teams/0/name"),
        (["--set", "database.typo=x"], "additional properties 'typo' not allowed"),
        (
            ["--set-json", 'config.teams=[{"name":"a","quota":{"max_waiting_jobs":-1}}]'],
            "/config/teams/0/quota/max_waiting_jobs",
        ),
        # The old camelCase keys: `config` has the platform config's own keys now.
        (["--set", "config.validateData=false"], "additional properties 'validateData' not allowed"),
        (["--set", "config.validation_timeout_s=0"], "/config/validation_timeout_s"),
        (["--set", "config.validation_timeout_s=3601"], "/config/validation_timeout_s"),
        (["--set", "config.backend.image=x"], "additional properties 'image' not allowed"),  # runtimeImage's
        (["--set", "config.tracking_uri=http://x"], "additional properties 'tracking_uri' not allowed"),
        (["--set", "config.backend.type=local"], "/config/backend/type"),
        (["--set", "config.gpu_pools.a.memory_per_node=lots"], "/config/gpu_pools/a/memory_per_node"),
        (
            ["--set-json", "config.backend.network_policy.kuberay_operator.peers=[]"],
            "/config/backend/network_policy/kuberay_operator/peers",
        ),
        (
            ["--set", "config.backend.network_policy.kuberay_operator.ports[0]=65536"],
            "/config/backend/network_policy/kuberay_operator/ports/0",
        ),
        (
            ["--set-json", 'config.backend.network_policy.extra_egress=[{"peers":[{"podSelector":{}}]}]'],
            "/config/backend/network_policy/extra_egress/0/peers/0",
        ),
        (
            ["--set-json", 'config.backend.storage_env={"BAD-NAME":{"name":"s","key":"k"}}'],
            "/config/backend/storage_env",
        ),
    ],
)
@needs_helm
def test_schema_rejects_bad_values(args: list[str], message: str) -> None:
    result = template(*args)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@functools.cache
def chart_readme() -> ModuleType:
    """scripts/chart_readme.py, which parses the `# --` comments of values.yaml and renders README.md."""
    spec = importlib.util.spec_from_file_location("chart_readme", REPO / "scripts" / "chart_readme.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_value_is_documented() -> None:
    """helm-docs style: every leaf key has a `# --` comment right above it or sits inside a documented object;
    keys that only group other keys (image:, config:) need none."""
    documented, undocumented = chart_readme().parse_values((CHART / "values.yaml").read_text())
    assert not undocumented, undocumented
    assert documented


def test_readme_is_generated_from_values() -> None:
    expected = chart_readme().render(CHART)
    assert (CHART / "README.md").read_text() == expected, (
        "charts/tuneplane/README.md is stale: make chart-docs"
    )


def test_config_schema_is_generated_from_the_model() -> None:
    """`config` is the platform config passed through: its schema is the model's (make chart-docs)."""
    from tuneplane.devtools import chart_schema

    assert (CHART / "values.schema.json").read_text() == chart_schema.render(CHART), (
        "charts/tuneplane/values.schema.json is stale: make chart-docs"
    )


@needs_helm
def test_what_the_schema_cannot_say_the_api_refuses_at_start(tmp_path: Path) -> None:
    """Rules across fields (an egress rule open to everything, a peer both pods and CIDR) pass the schema; the
    API refuses the rendered config at start, naming the field, before it creates anything."""
    from tuneplane.config import load_config
    from tuneplane.errors import ConfigError

    result = template(
        "--show-only", "templates/configmap.yaml",
        "--set-json", 'config.backend.network_policy.object_storage={"ports":[]}',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = tmp_path / "config.yaml"
    path.write_text(platform_config_text(tuple(yaml.safe_load_all(result.stdout))))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "backend.kuberay.network_policy" in str(caught.value), caught.value
    assert "an egress rule needs peers or ports" in str(caught.value), caught.value


def test_schema_is_draft07_and_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    for key in ("image", "database", "auth", "config", "mlflow", "networkPolicy", "ingress", "autoscaling"):
        assert schema["properties"][key]["additionalProperties"] is False, key


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == chart["appVersion"] == "0.1.0"
    # The KubeRay operator is an optional dependency, off by default.
    assert chart["dependencies"] == [
        {
            "name": "kuberay-operator",
            "version": "1.7.0",
            "repository": "https://ray-project.github.io/kuberay-helm/",
            "condition": "kuberay-operator.enabled",
        }
    ]
    assert yaml.safe_load((CHART / "values.yaml").read_text())["kuberay-operator"] == {"enabled": False}
    assert "helm dependency build" in (CHART / "README.md").read_text()


def test_install_script_is_valid_bash() -> None:
    script = REPO / "scripts" / "install-helm.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


@needs_helm
def test_bundled_mlflow_runs_its_authentication_app() -> None:
    """ci/production-values.yaml turns MLflow's authentication on: the server runs basic-auth with its users
    database from a Secret (written to the pod's /tmp by an init container, never into a manifest), the API logs
    in as the admin from a Secret, and the platform config gives jobs their team's Secret."""
    objs = rendered("production")
    pod = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    [init], [server] = pod["initContainers"], pod["containers"]
    assert "--app-name=basic-auth" in server["args"]
    env = env_of(server)
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/tmp/basic_auth.ini"
    for name, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flaskSecretKey"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "acme-mlflow-admin", "key": key}
    assert (
        "default_permission = NO_PERMISSIONS" in init["args"][0] and "/tmp/basic_auth.ini" in init["args"][0]
    )
    ref = env_of(init)["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "tuneplane-mlflow-postgres", "key": "authUrl"}
    api = env_of(api_deployment(objs)["spec"]["template"]["spec"]["containers"][0])
    assert api["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "acme-mlflow-admin",
        "key": "password",
    }
    config = platform_config(objs)
    assert config.tracking_auth and config.kuberay.tracking_secret == "tuneplane-mlflow-team"
    assert not platform_config(rendered("minimal")).tracking_auth  # off unless asked for
