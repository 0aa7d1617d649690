"""The training runtime for real: Ray Train (2 workers, gloo) + DeepSpeed ZeRO + PEFT + MLflow, on CPU."""

from __future__ import annotations

import copy
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.config import REPO
from tuneplane.devtools.cluster import CHECKPOINT_SNAPSHOT, registered_checkpoints
from tuneplane.spec import TuningSpec, parse_spec, resolve_paths
from tuneplane.train import RunResult, RunSettings, TrainingFailed, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _spec(tiny_dir: Path, job: str = "tiny-cpu.yaml", **overrides: Any) -> TuningSpec:
    """A shipped job (jobs/JOB) on the session's tiny model, with dotted-key overrides."""
    data = yaml.safe_load((REPO / "jobs" / job).read_text())
    data["model"]["base"] = str(tiny_dir)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return resolve_paths(parse_spec(data), REPO / "jobs")


def _settings(
    tmp_path: Path, job_id: str, tracking: bool = True, example_log_dir: str | None = None
) -> RunSettings:
    return RunSettings(
        job_id=job_id,
        storage_path=str(tmp_path / "runs"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}" if tracking else None,
        artifact_root=str(tmp_path / "artifacts"),
        example_log_dir=example_log_dir,
    )


SHORT = {
    "data.sources": [{"uri": "data/tasks-alpaca.jsonl", "format": "alpaca"}],
    "data.holdout_fraction": 0.0,
    "data.max_seq_len": 128,
    "hyperparameters.max_steps": 6,
    "hyperparameters.micro_batch_size": 2,
    "hyperparameters.warmup_steps": 0,
    "checkpointing.every_n_steps": 3,
    "tracking.log_every_n_steps": 1,
    "eval.zero_shot_sources": [],
    "eval.lm_eval": None,
    "eval.gate": None,
    "data.dedup": "off",
    "data.decontaminate": False,
}


def _safetensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize(
    ("stage", "offload"), [(2, False), (3, False), (2, True)], ids=["zero2", "zero3", "zero2-offload"]
)
def test_zero_stages_train_and_save_a_usable_adapter(ray_local, tiny_dir, tmp_path, stage, offload) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = _spec(
        tiny_dir, **SHORT, **{"distributed.zero_stage": stage, "distributed.offload_optimizer": offload}
    )
    settings = _settings(tmp_path, f"zero{stage}-{int(offload)}", tracking=stage == 2 and not offload)
    result = run(spec, settings)
    assert result.metrics["step"] == 6
    adapter = Path(result.model_dir or "")
    tensors = _safetensors(adapter)
    # Under ZeRO-3 an ungathered save writes empty tensors: every tensor must have its full shape.
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    # LoRA trains only adapter weights (and the modules the spec asks to save in full).
    assert all(
        "lora_" in name or "modules_to_save" in name or "embed_tokens" in name or "lm_head" in name
        for name in tensors
    )
    assert any(("lora_B" in n) and t.abs().sum() > 0 for n, t in tensors.items())  # B starts at 0: it moved
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(adapter))
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        with tuned.disable_adapter():
            torch.testing.assert_close(tuned(ids).logits, base(ids).logits)  # base weights untouched
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)
    if settings.tracking_uri:  # the LoRA adapter, registered, loads in a fresh process through the registry
        assert result.model_uri == "models:/tiny-cpu-adapter/1"
        answers = _predict_in_fresh_process(
            settings.tracking_uri, result.model_uri, ["Repeat the word.\n\nabc"]
        )
        assert len(answers) == 1 and isinstance(answers[0], str)


