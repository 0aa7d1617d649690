"""Node-shaped pods on the KubeRay backend: the packing rule (kuberay_pods.node_groups), the RayJobs it renders
(against the real KubeRay v1.7.0 CRD), admission's refusal of workers that fit no node, and the pool fields."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.config import H100_NODE, REPO, upstream_schema
from tests.support.manifests import load_crd_schema, schema_errors
from tests.test_kuberay import CRD, H100, make_config
from tuneplane.backends.base import BackendJob
from tuneplane.backends.kuberay import render_rayjob
from tuneplane.backends.kuberay_pods import node_groups
from tuneplane.config import GpuPool, PlatformConfig, load_config
from tuneplane.control.admission import policy_problems
from tuneplane.errors import BackendError, ConfigError
from tuneplane.spec import DistributedSpec, TuningSpec, load_spec, parse_spec

NODE = H100_NODE  # 8 GPUs, 192 CPUs, 1800Gi, 80Gi per GPU


def shaped_config(**shape: Any) -> PlatformConfig:
    config = make_config()
    config.gpu_pools["h100"] = GpuPool.model_validate({**H100, **(shape or NODE)})
    return config


def recipe(**distributed: Any) -> TuningSpec:
    """The 8B recipe (pool h100, 8 CPUs and 96Gi per worker) with other distributed settings."""
    raw = load_spec(REPO / "jobs" / "llama3-8b-lora-zero2.yaml").to_dict()
    raw["distributed"].update(distributed)
    return parse_spec(raw)


def render(spec: TuningSpec, config: PlatformConfig) -> dict[str, Any]:
    job = BackendJob(id="node-shape-test", team="team-a", namespace="ml-team-a", spec=spec)
    return render_rayjob(job, config)


# (num_workers, gpus_per_worker, node shape or None) -> (group, replicas, workers per pod, GPUs per pod)
PACKING = [
    ((1, 1, NODE), [("workers", 1, 1, 1)]),
    ((8, 1, NODE), [("workers", 1, 8, 8)]),
    ((16, 1, NODE), [("workers", 2, 8, 8)]),
    ((12, 1, NODE), [("workers", 1, 8, 8), ("workers-partial", 1, 4, 4)]),
    ((3, 2, NODE), [("workers", 1, 3, 6)]),
    ((5, 2, NODE), [("workers", 1, 4, 8), ("workers-partial", 1, 1, 2)]),
    ((4, 8, NODE), [("workers", 4, 1, 8)]),
    ((2, 0, NODE), [("workers", 2, 1, 0)]),  # CPU job: one pod per worker
    ((12, 1, None), [("workers", 12, 1, 1)]),  # no node shape: one pod per worker
]


@pytest.mark.parametrize(
    ("job", "expected"), PACKING, ids=[str(job[:2]) + str(bool(job[2])) for job, _ in PACKING]
)
def test_packing_rule(
    job: tuple[int, int, dict[str, Any] | None], expected: list[tuple[str, int, int, int]]
) -> None:
    num_workers, gpus_per_worker, shape = job
    dist = DistributedSpec(num_workers=num_workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=8)
    pool = GpuPool.model_validate(shape or {})
    groups = node_groups(dist, pool)
    assert [(g.name, g.replicas, g.workers, g.gpus) for g in groups] == expected
    assert sum(g.replicas * g.workers for g in groups) == num_workers
    assert all(g.cpus == 8 * g.workers for g in groups)


def test_pod_holds_its_workers_cpus_and_memory() -> None:
    dist = DistributedSpec(num_workers=12, gpus_per_worker=1, cpus_per_worker=1.5, memory_per_worker="96G")
    full, partial = node_groups(dist, GpuPool.model_validate(NODE))
    assert (full.cpus, full.memory, full.ray_cpus) == (12, "768G", "12")
    assert (partial.cpus, partial.memory, partial.ray_cpus) == (6, "384G", "6")
    dist = DistributedSpec(num_workers=3, gpus_per_worker=1, cpus_per_worker=1.5, memory_per_worker="160Gi")
    (pod,) = node_groups(dist, GpuPool.model_validate(NODE))
    assert (pod.cpus, pod.memory, pod.ray_cpus) == (4.5, "480Gi", "5")  # Ray counts whole CPUs: rounded up


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    return load_crd_schema(upstream_schema(CRD))


@pytest.mark.parametrize(("gpus", "pods"), [(1, [1]), (8, [8]), (16, [8, 8]), (12, [8, 4])])
def test_rendered_node_pods(crd_schema: dict[str, Any], gpus: int, pods: list[int]) -> None:
    rayjob = render(recipe(num_workers=gpus), shaped_config())
    assert schema_errors(rayjob, crd_schema) == []
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert (
        "nvidia.com/gpu" not in head["limits"]
        and "num-gpus" not in cluster["headGroupSpec"]["rayStartParams"]
    )
    rendered_pods = []
    for group in cluster["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        n = int(limits["nvidia.com/gpu"])
        assert limits == {"cpu": str(8 * n), "memory": f"{96 * n}Gi", "nvidia.com/gpu": str(n)}
        assert pod["containers"][0]["resources"]["requests"] == {"cpu": str(8 * n), "memory": f"{96 * n}Gi"}
        assert group["rayStartParams"] == {"num-gpus": str(n), "num-cpus": str(8 * n)}
        assert pod["nodeSelector"] == H100["node_selector"]
        rendered_pods += [n] * group["replicas"]
    assert rendered_pods == pods and sum(rendered_pods) == gpus


def test_no_node_shape_renders_one_pod_per_worker_as_before() -> None:
    spec = recipe(num_workers=12)
    (group,) = render(spec, make_config())["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 12 and group["rayStartParams"] == {"num-gpus": "1"}
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "8",
        "memory": "96Gi",
        "nvidia.com/gpu": "1",
    }


@pytest.mark.parametrize(
    ("distributed", "field", "message"),
    [
        (
            {"num_workers": 1, "gpus_per_worker": 16},
            "distributed.gpus_per_worker",
            "16 GPUs per worker do not fit",
        ),
        ({"num_workers": 2, "gpus_per_worker": 3}, "distributed.gpus_per_worker", "not a multiple of 3"),
        ({"cpus_per_worker": 32}, "distributed.cpus_per_worker", "8 workers per node x 32 CPUs do not fit"),
        ({"num_workers": 1, "cpus_per_worker": 200}, "distributed.cpus_per_worker", "200 CPUs do not fit"),
        ({"memory_per_worker": "240Gi"}, "distributed.memory_per_worker", "x 240Gi do not fit"),
    ],
)
def test_admission_refuses_a_worker_that_fits_no_node(
    distributed: dict[str, Any], field: str, message: str
) -> None:
    spec, config = recipe(**distributed), shaped_config()
    problems = policy_problems(spec, "team-a", config)
    assert any(f == field and message in m for f, m in problems), problems
    with pytest.raises(BackendError, match=field):  # the renderer never writes a pod no node can hold
        render(spec, config)


def test_recipes_fit_the_shipped_node_shape() -> None:
    config = shaped_config()
    for name in ("llama3-8b-lora-zero2.yaml", "llama3-70b-lora-zero3.yaml"):
        spec = load_spec(REPO / "jobs" / name)
        assert [p for p in policy_problems(spec, "team-a", config) if "quota" not in p[1]] == []
    assert (
        policy_problems(recipe(), "team-a", shaped_config(gpus_per_node=8)) == []
    )  # GPUs alone: CPUs, memory unchecked


def test_pool_node_shape_fields() -> None:
    pool = GpuPool.model_validate(NODE)
    assert pool.gpu_memory_bytes() == 80 * 2**30 and pool.memory_per_node_bytes() == 1800 * 2**30
    assert GpuPool().gpu_memory_bytes() is None
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"gpu_pools": {"h100": {"gpu_memory": "80GB", "gpus_per_node": 0}}})
    fields = [field for field, _ in err.value.problems]
    assert fields == ["gpu_pools.h100.gpus_per_node", "gpu_pools.h100.gpu_memory"]
