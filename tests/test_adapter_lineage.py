"""A job that starts from a registered adapter (`model.adapter: models:/<team>.<name>/<version>`): the real
MLflow registry (SQLite in tmp_path), the real fetch and PEFT load, the team rule at admission, and the lineage
the new version records."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.config import REPO, platform_config
from tuneplane.backends.capabilities import KUBERAY_ID_LENGTH
from tuneplane.control.admission import policy_problems
from tuneplane.errors import PretrainedError, SpecError
from tuneplane.pretrained import fetch_adapter
from tuneplane.spec import TuningSpec, adapter_is_job_id, load_spec, parse_spec
from tuneplane.store.jobs import new_job_id
from tuneplane.store.models import ID_LENGTH
from tuneplane.train.builders import load_model

FINAL = {"step": 1, "tokens": 10}


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero B (so it changes the model), saved as training saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), LoraConfig(r=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(out))
    return out


def _spec(tiny_dir: Path, method: dict[str, Any] | None = None, **model: Any) -> TuningSpec:
    data = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    data["model"] |= {"base": str(tiny_dir), **model}
    data["eval"].update(zero_shot_sources=[], gate=None, lm_eval=None)
    data["method"] = method or data["method"]
    return TuningSpec.model_validate(data)


def _register(spec: TuningSpec, job_id: str, adapter: Path, tmp_path: Path, tracking: str) -> str | None:
    from tuneplane.publishing.publish import publish
    from tuneplane.tracking.run import JobRun

    model_dir = tmp_path / job_id
    shutil.copytree(adapter, model_dir)
    run = JobRun.start(spec, job_id, tracking, str(tmp_path / "artifacts"), team="alpha")
    published = publish(spec, job_id, run, model_dir, FINAL)
    run.finish()
    return published.model_uri


@pytest.fixture(scope="module")
def registered(tiny_dir: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("registry")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    uri = _register(_spec(tiny_dir), "sft-job", adapter, root, tracking)
    assert uri == "models:/alpha.tiny-cpu-adapter/1"
    return uri, tracking


def test_a_lora_job_goes_on_training_the_registered_adapter(tiny_dir, adapter, registered, tmp_path) -> None:
    from safetensors.torch import load_file

    uri, tracking = registered
    spec = _spec(tiny_dir, adapter=uri)
    folder = fetch_adapter(spec.model, tracking, tmp_path)
    model = load_model(spec, on_gpu=False, world_size=1, adapter=folder)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) and all(p.requires_grad for p in loaded.values())
    for name, tensor in saved.items():  # PEFT names the live weights with the adapter name inserted
        live = next(p for n, p in loaded.items() if n.replace(".default", "") == name)
        torch.testing.assert_close(live.detach(), tensor)
    assert model.peft_config["default"].r == 4  # the adapter's own rank, not the spec's 8


def test_full_fine_tuning_starts_from_base_plus_adapter_merged(
    tiny_dir, adapter, registered, tmp_path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    uri, tracking = registered
    spec = _spec(tiny_dir, adapter=uri, method={"type": "full"})
    model = load_model(
        spec, on_gpu=False, world_size=1, adapter=fetch_adapter(spec.model, tracking, tmp_path)
    )
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(adapter))
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_the_new_version_records_its_parent(tiny_dir, adapter, registered, tmp_path) -> None:
    from mlflow import MlflowClient

    uri, tracking = registered
    child = _register(_spec(tiny_dir, adapter=uri), "dpo-job", adapter, tmp_path, tracking)
    assert child == "models:/alpha.tiny-cpu-adapter/2"
    version = MlflowClient(tracking_uri=tracking).get_model_version("alpha.tiny-cpu-adapter", "2")
    assert version.tags["tuneplane.parent_model"] == uri
    assert f"`{uri}`" in version.description  # the model card's "Tuned from"


def test_an_adapter_of_another_base_is_refused(tiny_dir, registered, tmp_path) -> None:
    uri, tracking = registered
    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)
    with pytest.raises(PretrainedError, match=re.escape(f"model.adapter: {uri} was tuned from {tiny_dir}")):
        fetch_adapter(_spec(other, adapter=uri).model, tracking, tmp_path / "dl")
    with pytest.raises(
        PretrainedError, match=re.escape("model.adapter: models:/alpha.tiny-cpu-adapter/9: cannot fetch")
    ):
        fetch_adapter(_spec(tiny_dir, adapter="models:/alpha.tiny-cpu-adapter/9").model, tracking, tmp_path)


def test_a_team_builds_only_on_its_own_versions_and_by_number(tiny_dir, tmp_path) -> None:
    config = platform_config(tmp_path, f"sqlite:///{tmp_path / 'tp.db'}")
    spec = _spec(tiny_dir, adapter="models:/beta.secret-adapter/1")
    problems = dict(policy_problems(spec, "alpha", config))
    assert problems["model.adapter"] == "models:/beta.secret-adapter/1 is not a model of team alpha"
    assert "model.adapter" not in dict(policy_problems(spec, "beta", config))
    # What the store's ids look like, for every backend's id length, is what the spec takes as a job id.
    for name, length in itertools.product(("tiny-cpu", "a" * 63), (KUBERAY_ID_LENGTH, ID_LENGTH)):
        job_id = new_job_id(name, length)
        assert len(job_id) <= length and adapter_is_job_id(job_id), job_id
        assert parse_spec(_spec(tiny_dir, adapter=job_id).to_dict())
    with pytest.raises(PretrainedError, match="a job id is resolved by the API on submit"):
        fetch_adapter(_spec(tiny_dir, adapter=new_job_id("sft", ID_LENGTH)).model, "sqlite:///x.db", tmp_path)
    for bad in (
        "models:/alpha.x/latest",
        "models:/alpha.x@champion",
        "s3://bucket/adapter",
        "models:/../x/1",
    ):
        with pytest.raises(
            SpecError, match=re.escape("model.adapter: use a registered model version, models:/")
        ):
            parse_spec(_spec(tiny_dir).to_dict() | {"model": {"base": str(tiny_dir), "adapter": bad}})
