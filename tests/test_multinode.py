"""Multi-node for real: a Ray cluster of a head and worker nodes on 127.0.0.1 (separate raylets, each with its own
HOME and temp folder), the model, data and checkpoints on S3 (moto), MLflow over HTTP. Workers spread over the
nodes, and a node killed mid-run (SIGKILL to every process it has) is survived with no example repeated or
skipped and the same final loss."""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.config import REPO
from tests.support.mlflow_server import mlflow_server
from tuneplane.devtools.cluster import (
    CHECKPOINT_SNAPSHOT,
    LoopbackCluster,
    LoopbackNode,
    registered_checkpoints,
)
from tuneplane.spec import TuningSpec, parse_spec
from tuneplane.train import RunSettings, run

pytestmark = pytest.mark.slow

EPOCH = 600  # records in the elastic test's one epoch


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str, tiny_dir: Path) -> str:
    """A bucket holding the tiny base model and the training data: all a worker node may read."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False)
    name = f"multinode-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    fs.put(str(tiny_dir), f"{name}/models/tiny-llama", recursive=True)
    alpaca = REPO / "jobs" / "data" / "tasks-alpaca.jsonl"
    fs.put(str(alpaca), f"{name}/data/tasks-alpaca.jsonl")
    # A short epoch for the elastic test, which trains one to its end.
    fs.pipe(f"{name}/data/tasks-{EPOCH}.jsonl", b"".join(alpaca.read_bytes().splitlines(True)[:EPOCH]))
    return f"s3://{name}"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(moto_endpoint: str) -> Iterator[LoopbackCluster]:
    import ray

    # Short root: Ray's unix sockets live under each node's temp folder (107-character limit).
    root = Path(tempfile.mkdtemp(prefix="tp-rc-", dir="/tmp"))
    cluster = LoopbackCluster(root)  # the head runs no workers (num-cpus 0, as on KubeRay)
    cluster.add_worker_node("node-a")
    cluster.add_worker_node("node-b")
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _spec(bucket: str, **overrides: Any) -> TuningSpec:
    data = yaml.safe_load((REPO / "jobs" / "tiny-cpu.yaml").read_text())
    data["model"]["base"] = f"{bucket}/models/tiny-llama"
    data["data"] = {
        "sources": [{"uri": f"{bucket}/data/tasks-alpaca.jsonl", "format": "alpaca"}],
        "holdout_fraction": 0.0,
        "template": "alpaca",
        "max_seq_len": 128,
    }
    data["eval"] = {}
    data["hyperparameters"] |= {"max_steps": 6, "micro_batch_size": 2, "warmup_steps": 0}
    data["checkpointing"] = {"every_n_steps": 3, "keep": 2}
    data["tracking"] |= {"log_every_n_steps": 1}
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_spec(data)


def _settings(bucket: str, tracking: str, job_id: str, audit: Path) -> RunSettings:
    audit.mkdir(parents=True, exist_ok=True)
    return RunSettings(
        job_id=job_id,
        storage_path=f"{bucket}/runs",
        tracking_uri=tracking,
        example_log_dir=str(audit),
        team="multinode",
    )


def _audit(folder: Path) -> tuple[dict[int, list[str]], set[str]]:
    """Keys trained per step, all ranks together, and the Ray node ids the workers ran on. A step trained again
    after a resume (perhaps by fewer ranks) counts as its last attempt trained it."""
    entries = [
        json.loads(line)
        for file in sorted(folder.glob("rank*.jsonl"))
        for line in file.read_text().splitlines()
    ]
    last = {}
    for item in entries:
        last[item["step"]] = max(last.get(item["step"], 0), item["attempt"])
    trace: dict[int, list[str]] = {}
    for item in entries:
        if item["attempt"] == last[item["step"]]:
            trace.setdefault(item["step"], []).extend(item["keys"])
    nodes = {item["node"] for item in entries}
    return {step: sorted(keys) for step, keys in sorted(trace.items())}, nodes


def _cached_models(node: LoopbackNode) -> list[Path]:
    """Copies of object-storage models in the node's own pretrained cache."""
    return list(node.home.rglob("config.json"))


