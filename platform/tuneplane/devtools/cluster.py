"""A multi-node Ray cluster on 127.0.0.1 for tests and benchmarks: a head and worker nodes, each a separate
raylet with its own temporary folder and its own HOME, so a run cannot silently rely on a disk only one node sees
(the tuneplane state folder, the pretrained-model cache and Ray's session files all live under HOME or the
node's temp folder).

A node is killed the way a preempted machine dies: every process whose environment carries the node's HOME (its
raylet, agents and Ray Train workers) gets SIGKILL at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class LoopbackNode:
    name: str
    home: Path
    node: Any  # ray._private.node.Node

    @property
    def node_id(self) -> str:
        return str(self.node.node_id)


class LoopbackCluster:
    def __init__(self, root: Path, head_cpus: int = 0):
        from tuneplane.raylocal import use_loopback

        use_loopback()  # every node on 127.0.0.1 only, one token for the cluster
        from ray._private.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        # Ray's Cluster writes the head's address into the default temp folder (/tmp/ray) whatever the nodes'
        # own temp_dir, and fails where no Ray ever ran outside a sandbox (a fresh machine: local jobs keep
        # their Ray in a private /tmp).
        Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.nodes: list[LoopbackNode] = []
        # No exit hooks: they install signal handlers, which would forbid adding a node from a thread (a test
        # replaces a killed node while its driver waits on the job). `shutdown` ends every node instead.
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args=self._node_args("head", head_cpus),
            shutdown_at_exit=False,
        )
        self.head = LoopbackNode("head", self._home("head"), self._cluster.head_node)

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    def add_worker_node(self, name: str, num_cpus: int = 1) -> LoopbackNode:
        node = self._cluster.add_node(wait=True, **self._node_args(name, num_cpus))
        handle = LoopbackNode(name, self._home(name), node)
        self.nodes.append(handle)
        return handle

    def kill_node(self, handle: LoopbackNode) -> list[int]:
        """SIGKILL every process of the node at once; returns their pids."""
        import psutil

        marker = str(handle.home)
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid != os.getpid() and proc.environ().get("HOME") == marker:
                    found[proc.pid] = proc
                    found.update({child.pid: child for child in proc.children(recursive=True)})
        victims = list(found.values())
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=10)
        self.nodes.remove(handle)
        return [p.pid for p in victims]

    def wait_for_nodes(self, alive: int, timeout_s: float = 60) -> None:
        import ray

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if sum(1 for n in ray.nodes() if n["Alive"]) == alive:
                return
            time.sleep(0.5)
        raise TimeoutError(f"expected {alive} alive Ray nodes")

    def shutdown(self) -> None:
        self._cluster.shutdown()

    def _home(self, name: str) -> Path:
        return self.root / name / "home"

    def _node_args(self, name: str, num_cpus: int) -> dict[str, Any]:
        home, temp = self._home(name), self.root / name / "tmp"
        home.mkdir(parents=True, exist_ok=True)
        temp.mkdir(parents=True, exist_ok=True)
        return {
            "num_cpus": num_cpus,
            "temp_dir": str(temp),
            "object_store_memory": 100 * 1024 * 1024,
            "env_vars": {"HOME": str(home), "TMPDIR": str(temp), "TUNEPLANE_NODE": name},
            # Node labels let a test see where each worker ran without trusting its own report.
            "include_dashboard": False,
        }


# Ray Train's record of the checkpoints its controller registered, in the run's storage folder.
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_checkpoints(snapshot_text: str | bytes | None) -> int:
    """How many checkpoints Ray Train has registered, from its snapshot's text (None: not written yet). A
    checkpoint folder appears with the first rank's upload, and even a complete one is only used once the
    controller has taken every rank's report: this is the moment a kill leaves a usable checkpoint behind."""
    import json

    if not snapshot_text:
        return 0
    try:
        return len(json.loads(snapshot_text)["checkpoint_results"])
    except (ValueError, KeyError, TypeError):  # caught mid-write
        return 0