def _predict_in_fresh_process(tracking_uri: str, model_uri: str, prompts: list[str]) -> list[str]:
    code = (
        f"import json, mlflow; mlflow.set_tracking_uri({tracking_uri!r}); "
        f"m = mlflow.pyfunc.load_model({model_uri!r}); print(json.dumps(m.predict({prompts!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_learning_raises_heldout_accuracy_and_registers_a_loadable_model(
    ray_local, tiny_dir, tmp_path
) -> None:
    spec = _spec(
        tiny_dir,
        **{
            "data.sources": [
                {"uri": "data/tasks-alpaca.jsonl", "format": "alpaca"},
                {
                    "uri": "data/parity-labeled.jsonl",
                    "format": "labeled",
                    "templates": [{"prompt": "Is {number} even or odd?"}],
                },
            ],
            # A random tiny base learns far faster with all weights trainable than through adapters.
            "method": {"type": "full"},
            # As before data filtering existed: decontaminated (14 of the 100 parity eval questions also occur
            # in training), this tiny run reaches ~0.56 on parity instead of > 0.6. The filter has its own test.
            "data.dedup": "off",
            "data.decontaminate": False,
            "hyperparameters.learning_rate": 0.001,
            "hyperparameters.lr_scheduler": "constant",
            "hyperparameters.max_steps": 400,
            "checkpointing.every_n_steps": 1000,
            "tracking.log_every_n_steps": 50,
            "eval.zero_shot_sources": [
                {
                    "uri": "data/parity-labeled-eval.jsonl",
                    "format": "labeled",
                    "templates": [{"prompt": "Is {number} even or odd?"}],
                },
                {"uri": "data/tasks-alpaca-eval.jsonl", "format": "alpaca"},
            ],
            "eval.max_examples": 50,
            "eval.gate": {
                "eval_loss_improves": True,
                "tasks": {"parity-labeled-eval": {"min": 0.6, "min_gain": 0.3}, "tiny_parity": {"min": 0.0}},
                "keep": {"tasks-alpaca-eval": 0.05},
            },
        },
    )
    settings = _settings(tmp_path, "learn")
    result = run(spec, settings)
    m = result.metrics
    assert m["zero_shot_base/mean"] <= 0.05
    assert m["zero_shot/mean"] >= 0.25, m
    assert m["zero_shot/parity-labeled-eval"] > 0.6, m  # above the 0.5 of guessing once the format is learned
    assert m["eval_loss"] < m["eval_loss_base"]
    assert 0 <= m["lm_eval_base/tiny_parity"] <= 1 and 0 <= m["lm_eval/tiny_parity"] <= 1
    assert result.gate is not None and result.gate["status"] == "passed", result.gate
    assert result.model_uri == "models:/tiny-cpu-adapter/1"
    # The mixture actually trained: both sources' trained tokens, summing to the run's trained tokens.
    trained = {k: v for k, v in m.items() if k.startswith("source_tokens/")}
    assert set(trained) == {"source_tokens/tasks-alpaca", "source_tokens/parity-labeled"}
    assert all(v > 0 for v in trained.values())

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run_info = client.get_run(result.run_id or "")
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["method.type"] == "full"
    assert run_info.data.tags["tuneplane.job_id"] == "learn"
    assert run_info.data.metrics["zero_shot/mean"] == pytest.approx(m["zero_shot/mean"])
    history = client.get_metric_history(result.run_id or "", "loss")
    assert [h.step for h in history][-1] == 400 and history[-1].value < history[0].value
    version = client.get_model_version("tiny-cpu-adapter", "1")
    assert version.tags["tuneplane.job_id"] == "learn"
    assert version.tags["tuneplane.base_model"] == str(tiny_dir)
    assert {"tuneplane.spec_hash", "tuneplane.dataset_fingerprint"} <= set(version.tags)
    assert version.tags["tuneplane.publishing.gate"] == "passed"
    # The model card is the version's description; its numbers are the run's.
    from tuneplane.publishing.gate import fmt

    card = version.description
    for key in ("eval_loss", "eval_loss_base", "zero_shot/parity-labeled-eval", "lm_eval/tiny_parity"):
        assert fmt(m[key]) in card, key
    assert (
        f"{int(m['source_tokens/parity-labeled']):,}" in card
        or str(int(m["source_tokens/parity-labeled"])) in card
    )
    loss_curves = {k for k in run_info.data.metrics if k.startswith("source_loss/")}
    assert loss_curves == {"source_loss/tasks-alpaca", "source_loss/parity-labeled"}

    # A consumer in a fresh process loads models:/NAME/VERSION and generates.
    answers = _predict_in_fresh_process(
        settings.tracking_uri or "", "models:/tiny-cpu-adapter/1", ["Is 14 even or odd?", "Is 7 even or odd?"]
    )
    assert len(answers) == 2 and all(a in {"even", "odd"} for a in answers), answers


