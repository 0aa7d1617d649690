"""Publishing through the gate into a real MLflow (SQLite in tmp_path), with an untrained PEFT LoRA adapter on the
tiny Llama: a passing gate registers a version whose description is the model card; a failing gate registers
nothing and the run, the read side and the job's end message say why. And the chat templates written into the
published tokenizer prompt exactly as training renders."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import RecordingBackend
from tests.support.config import REPO, platform_config
from tuneplane.backends.base import RunPhase, RunStatus
from tuneplane.data.formats import Conversation, Message
from tuneplane.data.templates import SegmentTokenizer, chat_template, render
from tuneplane.generation import prompt_ids
from tuneplane.publishing.gate import base_number, headline
from tuneplane.spec import TuningSpec, load_spec

SOURCES = [
    "tasks-alpaca",
    "tasks-messages",
    "tasks-sharegpt",
    "tasks-completion",
    "parity-labeled",
    "cot-arith",
]
FINAL: dict[str, Any] = {
    "step": 400,
    "tokens": 123456,
    "eval_loss": 1.2345,
    "eval_loss_base": 2.5,
    "zero_shot/heldout-tasks": 0.3,
    "zero_shot_base/heldout-tasks": 0.1,
    "zero_shot/tasks-alpaca-eval": 0.61,
    "zero_shot_base/tasks-alpaca-eval": 0.62,
    "zero_shot/parity-labeled-eval": 0.9,
    "zero_shot_base/parity-labeled-eval": 0.5,
    "zero_shot/mean": 0.6033,
    "zero_shot_base/mean": 0.4067,
    "lm_eval/boolq": 0.7,
    "lm_eval_base/boolq": 0.65,
    "base_zero_shot": {"heldout-tasks": 0.1},
} | {f"source_tokens/{name}": 1000 * (i + 1) for i, name in enumerate(SOURCES)}
FIGURES = {
    "records": 600,
    "exact_duplicates": 3,
    "near_duplicates": 7,
    "contaminated": 2,
    "dropped": 12,
    "eval_sets": {"heldout-tasks": {"examples": 50, "contaminated": 2}},
}
PASSING = {"eval_loss_improves": True, "tasks": {"heldout-tasks": {"min": 0.2, "min_gain": 0.1}},
           "keep": {"tasks-alpaca-eval": 0.05}}  # fmt: skip
IMPOSSIBLE = {"tasks": {"heldout-tasks": {"min": 1.0}}, "keep": {"tasks-alpaca-eval": 0.0}}


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter as training saves it (adapter + tokenizer), without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), LoraConfig(r=4))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(out))
    return out


def _spec(tiny_dir: Path, gate: dict[str, Any] | None, tmp_path: Path) -> TuningSpec:
    data = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    data["model"]["base"] = str(tiny_dir)
    data["data"]["system_prompt"] = "Answer briefly."
    # A folder admission can read (inside the team's data roots, outside the platform's home); never run here.
    data["eval"]["lm_eval"] = {"tasks_dir": str(REPO / "jobs" / "evals"), "tasks": ["boolq"]}
    data["eval"]["gate"] = gate
    return TuningSpec.model_validate(data)


def _publish(spec: TuningSpec, job_id: str, adapter: Path, tmp_path: Path, tracking: str) -> Any:
    from tuneplane.publishing.publish import publish
    from tuneplane.tracking.run import JobRun

    model_dir = tmp_path / "model"
    shutil.copytree(adapter, model_dir)
    run = JobRun.start(spec, job_id, tracking, str(tmp_path / "artifacts"), team="alpha")
    published = publish(spec, job_id, run, model_dir, FINAL, FIGURES)
    run.finish()
    return published, run.run_id


def _table(card: str, section: str) -> dict[str, list[str]]:
    """Rows of the first table after `section`, keyed by their first cell (backticks dropped)."""
    lines = iter(card.split(section + "\n", 1)[1].splitlines())
    first = next(line for line in lines if line.startswith("|"))
    table = [first, *(line for line in iter(lines.__next__, "") if line.startswith("|"))]
    rows = [line.strip("| ").split(" | ") for line in table if not line.startswith("|---")]
    return {cells[0].strip(" `"): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_a_passing_gate_registers_the_version_with_its_card(
    tiny_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from tuneplane.api.schemas import ModelVersionOut
    from tuneplane.tracking.registry import gate_verdict, model_versions

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec(tiny_dir, PASSING, tmp_path)
    published, run_id = _publish(spec, "job-pass", adapter, tmp_path, tracking)
    assert published.verdict.passed and published.model_uri == "models:/alpha.tiny-cpu-adapter/1"

    client = MlflowClient(tracking_uri=tracking)
    card = Path(client.download_artifacts(run_id, "MODEL_CARD.md", str(tmp_path / "dl"))).read_text()
    assert client.get_model_version("alpha.tiny-cpu-adapter", "1").description == card
    mlflow.set_tracking_uri(tracking)
    logged = Path(
        mlflow.artifacts.download_artifacts(published.model_uri, dst_path=str(tmp_path / "model-dl"))
    )
    assert (logged / "MODEL_CARD.md").read_text() == card
    assert f'load_model("{published.model_uri}")' in card and "## Gate: passed" in card

    # Every evaluation number in the card is the metric's, base and tuned.
    rows = _table(card, "## Evaluation")
    assert set(rows) == set(headline(FINAL)) and "lm_eval/boolq" in rows
    for key, (base, tuned, _change) in rows.items():
        assert float(tuned) == pytest.approx(FINAL[key], abs=5e-5)
        assert float(base) == pytest.approx(base_number(FINAL, key), abs=5e-5)
    sources = _table(card, "## Data")
    assert {name: int(cells[3]) for name, cells in sources.items()} == {
        name: FINAL[f"source_tokens/{name}"] for name in SOURCES
    }
    quality = _table(card, "### Duplicates and contamination")
    assert [int(quality[label][0]) for label in ("Exact duplicates", "Near duplicates", "Dropped in all")] == [
        3, 7, 12,
    ]  # fmt: skip

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tuneplane.publishing.gate"] == "passed"
    assert run.data.tags["tuneplane.data.duplicates_dropped"] == "10"
    assert run.data.tags["tuneplane.data.contaminated_eval"] == "2"
    assert run.data.metrics["data/dropped"] == 12 and run.data.metrics["lm_eval/boolq"] == 0.7
    assert gate_verdict(tracking, "job-pass") == {
        "status": "passed", "passed": True, "failures": [], "run_id": run_id,
    }  # fmt: skip
    (version,) = model_versions(tracking)
    assert version["gate"] == "passed" and version["scores"] == headline(FINAL)
    assert ModelVersionOut(**version).scores["zero_shot/mean"] == FINAL["zero_shot/mean"]

    # The published tokenizer prompts as the pyfunc (and training) does, the spec's system prompt included.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(logged / "artifacts" / "model"))
    conversation = Conversation((Message("system", "Answer briefly."), Message("user", "Is 41 even or odd?"),
                                 Message("assistant", "odd")))  # fmt: skip
    messages = [{"role": "user", "content": "Is 41 even or odd?"}]
    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert ids == prompt_ids(conversation, "alpaca", tokenizer)


def test_a_failed_gate_logs_the_model_but_registers_nothing_and_says_why(
    tiny_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from tuneplane.control.reconciler import Reconciler
    from tuneplane.store import Database, Job, Principal, create_job
    from tuneplane.tracking.registry import gate_verdict, model_versions

    config = platform_config(tmp_path, f"sqlite:///{tmp_path / 'tuneplane.db'}")
    db = Database(config.database_url)
    db.migrate()
    backend = RecordingBackend()
    reconciler = Reconciler(db, backend, config)
    spec = _spec(tiny_dir, IMPOSSIBLE, tmp_path)
    with db.session() as s:
        job_id = create_job(s, Principal("alpha"), spec, 0)[0].id
    reconciler.run_once()  # validated, queued, handed to the backend

    published, run_id = _publish(spec, job_id, adapter, tmp_path, config.tracking_uri)
    failures = [
        "zero_shot heldout-tasks: 0.30 < min 1.00",
        "keep tasks-alpaca-eval: dropped 0.01 from 0.62 to 0.61, budget 0.00",
    ]
    assert published.model_uri is None and published.verdict.failures() == failures
    client = MlflowClient(tracking_uri=config.tracking_uri)
    assert client.search_registered_models() == [] and model_versions(config.tracking_uri) == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tuneplane.publishing.gate"] == "failed"
    assert run.data.tags["tuneplane.publishing.gate.failures"].splitlines() == failures
    assert gate_verdict(config.tracking_uri, job_id) == {
        "status": "failed", "passed": False, "failures": failures, "run_id": run_id,
    }  # fmt: skip
    # Still inspectable: the card names the run's logged model, and that model loads from its URI.
    card = Path(client.download_artifacts(run_id, "MODEL_CARD.md", str(tmp_path / "dl"))).read_text()
    logged_uri = re.search(r'load_model\("(models:/m-[0-9a-f]+)"\)', card)
    assert logged_uri and "Not registered: the gate failed" in card and "## Gate: failed" in card
    assert client.get_logged_model(logged_uri.group(1).removeprefix("models:/")).source_run_id == run_id

    backend.phase[job_id] = RunStatus(RunPhase.SUCCEEDED)
    reconciler.run_once()
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.model_uri) == ("SUCCEEDED", None), job.message
        assert job.message == "succeeded, not registered: gate failed: " + "; ".join(failures)
    db.dispose()


def test_no_gate_registers_and_says_none(tiny_dir: Path, adapter: Path, tmp_path: Path) -> None:
    from tuneplane.tracking.registry import model_versions

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec(tiny_dir, None, tmp_path)
    published, _ = _publish(spec, "job-none", adapter, tmp_path, tracking)
    assert published.model_uri is not None and published.verdict.status == "none"
    assert [v["gate"] for v in model_versions(tracking)] == ["none"]


def test_without_tracking_the_gate_is_still_checked(tiny_dir: Path, adapter: Path, tmp_path: Path) -> None:
    from tuneplane.publishing.publish import publish
    from tuneplane.tracking.run import JobRun

    spec = _spec(tiny_dir, IMPOSSIBLE, tmp_path)
    published = publish(spec, "offline", JobRun(), adapter, FINAL)
    assert published.model_uri is None and published.verdict.status == "failed"


# -- chat templates: the Jinja form of each built-in template prompts exactly as the renderer -----------------

CONVERSATIONS = {
    "single": (Message("user", "Reverse the word.\n\nabc"), Message("assistant", "cba")),
    "system-multi-turn": (
        Message("system", "You are terse."), Message("user", "Hi"), Message("assistant", "Hello"),
        Message("user", "Again"), Message("assistant", " twice "),
    ),
    "alpaca-input": (Message("user", "Translate", "bonjour"), Message("assistant", "hello")),
    "input-then-plain": (
        Message("system", "Sys"), Message("user", "Q1", "ctx"), Message("assistant", "A1"),
        Message("user", "Q2"), Message("assistant", "A2"),
    ),
}  # fmt: skip


def _messages(messages: tuple[Message, ...]) -> list[dict[str, str]]:
    return [
        {"role": m.role, "content": m.content} | ({"input": m.context} if m.context else {}) for m in messages
    ]


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS), ids=list(CONVERSATIONS))
@pytest.mark.parametrize("template", ["alpaca", "flan", "chatml", "llama3"])
def test_chat_template_equals_the_renderer(template: str, conversation: str, tokenizer: Any) -> None:
    """Text: the generation prompt of every assistant turn, and the whole conversation up to it. Ids: the
    first turn's prompt, as `prompt_ids` (what zero-shot evaluation and the pyfunc feed the model)."""
    tokenizer = _with_template(tokenizer, chat_template(template, tokenizer))  # type: ignore[arg-type]
    messages = CONVERSATIONS[conversation]
    turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    for i in turns:
        segments = render(Conversation(messages[: i + 1]), template, tokenizer)  # type: ignore[arg-type]
        response = max(j for j, s in enumerate(segments) if s.trainable and s.literal)
        prompt = "".join(s.text for s in segments[:response])
        assert (
            tokenizer.apply_chat_template(_messages(messages[:i]), add_generation_prompt=True, tokenize=False)
            == prompt
        )
        assert tokenizer.apply_chat_template(_messages(messages[: i + 1]), tokenize=False) == "".join(
            s.text for s in segments
        )
    first = Conversation(messages[: turns[0] + 1])
    want = prompt_ids(first, template, tokenizer, SegmentTokenizer(tokenizer))  # type: ignore[arg-type]
    got = tokenizer.apply_chat_template(_messages(messages[: turns[0]]), add_generation_prompt=True)
    assert _ids(got) == want


