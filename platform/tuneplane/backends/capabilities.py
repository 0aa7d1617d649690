"""What a backend can run, and what it refuses at submit: asked by the control plane, never assumed from the
backend's name.

Answered from the platform config alone (no client built, no cluster asked), so that admission in the API, in a
dry-run worker process and in the CLI's `validate --spec-only` asks the same question and gets the same answer.
A new backend adds one `Profile` to `PROFILES` (and its config section and chart values); nothing outside
backends/ tests which backend runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tuneplane.backends.base import Capabilities
from tuneplane.config import PlatformConfig
from tuneplane.errors import Problems
from tuneplane.spec import TuningSpec


@dataclass(frozen=True)
class Profile:
    capabilities: Callable[[PlatformConfig], Capabilities]
    problems: Callable[[TuningSpec, PlatformConfig], Problems]  # what this backend cannot run of a spec


# The local backend names a job's folders and its Ray Train run by the id: any length a file name allows would
# do, and the spec's name is at most 53 characters.
_LOCAL_ID_LENGTH = 63
# KubeRay derives the RayCluster, Service and submitter Job names from the RayJob name and rejects names over
# 47 characters (status ValidationFailed).
KUBERAY_ID_LENGTH = 47


def _local(config: PlatformConfig) -> Capabilities:
    local = config.local
    assert local is not None, "PROFILES is keyed by the backend's type"
    return Capabilities(
        name="local",
        reads_local_paths=True,
        gpus=False,
        max_job_id_length=_LOCAL_ID_LENGTH,
        host_memory_bytes=local.memory_bytes(),
        max_concurrent_jobs=local.max_concurrent_jobs,
        local_admin_token=True,
    )


def _local_problems(spec: TuningSpec, config: PlatformConfig) -> Problems:
    if spec.distributed.gpus_per_worker:
        return [("distributed.gpus_per_worker", "the local backend runs on CPUs only")]
    return []


def _kuberay(config: PlatformConfig) -> Capabilities:
    return Capabilities(
        name="kuberay",
        reads_local_paths=False,
        gpus=True,
        max_job_id_length=KUBERAY_ID_LENGTH,
        host_memory_bytes=None,
        max_concurrent_jobs=None,
        local_admin_token=False,
    )


def _kuberay_problems(spec: TuningSpec, config: PlatformConfig) -> Problems:
    from tuneplane.backends.kuberay_pods import node_fit_problems

    pool = spec.distributed.gpu_pool
    if pool and pool in config.gpu_pools:  # an unknown pool is admission's to name
        return node_fit_problems(spec.distributed, config.gpu_pools[pool])
    return []


PROFILES: dict[str, Profile] = {
    "local": Profile(_local, _local_problems),
    "kuberay": Profile(_kuberay, _kuberay_problems),
}


def capabilities(config: PlatformConfig) -> Capabilities:
    return PROFILES[config.backend.type].capabilities(config)


def backend_problems(spec: TuningSpec, config: PlatformConfig) -> Problems:
    """What the configured backend cannot run of `spec` (node shapes, GPUs), naming the field."""
    return PROFILES[config.backend.type].problems(spec, config)
