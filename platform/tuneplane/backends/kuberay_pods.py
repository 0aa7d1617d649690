"""How a job's Ray Train workers are packed into Ray worker pods (KubeRay workerGroupSpecs).

Pure rules, no Kubernetes: admission asks `node_fit_problems` before a job is queued, the renderer asks
`node_groups` for the pods to render.

The packing rule. A GPU pool that states its node shape (`gpus_per_node`) gets one Ray worker pod per node:
- workers per node = gpus_per_node // gpus_per_worker; a pod holds the GPUs of all its workers and the CPUs and
  memory they ask for (cpus_per_worker x workers, memory_per_worker x workers);
- the job's GPUs (num_workers x gpus_per_worker) fill whole nodes first (group `workers`, one replica per node);
  a remainder that is not a whole node becomes one smaller pod (group `workers-partial`, 1 replica). A job
  smaller than a node is that one pod alone, in group `workers`;
- Ray Train then places one training worker per GPU group; its default PACK placement keeps a node's workers
  together, so ranks on one node talk over NVLink.
Without a node shape, and for CPU jobs, every Ray Train worker gets its own pod (group `workers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuneplane.config import GpuPool
from tuneplane.quantity import bytes_quantity, quantity_bytes
from tuneplane.spec import DistributedSpec

FULL_GROUP, PARTIAL_GROUP = "workers", "workers-partial"


@dataclass(frozen=True)
class PodGroup:
    """One KubeRay worker group: `replicas` identical pods, each holding `workers` Ray Train workers."""

    name: str
    replicas: int
    workers: int
    gpus: int
    cpus: float
    memory: str | None  # Kubernetes quantity, None when the spec asks for none
    node_sized: bool = False  # packed by the pool's node shape (else one pod per Ray Train worker)

    @property
    def ray_cpus(self) -> str:
        """`ray start --num-cpus` (an integer): the pod's CPUs, rounded up as KubeRay does itself."""
        return str(math.ceil(self.cpus))


def node_fit_problems(dist: DistributedSpec, pool: GpuPool) -> list[tuple[str, str]]:
    """Why the largest pod of this job cannot fit one node of the pool ((field, message) pairs; none when it
    fits or the pool states no node shape). A pod that fits no node stays Pending for ever."""
    problems: list[tuple[str, str]] = []
    per_node = pool.gpus_per_node
    if dist.gpus_per_worker and per_node is not None:
        if dist.gpus_per_worker > per_node:
            problems.append(
                (
                    "distributed.gpus_per_worker",
                    f"{dist.gpus_per_worker} GPUs per worker do not fit one node of this pool "
                    f"({per_node} GPUs per node)",
                )
            )
        elif per_node % dist.gpus_per_worker:
            problems.append(
                (
                    "distributed.gpus_per_worker",
                    f"{per_node} GPUs per node are not a multiple of {dist.gpus_per_worker} GPUs per worker; "
                    f"use a divisor of {per_node}",
                )
            )
    if problems:
        return problems
    workers = _largest_pod_workers(dist, pool)
    if pool.cpus_per_node is not None and workers * dist.cpus_per_worker > pool.cpus_per_node:
        problems.append(
            (
                "distributed.cpus_per_worker",
                f"{_count(workers)}{dist.cpus_per_worker:g} CPUs do not fit one node of this pool "
                f"({pool.cpus_per_node:g} CPUs per node)",
            )
        )
    node_memory = pool.memory_per_node_bytes()
    worker_memory = quantity_bytes(dist.memory_per_worker) if dist.memory_per_worker else 0
    if node_memory is not None and workers * worker_memory > node_memory:
        problems.append(
            (
                "distributed.memory_per_worker",
                f"{_count(workers)}{dist.memory_per_worker} do not fit one node of this pool "
                f"({pool.memory_per_node} per node)",
            )
        )
    return problems


def node_groups(dist: DistributedSpec, pool: GpuPool | None) -> list[PodGroup]:
    """The worker groups of a job (see the module's packing rule). ValueError when a worker cannot fit a node
    (admission refuses such a job first: see node_fit_problems)."""
    if pool is None or pool.gpus_per_node is None or not dist.gpus_per_worker:
        one = PodGroup(
            FULL_GROUP,
            dist.num_workers,
            1,
            dist.gpus_per_worker,
            dist.cpus_per_worker,
            dist.memory_per_worker,
        )
        return [one]
    problems = node_fit_problems(dist, pool)
    if problems:
        raise ValueError("; ".join(f"{field}: {message}" for field, message in problems))
    per_node = pool.gpus_per_node // dist.gpus_per_worker
    full_nodes, rest = divmod(dist.num_workers, per_node)
    groups = [_group(FULL_GROUP, full_nodes, per_node, dist)] if full_nodes else []
    if rest:
        groups.append(_group(PARTIAL_GROUP if full_nodes else FULL_GROUP, 1, rest, dist))
    return groups


def _group(name: str, replicas: int, workers: int, dist: DistributedSpec) -> PodGroup:
    memory = None
    if dist.memory_per_worker:
        memory = bytes_quantity(workers * quantity_bytes(dist.memory_per_worker))
    gpus, cpus = workers * dist.gpus_per_worker, workers * dist.cpus_per_worker
    return PodGroup(name, replicas, workers, gpus, cpus, memory, node_sized=True)


def _largest_pod_workers(dist: DistributedSpec, pool: GpuPool) -> int:
    """Ray Train workers in the job's largest pod: a node's worth when packed, else one."""
    if pool.gpus_per_node is None or not dist.gpus_per_worker:
        return 1
    return min(dist.num_workers, pool.gpus_per_node // dist.gpus_per_worker)


def _count(workers: int) -> str:
    return f"{workers} workers per node x " if workers > 1 else ""