def test_every_node_listens_on_loopback_only(cluster: LoopbackCluster) -> None:
    """Every server of the cluster's nodes (GCS, raylets, agents, workers) binds 127.0.0.1 only
    (tuneplane.raylocal), with token authentication on."""
    import contextlib

    import psutil

    homes, root = {str(n.home) for n in [cluster.head, *cluster.nodes]}, str(cluster.root)
    listening, seen = set(), 0
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("HOME") in homes or root in " ".join(proc.info["cmdline"] or []):
                seen += 1
                sockets = proc.net_connections(kind="inet")
                listening |= {c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN}
    assert seen >= 3 and listening, (seen, listening)  # the head's and both workers' processes
    assert listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


@pytest.mark.parametrize(
    "overrides",
    [
        {"distributed.zero_stage": 3},
        {"distributed.zero_stage": 2, "method": {"type": "full"}, "hyperparameters.learning_rate": 0.001},
    ],
    ids=["zero3-lora", "zero2-full"],
)
def test_workers_on_two_nodes_with_everything_on_object_storage(
    cluster, bucket, tracking, tmp_path, overrides
) -> None:
    import s3fs
    from mlflow import MlflowClient

    spec = _spec(bucket, **overrides)
    job_id = f"spread-{uuid.uuid4().hex[:6]}"
    result = run(spec, _settings(bucket, tracking, job_id, tmp_path / "audit"))

    assert result.metrics["step"] == 6
    _, nodes = _audit(tmp_path / "audit")
    worker_nodes = {n.node_id for n in cluster.nodes}
    assert nodes == worker_nodes  # one rank per worker node, none on the head
    for node in cluster.nodes:  # each node fetched the base model from S3 into its own cache
        assert _cached_models(node), f"{node.name} has no copy of the base model"
    fs = s3fs.S3FileSystem(anon=False)
    fs.invalidate_cache()
    stored = fs.ls(f"{bucket}/runs/{job_id}")
    assert any("checkpoint_" in path for path in stored), stored  # checkpoints went to S3
    client = MlflowClient(tracking_uri=tracking)
    run_info = client.get_run(result.run_id or "")
    assert run_info.info.status == "FINISHED"
    name, version = (result.model_uri or "").removeprefix("models:/").split("/")
    assert name == "multinode.tiny-cpu-adapter"
    assert client.get_model_version(name, version).tags["tuneplane.job_id"] == job_id
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "model")))
    weights = {p.name for p in local.rglob("*.safetensors")}  # the final model, through S3 and MLflow's HTTP
    assert weights == ({"adapter_model.safetensors"} if "method" not in overrides else {"model.safetensors"})


def _kill_node_after_first_checkpoint(
    cluster: LoopbackCluster, victim: LoopbackNode, prefix: str, killed: list[int], replace: bool = True
) -> None:
    """Kill the node once Ray Train has registered a checkpoint (its checkpoint manager's snapshot on S3 lists
    one): a checkpoint folder appears with the first rank's upload, and even a complete one is only used once
    the controller has taken every rank's report."""
    import s3fs

    fs = s3fs.S3FileSystem(anon=False)
    snapshot = f"{prefix}/{CHECKPOINT_SNAPSHOT}"
    deadline = time.time() + 600
    while time.time() < deadline:
        fs.invalidate_cache()
        if registered_checkpoints(fs.cat(snapshot) if fs.exists(snapshot) else None):
            time.sleep(1.5)  # let training go past the checkpoint, so work is lost and redone
            killed.extend(cluster.kill_node(victim))
            if replace:
                cluster.add_worker_node(f"{victim.name}-replacement")
            return
        time.sleep(0.3)