ACCUMULATION = 5  # the dedup test's gradient accumulation: its epoch's micro-batches are not a multiple of it


def test_duplicates_and_contaminated_records_are_never_trained_and_a_missed_gate_is_not_registered(
    ray_local, tiny_dir, tmp_path
) -> None:
    """Planted exact duplicates and training records copied into the eval set: with dedup and decontamination
    the run trains every other record exactly once and never those (checked from the example log); an
    impossible gate leaves the model unregistered, with the reason in the run and the result."""
    import random

    from mlflow import MlflowClient

    rng = random.Random(7)
    words = [f"w{i}" for i in range(5000)]  # random records: no two share a 13-word run unless planted

    def record() -> dict[str, str]:
        return {
            "instruction": " ".join(rng.choices(words, k=16)),
            "output": " ".join(rng.choices(words, k=4)),
        }

    clean = [record() for _ in range(96)]
    train = [*clean, clean[10], clean[20], clean[30]]  # lines 97-99 repeat lines 11, 21 and 31
    held_out = [clean[5], clean[6], *(record() for _ in range(8))]  # lines 6 and 7 of training leaked
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    eval_source = {"uri": str(eval_file), "format": "alpaca", "name": "eval-set"}
    spec = _spec(
        tiny_dir,
        **(
            SHORT
            | {
                "data.sources": [{"uri": str(train_file), "format": "alpaca"}],
                "data.dedup": "exact",
                "data.decontaminate": True,
                "hyperparameters.max_steps": None,
                "hyperparameters.epochs": 1,
                "hyperparameters.gradient_accumulation_steps": ACCUMULATION,
                "checkpointing.every_n_steps": 1000,
                "eval.zero_shot_sources": [eval_source],
                "eval.max_examples": 4,
                "eval.gate": {"tasks": {"eval-set": {"min": 1.0}}},
            }
        ),
    )
    log = _mk(tmp_path / "trace")
    settings = _settings(tmp_path, "gated", example_log_dir=str(log))
    result = run(spec, settings)

    trained = [k for keys in _trace(log).values() for k in keys]
    dropped = {f"{train_file}:{line}" for line in (97, 98, 99, 6, 7)}
    assert sorted(trained) == sorted(
        f"{train_file}:{line}" for line in range(1, 100) if f"{train_file}:{line}" not in dropped
    )
    # The epoch's micro-batches (of the rank with the most) are not a multiple of the accumulation: the last
    # optimizer step trains the remainder (completed with idle micro-batches), so the run has ceil(...) steps.
    batches = max(sum(e["micro_batches"] for e in _entries(file)) for file in log.glob("rank*.jsonl"))
    assert batches % ACCUMULATION != 0, batches
    steps = math.ceil(batches / ACCUMULATION)
    assert result.metrics["step"] == steps and sorted(_trace(log)) == list(range(1, steps + 1))
    assert result.model_uri is None
    assert result.gate is not None and result.gate["status"] == "failed"
    assert any("eval-set" in failure and "min 1.00" in failure for failure in result.gate["failures"]), (
        result.gate
    )

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    assert client.search_model_versions() == []  # a gate is checked before anything reaches the registry
    run_info = client.get_run(result.run_id or "")
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["tuneplane.publishing.gate"] == "failed"
    assert "eval-set" in run_info.data.tags["tuneplane.publishing.gate.failures"]
    assert run_info.data.metrics["data/exact_duplicates"] == 3
    assert run_info.data.metrics["data/contaminated"] == 2
    artifacts = {a.path for a in client.list_artifacts(result.run_id or "")}
    assert "MODEL_CARD.md" in artifacts


