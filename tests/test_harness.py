"""Standard benchmarks through lm-evaluation-harness (train/harness.py): the tiny model on the local tasks in
tests/data/lm_eval_tasks, as a base, a PEFT adapter and a full model folder; tasks folders from object storage."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tuneplane.data.eval_tasks import stage
from tuneplane.errors import DataError, SpecError
from tuneplane.spec import parse_spec
from tuneplane.train.harness import run_lm_eval, scores

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
LIMIT = 6


def _spec(
    base: Path, tasks_dir: str = str(TASKS), tasks: tuple[str, ...] = ("tiny_parity", "tiny_parity_ll")
):
    return parse_spec(
        {
            "name": "h",
            "model": {"base": str(base), "dtype": "float32"},
            "data": {"sources": [{"uri": "a.jsonl", "format": "alpaca"}]},
            "eval": {"lm_eval": {"tasks_dir": tasks_dir, "tasks": list(tasks), "limit": LIMIT}},
        }
    )


@pytest.fixture(scope="module")
def base_scores(tiny_dir: Path) -> dict[str, float]:
    return run_lm_eval(_spec(tiny_dir), None)


def _adapter(tiny_dir: Path, out: Path, lora_b_std: float) -> Path:
    """A LoRA adapter folder laid out as training saves it (adapter + tokenizer), made without training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_dir)), LoraConfig(r=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, lora_b_std) if lora_b_std else param.zero_()
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(out))
    return out


def test_base_model_scores_every_task(base_scores: dict[str, float]) -> None:
    for task in ("tiny_parity", "tiny_parity_ll"):
        assert base_scores[task] == base_scores[f"{task}/acc"]  # the main metric is acc when there is one
        assert 0 <= base_scores[task] <= 1
        assert 0 <= base_scores[f"{task}/acc_stderr"] <= 1
    assert 0 <= base_scores["tiny_parity/acc_norm"] <= 1
    assert base_scores["tiny_parity_ll/perplexity"] > 1  # a random model: no answer is certain
    assert all("," not in key for key in base_scores)  # lm-eval's "acc,none" keys are not MLflow names


def test_adapter_folder_is_loaded_through_peft(tiny_dir: Path, tmp_path: Path, base_scores) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = _spec(tiny_dir)
    identity = run_lm_eval(spec, str(_adapter(tiny_dir, tmp_path / "zero", lora_b_std=0.0)))
    assert identity == pytest.approx(base_scores, rel=1e-6)  # lora_B = 0: LoRA changes nothing
    adapter_dir = _adapter(tiny_dir, tmp_path / "tuned", lora_b_std=0.5)
    tuned = run_lm_eval(spec, str(adapter_dir))
    assert tuned.keys() == base_scores.keys()
    assert tuned["tiny_parity_ll/perplexity"] != pytest.approx(base_scores["tiny_parity_ll/perplexity"])
    assert all(0 <= tuned[t] <= 1 for t in ("tiny_parity", "tiny_parity_ll"))

    # The same weights merged into a full model folder score the same: both kinds of folder load right.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "full"))
    shutil.copy(adapter_dir / "tokenizer.json", tmp_path / "full")
    shutil.copy(adapter_dir / "tokenizer_config.json", tmp_path / "full")
    full = run_lm_eval(spec, str(tmp_path / "full"))
    assert full == pytest.approx(tuned, rel=1e-4)


def test_tasks_folder_from_a_uri(tiny_dir: Path, base_scores: dict[str, float]) -> None:
    got = run_lm_eval(_spec(tiny_dir, tasks_dir=f"file://{TASKS}", tasks=("tiny_parity",)), None)
    assert got == {k: v for k, v in base_scores.items() if k.startswith("tiny_parity/") or k == "tiny_parity"}


def test_tasks_folder_from_object_storage_has_its_data_paths_made_local(s3_bucket, tmp_path: Path) -> None:
    fs, bucket = s3_bucket
    fs.put(str(TASKS), f"{bucket}/evals/", recursive=True)
    remote = f"{bucket}/evals/{TASKS.name}"
    staged = stage(remote, tmp_path / "staged")
    config = yaml.safe_load((staged / "tiny_parity.yaml").read_text())
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.read_text() == (TASKS / "parity.jsonl").read_text()
    assert config["doc_to_choice"] == ["even", "odd"]  # the rest of the task as written


def test_unknown_task_names_the_field(tiny_dir: Path) -> None:
    with pytest.raises(SpecError) as caught:
        run_lm_eval(_spec(tiny_dir, tasks=("tiny_parity", "hellaswag")), None)
    [(field, message)] = caught.value.problems
    assert field == "eval.lm_eval.tasks"
    assert "hellaswag" in message and "tiny_parity" in message  # what is missing, and what is there


def test_hub_datasets_and_empty_folders_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "h.yaml").write_text("task: h\ndataset_path: Rowan/hellaswag\n")
    with pytest.raises(SpecError, match=r"h\.yaml: dataset_path: 'Rowan/hellaswag': only local files"):
        run_lm_eval(_spec(tiny_dir, tasks_dir=str(tmp_path / "hub"), tasks=("h",)), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no task files"):
        run_lm_eval(_spec(tiny_dir, tasks_dir=str(tmp_path / "empty"), tasks=("h",)), None)


def test_missing_extra_says_what_to_install(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(SpecError, match=r"install tuneplane\[eval\]") as caught:
        run_lm_eval(_spec(tiny_dir), None)
    assert caught.value.problems[0][0] == "eval.lm_eval"


def test_no_lm_eval_tasks_is_no_scores(tiny_dir: Path) -> None:
    spec = parse_spec(
        {
            "name": "h",
            "model": {"base": str(tiny_dir)},
            "data": {"sources": [{"uri": "a", "format": "alpaca"}]},
        }
    )
    assert run_lm_eval(spec, None) == {}


@pytest.mark.parametrize(
    ("metrics", "main"),
    [
        ({"exact_match,strict-match": 0.2, "acc,none": 0.7}, 0.7),
        ({"f1,none": 0.1, "exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3}, 0.2),
        ({"alias": "t", "bleu_stderr,none": 0.9, "bleu,none": 11.0, "chrf,none": 30.0}, 11.0),
        ({"alias": "t", "acc_stderr,none": "N/A"}, None),
    ],
)
def test_main_metric_is_acc_else_exact_match_else_the_first(metrics: dict, main: float | None) -> None:
    got = scores({"t": metrics})
    assert got.get("t") == main
    numeric = {k for k, v in metrics.items() if "," in k and not isinstance(v, str)}
    assert len(got) == len(numeric) + (main is not None)
    assert {k for k in got if k != "t"} == {"t/" + k.replace(",none", "").replace(",", "/") for k in numeric}


def test_demo_jobs_task_is_the_tested_one() -> None:
    demo = Path(__file__).parents[1] / "jobs" / "evals"
    for name in ("tiny_parity.yaml", "parity.jsonl"):
        assert (demo / name).read_text() == (TASKS / name).read_text(), f"jobs/evals/{name} drifted"