def test_a_killed_node_is_replaced_and_the_job_resumes_from_s3_exactly(
    cluster, bucket, tracking, tmp_path
) -> None:
    from mlflow import MlflowClient

    spec = _spec(
        bucket,
        **{
            "hyperparameters.max_steps": 30,
            "checkpointing.every_n_steps": 10,
            "distributed.max_failures": 2,
        },
    )
    clean = run(spec, _settings(bucket, tracking, f"clean-{uuid.uuid4().hex[:6]}", tmp_path / "clean"))

    job_id = f"nodeloss-{uuid.uuid4().hex[:6]}"
    victim = cluster.nodes[-1]
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_node_after_first_checkpoint,
        args=(cluster, victim, f"{bucket}/runs/{job_id}", killed),
    )
    killer.start()
    faulty = run(spec, _settings(bucket, tracking, job_id, tmp_path / "faulty"))
    killer.join()
    assert len(killed) >= 2, "the node's raylet and its worker were not both killed"

    clean_trace, _ = _audit(tmp_path / "clean")
    faulty_trace, nodes = _audit(tmp_path / "faulty")
    assert faulty.metrics["step"] == 30
    assert faulty_trace == clean_trace  # the same examples at every step, after the resume too
    flat = [k for keys in faulty_trace.values() for k in keys]
    assert len(flat) == len(set(flat))  # no example trained twice
    assert victim.node_id in nodes and len(nodes) == 3  # it ran on the lost node, then on its replacement

    client = MlflowClient(tracking_uri=tracking)

    def final_loss(run_id: str | None) -> float:
        return client.get_metric_history(run_id or "", "loss")[-1].value

    assert final_loss(faulty.run_id) == pytest.approx(final_loss(clean.run_id), rel=1e-4)
    run_info = client.get_run(faulty.run_id or "")
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["tuneplane.attempts"] == "1"  # one driver attempt...
    assert run_info.data.metrics["resumes"] == 1  # ...whose workers resumed once from the checkpoint


def test_an_elastic_job_goes_on_with_fewer_workers_and_trains_every_example_once(
    cluster, bucket, tracking, tmp_path
) -> None:
    """4 workers (two per node) -> a node is lost, none replaces it -> 2 workers resume from the 4-worker
    checkpoint (ZeRO states re-partitioned, data re-sharded) and finish the epoch."""
    from mlflow import MlflowClient

    spec = _spec(
        bucket,
        **{
            "distributed.num_workers": 4,
            "distributed.min_workers": 2,
            "distributed.cpus_per_worker": 0.5,
            "distributed.max_failures": 2,
            "hyperparameters.max_steps": None,
            "hyperparameters.epochs": 1,
            "checkpointing.every_n_steps": 5,
            "data.sources": [{"uri": f"{bucket}/data/tasks-{EPOCH}.jsonl", "format": "alpaca"}],
        },
    )
    every = {f"{bucket}/data/tasks-{EPOCH}.jsonl:{n}" for n in range(1, EPOCH + 1)}

    job_id = f"elastic-{uuid.uuid4().hex[:6]}"
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_node_after_first_checkpoint,
        args=(cluster, cluster.nodes[-1], f"{bucket}/runs/{job_id}", killed, False),
    )
    killer.start()
    elastic = run(spec, _settings(bucket, tracking, job_id, tmp_path / "elastic"))
    killer.join()
    assert killed

    trace, _ = _audit(tmp_path / "elastic")
    flat = [k for keys in trace.values() for k in keys]
    assert sorted(flat) == sorted(every)  # every example of the epoch: nothing skipped, none twice
    ranks: dict[int, set[str]] = {}  # which ranks trained, per attempt
    for file in (tmp_path / "elastic").glob("rank*.jsonl"):
        for line in file.read_text().splitlines():
            ranks.setdefault(json.loads(line)["attempt"], set()).add(file.stem)
    assert ranks == {0: {"rank0", "rank1", "rank2", "rank3"}, 1: {"rank0", "rank1"}}
    client = MlflowClient(tracking_uri=tracking)
    run_info = client.get_run(elastic.run_id or "")
    assert run_info.info.status == "FINISHED" and run_info.data.metrics["resumes"] == 1
    # The cosine LR schedule (no warmup) goes on from where the resize found it, never up, and ends at 0 on the
    # last step (the rest of the schedule spread over the 2 workers' steps; a step logged again after the
    # resume counts as the resumed attempt logged it).
    lr: dict[int, float] = {}
    for point in sorted(client.get_metric_history(elastic.run_id or "", "lr"), key=lambda m: m.timestamp):
        lr[point.step] = point.value
    values = [lr[step] for step in sorted(lr)]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(values)), values
    assert values[-1] == pytest.approx(0.0, abs=1e-9) and max(lr) == elastic.metrics["step"]
