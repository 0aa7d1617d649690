"""Every way the driver can end leaves the job's MLflow run ended (never RUNNING), with a message that names
the field at fault. Paths that need a Ray cluster (success, a worker's crash, SIGTERM mid-training) are in
tests/test_train.py; these end before Ray starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.support.config import REPO
from tuneplane.errors import PretrainedError
from tuneplane.spec import load_spec


def _runs(tracking: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tiny-cpu")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _spec_file(tmp_path: Path, base: Path) -> Path:
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    spec["model"]["base"] = str(base)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _entrypoint_args(tmp_path: Path, spec: Path, tracking: str) -> list[str]:
    return [
        "--spec", str(spec), "--job-id", "life", "--storage-path", str(tmp_path / "runs"),
        "--tracking-uri", tracking, "--artifact-root", str(tmp_path / "art"),
    ]  # fmt: skip


def test_a_folder_without_a_model_fails_the_run_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuneplane.train.__main__ import main

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(_entrypoint_args(tmp_path, _spec_file(tmp_path, empty), tracking)) == 1
    # The last line is what the local backend shows as the job's message.
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"training failed: model.base: no tokenizer.json in {empty}"
    )
    assert [r.info.status for r in _runs(tracking)] == ["FAILED"]


def test_a_folder_with_a_tokenizer_but_no_weights_names_config_json(tmp_path: Path, tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tuneplane.pretrained import from_pretrained

    partial = tmp_path / "tokenizer-only"
    partial.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, partial / name)
    with pytest.raises(PretrainedError) as info:
        from_pretrained(AutoModelForCausalLM, str(partial))
    assert str(info.value) == f"model.base: no config.json in {partial}"


def test_a_cancel_during_the_data_preflight_ends_the_run_killed(tmp_path: Path, tiny_dir: Path) -> None:
    """SIGTERM arrives while the driver is still reading the data, before Ray (and its own handler) starts."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        import tuneplane.train.launcher as launcher
        from tuneplane.train.__main__ import main

        def slow_preflight(spec):
            os.kill(os.getpid(), signal.SIGTERM)  # the cancel, mid-preflight
            time.sleep(30)

        launcher._data_report = slow_preflight
        sys.exit(main({_entrypoint_args(tmp_path, _spec_file(tmp_path, tiny_dir), tracking)!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert [r.info.status for r in _runs(tracking)] == ["KILLED"], proc.stderr[-2000:]
