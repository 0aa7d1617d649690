"""Publishing a finished job's model: gate, chat template, model, card, registry; the driver calls `publish` in
the job's run, then ends the run (`JobRun.finish`).

Order, and why:
1. The gate (`tuneplane.publishing.gate`) is checked first, on the final metrics.
2. The training template is written into the model's tokenizer as its chat template, so a consumer that
   renders prompts itself (vLLM, TGI, `apply_chat_template`) prompts the model as training did.
3. Final metrics, data figures and the verdict go to the run (metrics, tags, `gate.json`, `data/quality.json`),
   and the pyfunc model is logged to the run whatever the verdict: a rejected result stays inspectable.
4. Only a passing (or absent) gate registers a version. A failed gate registers nothing: consumers resolve
   `models:/NAME/latest` or a version number from the registry, and a model that missed its bar must never
   become one. The run says why (tags `tuneplane.publishing.gate`, `tuneplane.publishing.gate.failures`).
5. The model card, which names the exact URI to load, goes into the logged model and the run (MODEL_CARD.md)
   and becomes the registered version's description.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplane.errors import clip
from tuneplane.publishing import gate, modelcard
from tuneplane.publishing.gate import GateVerdict
from tuneplane.spec import TuningSpec
from tuneplane.tracking.run import JobRun
from tuneplane.tracking.tags import (
    BASE_MODEL_TAG,
    DATA_TAG_PREFIX,
    FINGERPRINT_TAG,
    GATE_FAILURES_TAG,
    GATE_TAG,
    JOB_TAG,
    PARENT_TAG,
    SCORE_TAG_PREFIX,
    SPEC_HASH_TAG,
    registered_model_name,
)

CARD_FILE = "MODEL_CARD.md"
_DESCRIPTION_LIMIT = 5000  # MLflow's model_versions.description is a String(5000) column
_FAILURES_LIMIT = 2000


@dataclass(frozen=True)
class Published:
    model_uri: str | None  # models:/NAME/VERSION when registered
    verdict: GateVerdict


def publish(
    spec: TuningSpec,
    job_id: str,
    job_run: JobRun,
    model_dir: Path,
    metrics: dict[str, Any],
    data_figures: dict[str, Any] | None = None,
) -> Published:
    """Steps 1-5 above, in the job's run; returns the registered URI (None when not registered). Without
    tracking the gate is still checked: the verdict is the driver's too."""
    if not job_run.enabled:
        return Published(None, gate.check(spec.eval.gate, metrics))
    assert job_run.tracking_uri and job_run.run_id
    return _publish(
        spec, job_id, job_run.run_id, model_dir, job_run.tracking_uri, metrics, job_run.team, data_figures
    )


def _publish(
    spec: TuningSpec,
    job_id: str,
    run_id: str,
    model_dir: Path,
    tracking_uri: str,
    metrics: dict[str, Any],
    team: str | None,
    data_figures: dict[str, Any] | None,
) -> Published:
    import mlflow

    verdict = gate.check(spec.eval.gate, metrics)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    name = registered_model_name(spec, team)
    if name:  # a re-run of a finished job publishes nothing new
        existing = client.search_model_versions(f"name = '{name}' and tags.`{JOB_TAG}` = '{job_id}'")
        if existing:
            return Published(f"models:/{name}/{existing[0].version}", verdict)
    template = write_chat_template(spec, model_dir)
    _record(client, run_id, metrics, verdict, data_figures)
    info = _log_model(spec, run_id, model_dir)
    # Tagged on the run when it was created: listing every data file again here would repeat that I/O.
    run_tags = client.get_run(run_id).data.tags
    version = None
    if name and verdict.passed:
        tags = {JOB_TAG: job_id, BASE_MODEL_TAG: spec.model.base, GATE_TAG: verdict.status}
        tags |= {key: run_tags[key] for key in (SPEC_HASH_TAG, FINGERPRINT_TAG)}
        if spec.model.adapter:  # lineage: the registered version this one was tuned from (SFT -> DPO)
            tags[PARENT_TAG] = spec.model.adapter
        tags |= {SCORE_TAG_PREFIX + key: repr(value) for key, value in gate.headline(metrics).items()}
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
    model_uri = f"models:/{name}/{version}" if version is not None else None

    def card(with_chat_template: bool = True) -> str:
        return modelcard.render(
            spec, job_id, metrics, verdict, data_figures, run_tags.get(SPEC_HASH_TAG, ""),
            run_tags.get(FINGERPRINT_TAG, ""), template, model_uri, info.model_uri, with_chat_template,
        )  # fmt: skip

    text = card()
    client.log_text(run_id, text, CARD_FILE)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / CARD_FILE).write_text(text, encoding="utf-8")
        client.log_model_artifact(info.model_id, str(Path(folder) / CARD_FILE))
    if version is not None:
        client.update_model_version(name, version, description=_description(text, card))
    return Published(model_uri, verdict)