@pytest.mark.parametrize("template", ["alpaca", "flan", "chatml", "llama3", "tokenizer"])
def test_the_default_system_prompt_is_added_only_where_missing(template: str, tokenizer: Any) -> None:
    odd = "Be terse {{ x }} %} 'q' \"d\" \\ é\nline 2"
    tokenizer = _with_template(tokenizer, chat_template(template, tokenizer, odd))  # type: ignore[arg-type]
    bare = (Message("user", "Hi"), Message("assistant", "Hello"))
    with_default = Conversation((Message("system", odd), *bare))
    segments = render(with_default, template, tokenizer)  # type: ignore[arg-type]
    response = max(j for j, s in enumerate(segments) if s.trainable and s.literal)
    got = tokenizer.apply_chat_template(_messages(bare[:1]), add_generation_prompt=True, tokenize=False)
    assert got == "".join(s.text for s in segments[:response])
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    assert odd not in tokenizer.apply_chat_template(own, add_generation_prompt=True, tokenize=False)


def test_the_tokenizer_template_is_the_tokenizers_own(tokenizer: Any) -> None:
    assert chat_template("tokenizer", tokenizer) == tokenizer.chat_template
    assert chat_template("tokenizer", _with_template(tokenizer, None)) is None


def _with_template(tokenizer: Any, template: str | None) -> Any:
    import copy

    clone = copy.copy(tokenizer)  # the session's tokenizer stays as built
    clone.chat_template = template
    return clone