def _kill_a_worker_after_first_checkpoint(storage: Path, job_id: str, killed: list[int]) -> None:
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline:
        snapshot = storage / job_id / CHECKPOINT_SNAPSHOT
        if registered_checkpoints(snapshot.read_bytes() if snapshot.exists() else None):
            time.sleep(1.5)  # let training go past the checkpoint, so work is lost and redone
            for proc in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


def _entries(file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in file.read_text().splitlines()]


def _trace(folder: Path) -> dict[int, list[str]]:
    """Keys trained per step, all ranks together; a step redone after a failure keeps its last record."""
    per_rank: dict[str, dict[int, list[str]]] = {}
    for file in sorted(folder.glob("rank*.jsonl")):
        for line in file.read_text().splitlines():
            item = json.loads(line)
            per_rank.setdefault(file.stem, {})[item["step"]] = item["keys"]
    steps = sorted({s for trace in per_rank.values() for s in trace})
    return {s: sorted(k for trace in per_rank.values() for k in trace.get(s, [])) for s in steps}


def clean_and_killed_runs(
    spec: TuningSpec, tmp_path: Path
) -> tuple[RunResult, RunResult, dict[int, list[str]], dict[int, list[str]]]:
    """The job run twice, the second time with a worker killed after its first checkpoint: both results and
    which records each step trained on in each run."""
    clean = run(
        spec, _settings(tmp_path / "clean", "clean", example_log_dir=str(_mk(tmp_path / "trace-clean")))
    )
    killed: list[int] = []
    storage = tmp_path / "faulty" / "runs"
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(storage, "faulty", killed))
    killer.start()
    faulty = run(
        spec, _settings(tmp_path / "faulty", "faulty", example_log_dir=str(_mk(tmp_path / "trace-faulty")))
    )
    killer.join()
    assert killed, "no worker was killed"
    return clean, faulty, _trace(tmp_path / "trace-clean"), _trace(tmp_path / "trace-faulty")


def test_worker_killed_mid_run_resumes_from_checkpoint_without_repeating_data(
    ray_local, tiny_dir, tmp_path
) -> None:
    from mlflow import MlflowClient

    overrides = copy.deepcopy(SHORT) | {
        "hyperparameters.max_steps": 40,
        "checkpointing.every_n_steps": 10,
        "distributed.max_failures": 2,
    }
    clean, faulty, clean_trace, faulty_trace = clean_and_killed_runs(_spec(tiny_dir, **overrides), tmp_path)
    assert faulty.metrics["step"] == 40
    assert faulty_trace == clean_trace  # the same examples at every step, after the resume too
    flat = [k for keys in faulty_trace.values() for k in keys]
    assert len(flat) == len(set(flat))  # no example seen twice (one epoch is not exhausted in 40 steps)

    def final_loss(root: Path, result) -> float:
        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        return client.get_metric_history(result.run_id, "loss")[-1].value

    assert final_loss(tmp_path / "faulty", faulty) == pytest.approx(
        final_loss(tmp_path / "clean", clean), rel=1e-4
    )
    _assert_checkpoints_hold_no_frozen_base(tmp_path / "faulty" / "runs" / "faulty", tiny_dir)