def write_chat_template(spec: TuningSpec, model_dir: Path) -> str | None:
    """The training template as the saved tokenizer's chat template; returns it (None: none exists)."""
    from transformers import AutoTokenizer

    from tuneplane.data.templates import chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = chat_template(spec.data.template, tokenizer, spec.data.system_prompt)
    if template and template != tokenizer.chat_template:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(str(model_dir))
    return template


def _record(
    client: Any,
    run_id: str,
    metrics: dict[str, Any],
    verdict: GateVerdict,
    figures: dict[str, Any] | None,
) -> None:
    from mlflow.entities import Metric, RunTag

    numbers = {k: float(v) for k, v in metrics.items() if gate.number(metrics, k) is not None}
    tags: dict[str, str] = {GATE_TAG: verdict.status}
    if verdict.failures():
        tags[GATE_FAILURES_TAG] = clip("\n".join(verdict.failures()), _FAILURES_LIMIT)
    if figures:
        numbers |= {f"data/{k}": float(v) for k, v in figures.items() if gate.number(figures, k) is not None}
        tags |= {DATA_TAG_PREFIX + k: str(v) for k, v in data_tags(figures).items()}
        client.log_dict(run_id, figures, "data/quality.json")
    batch = [Metric(k, v, _now_ms(), int(metrics.get("step") or 0)) for k, v in numbers.items()]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_dict(run_id, verdict.to_dict(), "gate.json")


def data_tags(figures: dict[str, Any]) -> dict[str, int]:
    """The data filter's headline counts: duplicates dropped, training records dropped for overlapping an eval
    set, and eval examples that overlapped training data."""
    out = {}
    duplicates = [figures[k] for k in ("exact_duplicates", "near_duplicates") if k in figures]
    if duplicates:
        out["duplicates_dropped"] = int(sum(duplicates))
    if "contaminated" in figures:
        out["contaminated_dropped"] = int(figures["contaminated"])
    eval_sets = figures.get("eval_sets") or {}
    if eval_sets:
        out["contaminated_eval"] = sum(int(s.get("contaminated", 0)) for s in eval_sets.values())
    if "records" in figures:
        out["records"] = int(figures["records"])
    return out


def _log_model(spec: TuningSpec, run_id: str, model_dir: Path) -> Any:
    """The tuned model as a pyfunc in the job's run (and the merged weights when asked for)."""
    import mlflow

    from tuneplane import pyfunc_model  # stays at the top level: registered models name its path

    artifacts = {"model": str(model_dir)}
    model_config = {
        "template": spec.data.template,
        "system_prompt": spec.data.system_prompt or "",
        "base_uri": spec.model.base,
        "max_new_tokens": spec.eval.max_new_tokens,
    }
    is_adapter = (model_dir / "adapter_config.json").exists()
    if is_adapter and spec.model.base_kind == "path":
        # the embedded default: ship the base so the model is self-contained
        artifacts["base"] = spec.model.base
    with mlflow.start_run(run_id=run_id):
        if spec.tracking.export_merged and is_adapter:
            with tempfile.TemporaryDirectory() as merged:
                _merge(spec.model.base, model_dir, Path(merged))
                mlflow.log_artifacts(merged, "merged")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.AdapterModel(),
            artifacts=artifacts,
            model_config=model_config,
            pip_requirements=["tuneplane", "torch", "transformers", "peft"],
        )


def _merge(base: str, adapter_dir: Path, out: Path) -> None:
    """Base + adapter folded into plain weights: loadable without PEFT (vLLM, TGI, transformers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneplane.pretrained import from_pretrained

    model = from_pretrained(AutoModelForCausalLM, base)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out))


def _description(card: str, shorter: Any) -> str:
    """The card, or, past the registry's limit, the card without the template's source, cut to fit."""
    if len(card) <= _DESCRIPTION_LIMIT:
        return card
    note = f"\n\n(cut to fit the registry; the whole card is {CARD_FILE} in the model)"
    text: str = shorter(with_chat_template=False)
    return text if len(text) <= _DESCRIPTION_LIMIT else text[: _DESCRIPTION_LIMIT - len(note)] + note


def _now_ms() -> int:
    return int(time.time() * 1000)