def test_a_card_past_the_registry_limit_is_described_without_the_template_source(tiny_dir: Path) -> None:
    from tuneplane.publishing import gate, modelcard
    from tuneplane.publishing.publish import _description

    spec = _spec(tiny_dir, PASSING, tiny_dir)
    verdict = gate.check(spec.eval.gate, FINAL)
    long_template = "{{ bos_token }}" + "{# a long comment #}" * 400

    def card(with_chat_template: bool = True) -> str:
        return modelcard.render(
            spec,
            "j",
            FINAL,
            verdict,
            FIGURES,
            "h",
            "f",
            long_template,
            "models:/a/1",
            None,
            with_chat_template,
        )

    full = card()
    assert len(full) > 5000 and long_template in full
    described = _description(full, card)
    assert described == card(with_chat_template=False) and long_template not in described
    assert len(_description("x" * 9000, lambda **_: "y" * 9000)) == 5000


def test_the_models_command_shows_the_gate_and_headline_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import nullcontext

    from typer.testing import CliRunner

    from tuneplane.cli import jobs
    from tuneplane.cli.common import app

    version = {"uri": "models:/alpha.m/3", "job_id": "j1", "base_model": "b", "gate": "passed",
               "scores": {"zero_shot/arith": 0.5, "eval_loss": 1.23456, "zero_shot/mean": 0.5}}  # fmt: skip
    fake = type("Fake", (), {"models": lambda self: [version]})()
    monkeypatch.setattr(jobs, "_client", lambda url: nullcontext(fake))
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "models:/alpha.m/3" in line]
    assert lines and "passed" in lines[0] and "eval_loss 1.235" in lines[0]
    assert (
        result.output.index("eval_loss")
        < result.output.index("zero_shot/mean")
        < result.output.index("arith")
    )