def _assert_checkpoints_hold_no_frozen_base(job_storage: Path, tiny_dir: Path) -> None:
    """A LoRA run's DeepSpeed checkpoint holds what trains (adapter, modules_to_save copies) and its optimizer
    state, never the frozen base weights: no base-layer, norm or original-module tensor, no ZeRO frozen-parameter
    fragments (before: 1.67 MB of model states, with the whole base; now 0.64 MB, nearly all the tiny-cpu
    job's trainable lm_head and embed_tokens copies)."""
    import torch

    states = sorted(job_storage.glob("*/deepspeed/state/*model_states.pt"))
    assert states, f"no DeepSpeed checkpoint under {job_storage}"
    for file in states:
        saved = torch.load(file, map_location="cpu", weights_only=False)
        assert saved["module"] and all("lora_" in k or "modules_to_save" in k for k in saved["module"]), [
            k for k in saved["module"] if "lora_" not in k and "modules_to_save" not in k
        ][:5]
        assert not saved.get("frozen_param_fragments")
        # The file is the trained tensors and a little metadata; the base would add its whole size (~1 MB).
        trained = sum(t.numel() * t.element_size() for t in saved["module"].values())
        base = (tiny_dir / "model.safetensors").stat().st_size
        assert file.stat().st_size < trained + 64 * 1024 < trained + base


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_rerun_with_the_same_job_id_resumes_and_counts_the_attempt(ray_local, tiny_dir, tmp_path) -> None:
    from mlflow import MlflowClient

    spec = _spec(tiny_dir, **(SHORT | {"tracking.export_merged": True}))
    settings = _settings(tmp_path, "again")
    first = run(spec, settings)
    second = run(spec, settings)  # e.g. the driver pod was replaced: same job id, same storage
    assert first.run_id == second.run_id
    assert first.model_uri == second.model_uri == "models:/tiny-cpu-adapter/1"  # not registered twice
    assert second.metrics["step"] == 6  # resumed from the last checkpoint: nothing left to train
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run_info = client.get_run(second.run_id or "")
    assert run_info.data.tags["tuneplane.attempts"] == "2"
    assert run_info.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(second.run_id or "")}
    assert {"data", "merged"} <= artifacts
    report = client.download_artifacts(second.run_id or "", "data/preflight.json", str(tmp_path))
    assert json.loads(Path(report).read_text())["sources"][0]["records"] == 2000
    merged = {a.path for a in client.list_artifacts(second.run_id or "", "merged")}
    assert "merged/model.safetensors" in merged  # plain weights, loadable without PEFT


def test_a_crash_marks_the_mlflow_run_failed(ray_local, tiny_dir, tmp_path) -> None:
    from mlflow import MlflowClient

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n' * 50 + '{"instruction": "no output"}\n' * 50)
    spec = _spec(
        tiny_dir,
        **(SHORT | {"data.sources": [{"uri": str(bad), "format": "alpaca"}], "distributed.max_failures": 0}),
    )
    settings = _settings(tmp_path, "crash")
    with pytest.raises(TrainingFailed) as info:
        run(spec, settings)
    # Line 51 is rank 0's first bad record, 52 rank 1's: whichever fails first is reported.
    assert re.search(rf"DataError: {re.escape(str(bad))}:5[12]: missing field 'output'", str(info.value))
    assert "Traceback" not in str(info.value)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_sigterm_marks_the_run_killed(tiny_dir, tmp_path) -> None:
    """The entrypoint as a backend starts it; a SIGTERM (pod deletion, cancel) ends it and marks the run KILLED."""
    from mlflow import MlflowClient

    spec = _spec(
        tiny_dir, **(SHORT | {"hyperparameters.max_steps": 5000, "checkpointing.every_n_steps": 1000})
    )
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec.to_dict()))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--spec",
        str(spec_path),
        "--job-id",
        "term",
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        tracking,
        "--artifact-root",
        str(tmp_path / "art"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneplane.train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = MlflowClient(tracking_uri=tracking)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            experiment = (
                client.get_experiment_by_name("tiny-cpu") if (tmp_path / "mlflow.db").exists() else None
            )
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and "loss" in runs[0].data.metrics:  # training is under way
                break
            time.sleep(1)
        else:
            pytest.fail("training never started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) != 0
    finally:
        proc.kill()
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"
