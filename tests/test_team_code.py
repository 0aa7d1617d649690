"""No code a team wrote runs (issue #20): lm-eval task files are data only (no `!function`, no include or data
file outside the folder, no metric script), task templates and chat templates render in Jinja's sandbox. Each
attack leaves a marker file if it runs; every test checks the marker is absent, not only that an error came."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support.tenants import ALPHA, confined_config, spec_reading
from tuneplane.api import create_app
from tuneplane.data import eval_tasks
from tuneplane.errors import SpecError
from tuneplane.files import Confinement, confined_to

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
ESCAPE = "{{ cycler.__init__.__globals__.os.system('touch %s') }}"


def _folder(tmp_path: Path, **files: str) -> Path:
    """A copy of the tiny parity tasks with `files` added (name -> text)."""
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _task(**keys: object) -> str:
    """A task YAML: the parity task with `keys` replaced (values written as YAML by json, which YAML reads)."""
    base = {
        "task": "evil",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "parity.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Is {{number}} even or odd?",
        "doc_to_choice": ["even", "odd"],
        "doc_to_target": "{{label}}",
    }
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in (base | keys).items()) + "\n"


def _marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


@pytest.mark.parametrize(
    ("yaml_text", "key", "says"),
    [
        (
            "process_docs: !function utils.process_docs\n",
            "process_docs",
            "!function runs the team's own Python",
        ),
        (
            "metric_list:\n  - metric: !function utils.metric\n",
            "metric_list[0].metric",
            "!function runs the team's own Python",
        ),
        ("class: !function utils.Task\n", "class", "!function"),
        ("include: /etc/hosts.yaml\n", "include", "must lie in the tasks folder"),
        ("include: ../../other/task.yaml\n", "include", "must lie in the tasks folder"),
        ("include: missing.yaml\n", "include", "no such file in the tasks folder"),
        # a file no rule reads (lm-eval would load its `!function` tags all the same)
        ("include: payload.txt\n", "include", "payload.txt: an include names a task file (*.yaml)"),
        (
            "dataset_kwargs:\n  data_files: {test: /data/beta/secret.jsonl}\n",
            "dataset_kwargs",
            "/data/beta/secret.jsonl: a data file must lie in the tasks folder",
        ),
        (
            "dataset_kwargs:\n  data_files: [../beta/x.jsonl]\n",
            "dataset_kwargs",
            "must lie in the tasks folder",
        ),
        ("dataset_kwargs:\n  data_files: s3://other-team/x.jsonl\n", "dataset_kwargs", "must lie in"),
        ("dataset_kwargs:\n  data_dir: /data/beta\n", "dataset_kwargs", "data_dir: only data_files is read"),
        ("dataset_path: /data/beta\n", "dataset_path", "only local files are read here"),
        (
            "metric_list:\n  - metric: /tmp/evil_metric\n",
            "metric_list[0].metric",
            "not one of lm-eval's built-in",
        ),
        (
            "metric_list:\n  - metric: exact_match\n    hf_evaluate: true\n",
            "metric_list[0].hf_evaluate",
            "runs code",
        ),
        ("use_prompt: promptsource:evil\n", "use_prompt", "promptsource"),
        ("task: g\ntask_list: []\nextra: [{sub: !function utils.f}]\n", "extra[0].sub", "!function"),
    ],
)
def test_task_files_that_would_run_code_or_read_elsewhere_are_refused(
    tmp_path: Path, yaml_text: str, key: str, says: str
) -> None:
    folder = _folder(
        tmp_path,
        **{
            "evil.yaml": "task: evil\n" + yaml_text,
            "utils.py": "import os\n",
            "payload.txt": "process_docs: !function utils.process_docs\n",
        },
    )
    found = eval_tasks.problems(str(folder))
    assert found, yaml_text
    fields = {field for field, _ in found}
    assert fields == {"eval.lm_eval.tasks_dir"}
    messages = [message for _, message in found]
    assert any(m.startswith(f"{folder}/evil.yaml: {key}: ") and says in m for m in messages), messages
    with pytest.raises(SpecError):
        eval_tasks.stage(str(folder), tmp_path / "staged")
    # The shipped tasks next to it are fine: only the bad file is named.
    assert not any("tiny_parity" in m for m in messages)


def test_a_checked_folder_stages_without_python_and_with_its_own_data(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path, **{"sub/inc.yaml": "output_type: multiple_choice\n", "sub/t.yaml": "include: inc.yaml\n"}
    )
    (folder / "utils.py").write_text("raise SystemExit('imported')\n")
    assert eval_tasks.problems(str(folder)) == []
    staged = eval_tasks.stage(str(folder), tmp_path / "staged")
    assert not (staged / "utils.py").exists()
    import yaml

    config = yaml.safe_load((staged / "tiny_parity.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"] == {"test": str(staged / "parity.jsonl")}


def test_a_symlink_in_the_tasks_folder_cannot_reach_another_teams_file(tmp_path: Path) -> None:
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    beta.mkdir()
    (beta / "secret.jsonl").write_text('{"number": 1, "label": "beta secret"}\n')
    folder = _folder(alpha)
    (folder / "parity.jsonl").unlink()
    (folder / "parity.jsonl").symlink_to(beta / "secret.jsonl")
    with confined_to(Confinement.of([alpha])), pytest.raises(Exception, match="data roots") as caught:
        eval_tasks.stage(str(folder), tmp_path / "staged")
    assert "beta secret" not in str(caught.value)
    assert not (tmp_path / "staged" / "parity.jsonl").exists()


# -- the harness itself: what reaches lm-eval -------------------------------------------------------------------


def test_lm_eval_renders_task_templates_in_the_sandbox(tmp_path: Path) -> None:
    """Through lm-eval's own task building (TaskManager -> Task.doc_to_text): fails if an lm-eval upgrade
    renders templates some other way than through the environment the harness replaces."""
    import jinja2
    from lm_eval.tasks import TaskManager

    from tuneplane.train.harness import sandbox_templates

    marker = _marker(tmp_path)
    folder = _folder(tmp_path, **{"evil.yaml": _task(doc_to_text=ESCAPE % marker)})
    staged = eval_tasks.stage(str(folder), tmp_path / "staged")
    sandbox_templates()
    manager = TaskManager(include_path=str(staged), include_defaults=False)
    parity = manager.load_task_or_group(["tiny_parity"])["tiny_parity"]
    assert "Is 3 even or odd?" in parity.doc_to_text({"number": 3, "label": "odd"})  # templates still work
    with pytest.raises(jinja2.exceptions.SecurityError):
        manager.load_task_or_group(["evil"])  # lm-eval renders a first document while building the task
    assert not marker.exists()


def test_a_job_with_a_template_escape_fails_without_running_it(tmp_path: Path, tiny_dir: Path) -> None:
    import jinja2

    from tuneplane.spec import parse_spec
    from tuneplane.train.harness import run_lm_eval

    marker = _marker(tmp_path)
    folder = _folder(tmp_path, **{"evil.yaml": _task(doc_to_text=ESCAPE % marker)})
    spec = parse_spec(
        {
            "name": "h",
            "model": {"base": str(tiny_dir), "dtype": "float32"},
            "data": {"sources": [{"uri": "a.jsonl", "format": "alpaca"}]},
            "eval": {"lm_eval": {"tasks_dir": str(folder), "tasks": ["evil"], "limit": 2}},
        }
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        run_lm_eval(spec, None)
    assert not marker.exists()


def test_function_tags_never_import_the_teams_module(tmp_path: Path, tiny_dir: Path) -> None:
    from tuneplane.spec import parse_spec
    from tuneplane.train.harness import run_lm_eval

    marker = _marker(tmp_path)
    folder = _folder(
        tmp_path,
        **{
            "evil.yaml": _task() + "process_docs: !function utils.process_docs\n",
            "utils.py": f"open({str(marker)!r}, 'w').close()\ndef process_docs(d):\n    return d\n",
        },
    )
    spec = parse_spec(
        {
            "name": "h",
            "model": {"base": str(tiny_dir), "dtype": "float32"},
            "data": {"sources": [{"uri": "a.jsonl", "format": "alpaca"}]},
            "eval": {"lm_eval": {"tasks_dir": str(folder), "tasks": ["evil"], "limit": 2}},
        }
    )
    with pytest.raises(SpecError, match=r"evil\.yaml: process_docs: !function"):
        run_lm_eval(spec, None)
    assert not marker.exists()


# -- at submit and validate -------------------------------------------------------------------------------------


def test_submit_and_validate_refuse_code_in_task_files_naming_file_and_key(
    tenants: dict[str, Path],
) -> None:
    folder = _folder(
        tenants["alpha"], **{"evil.yaml": _task() + "process_docs: !function utils.process_docs\n"}
    )
    lm_eval = {"tasks_dir": str(folder), "tasks": ["evil"]}
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"), eval={"lm_eval": lm_eval})
    expected = {
        "field": "eval.lm_eval.tasks_dir",
        "message": f"{folder}/evil.yaml: process_docs: !function runs the team's own Python, which no job may "
        "do; use lm-eval's built-in metrics, filters and templates",
    }
    with TestClient(create_app(confined_config(tenants), run_reconciler=False)) as api:
        submitted = api.post("/v1/jobs", json=spec, headers=ALPHA)
        assert submitted.status_code == 422, submitted.text
        assert expected in submitted.json()["errors"]
        validated = api.post("/v1/validate", json=spec, headers=ALPHA).json()
        assert validated["ok"] is False and expected in validated["problems"], validated
        (folder / "evil.yaml").write_text(_task())  # the same folder without the tag is accepted
        assert api.post("/v1/validate", json=spec, headers=ALPHA).json()["ok"] is True


def test_task_folders_in_object_storage_are_checked_before_a_job_queues(s3_bucket, tmp_path: Path) -> None:
    fs, bucket = s3_bucket
    folder = _folder(tmp_path, **{"evil.yaml": _task(dataset_kwargs={"data_files": "/etc/passwd"})})
    fs.put(str(folder), f"{bucket}/evals/", recursive=True)
    [(field, message)] = eval_tasks.problems(f"{bucket}/evals/tasks")
    assert field == "eval.lm_eval.tasks_dir"
    assert message.startswith(f"{bucket}/evals/tasks/evil.yaml: dataset_kwargs: /etc/passwd: a data file")


# -- chat templates from a team's tokenizer ---------------------------------------------------------------------


def test_a_tokenizers_chat_template_renders_in_the_sandbox(tmp_path: Path, tiny_dir: Path) -> None:
    """template: tokenizer renders the team's own chat_template: through transformers' immutable sandbox,
    refused as a bad record, never run."""
    from transformers import AutoTokenizer

    from tuneplane.data.formats import Conversation, Message
    from tuneplane.data.templates import render
    from tuneplane.errors import FormatError

    marker = _marker(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" + ESCAPE % marker
    conversation = Conversation((Message("user", "Say hi."), Message("assistant", "hi")))
    with pytest.raises(FormatError, match="chat template"):
        render(conversation, "tokenizer", tokenizer)
    assert not marker.exists()


def test_object_keys_that_climb_out_of_the_folder_are_refused(s3_bucket, tmp_path: Path) -> None:
    """An S3 key `tasks/../../x.pth` would be staged outside the staging folder (a .pth file in site-packages
    runs code when Python starts)."""
    import boto3

    fs, bucket = s3_bucket
    fs.put(str(TASKS), f"{bucket}/evals/", recursive=True)
    name = bucket.removeprefix("s3://")
    boto3.client("s3").put_object(Bucket=name, Key="evals/lm_eval_tasks/../../../x.pth", Body=b"import os")
    fs.invalidate_cache()
    [(field, message)] = eval_tasks.problems(f"{bucket}/evals/lm_eval_tasks")
    assert field == "eval.lm_eval.tasks_dir" and "not a plain path inside the tasks folder" in message
    with pytest.raises(Exception, match="not a plain path"):
        eval_tasks.stage(f"{bucket}/evals/lm_eval_tasks", tmp_path / "staged")
    assert not list(tmp_path.rglob("*.pth"))
