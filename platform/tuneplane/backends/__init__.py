"""Backends run a job somewhere: `local` (this machine's Ray) or `kuberay` (a RayJob on Kubernetes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneplane.backends.base import Backend, BackendJob, Capabilities, RunPhase, RunStatus

if TYPE_CHECKING:
    from tuneplane.config import PlatformConfig

__all__ = ["Backend", "BackendJob", "Capabilities", "RunPhase", "RunStatus", "make_backend"]


def make_backend(config: PlatformConfig) -> Backend:
    if config.backend.type == "kuberay":
        from tuneplane.backends.kuberay import KubeRayBackend

        return KubeRayBackend(config)
    from tuneplane.backends.local import LocalBackend

    return LocalBackend(config)
