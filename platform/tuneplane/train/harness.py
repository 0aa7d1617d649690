"""Standard benchmarks through EleutherAI's lm-evaluation-harness (the optional `eval` extra), run in the driver
after training on the base model and on the tuned one.

Tasks are lm-eval YAML files in `eval.lm_eval.tasks_dir` (a local folder or an object-storage URI), with their
data next to them, checked and copied to a private folder first (`data/eval_tasks.py`: no `!function`, no
include or data file outside the folder, only lm-eval's local loaders and built-in metrics). Nothing is read
from the model or dataset hub, which is switched off while the harness runs; lm-eval's built-in task
definitions are not indexed (they name hub datasets). Task templates (`doc_to_text: "{{question}}"`) render
in Jinja's immutable sandbox: lm-eval's own environment is replaced before any task is built
(`sandbox_templates`), and checked to be the one its templates go through.

Scores come back flat: `{"<task>": main metric, "<task>/<metric>": every numeric metric}`. The main metric is
`acc` if the task reports it, else `exact_match`, else the first numeric one it reports; a metric computed after
a filter other than lm-eval's `none` is keyed `<task>/<metric>/<filter>`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneplane.data import eval_tasks
from tuneplane.errors import SpecError
from tuneplane.spec import TuningSpec

MAIN_METRICS = ("acc", "exact_match")  # in order of preference; else the first numeric metric
_FIELD = "eval.lm_eval"
# MLflow metric names allow only these. Task names are kept as written: the gate names them (and lm-eval's are
# plain identifiers); metric and filter names are lm-eval's own and may hold anything.
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def run_lm_eval(spec: TuningSpec, model_dir: str | None, device: str = "cpu") -> dict[str, float]:
    """Scores of the tuned model saved in `model_dir` (a PEFT adapter folder or a full model folder), or of the
    base model when `model_dir` is None, on `spec.eval.lm_eval`'s tasks. Empty when the spec names none."""
    config = spec.eval.lm_eval
    if config is None:
        return {}
    lm_eval, hflm, task_manager = _import_lm_eval()
    sandbox_templates()
    with tempfile.TemporaryDirectory(prefix="tuneplane-lm-eval-") as tmp, _quiet():
        tasks_dir = eval_tasks.stage(config.tasks_dir, Path(tmp) / "tasks")
        manager = task_manager(include_path=str(tasks_dir), include_defaults=False)
        unknown = [name for name in config.tasks if name not in manager.all_tasks]
        if unknown:
            found = f"defined there: {', '.join(manager.all_tasks) or 'none'}"
            reason = f"no task named {', '.join(unknown)} in {config.tasks_dir} ({found})"
            raise SpecError([(f"{_FIELD}.tasks", reason)])
        try:
            # The model is loaded as training loaded it (a hub id may need the hub); only the harness is offline.
            model, tokenizer = _load_model(spec, model_dir, device)
            lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=8, device=device)
            del model
            with _harness_env(Path(tmp) / "datasets-cache"):
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=list(config.tasks),
                    num_fewshot=config.num_fewshot,
                    limit=config.limit,
                    task_manager=manager,
                    log_samples=False,
                    bootstrap_iters=100,  # stderr of mean metrics is closed-form; this caps the others' cost
                )
        finally:
            lm = None  # the only reference to the model: free it before the caller loads the next one
            _free(device)
    return scores(out["results"] if out else {})


def scores(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's `results` ({task: {"acc,none": 0.5, "alias": ...}}) as flat keys (see the module doc)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        mine: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # "alias", "name", "sample_len"; a stderr lm-eval could not compute is "N/A"
            metric, filter_name = key.split(",", 1)
            label = metric if filter_name == "none" else f"{metric}/{filter_name}"
            mine[f"{task}/{_UNSAFE_KEY.sub('_', label)}"] = float(value)
        main = _main_metric(task, mine)
        if main is not None:
            flat[task] = main
        flat.update(mine)
    return flat


def _main_metric(task: str, metrics: dict[str, float]) -> float | None:
    prefix = f"{task}/"
    names = [k[len(prefix) :] for k in metrics if "_stderr" not in k]
    for wanted in MAIN_METRICS:
        for name in names:
            if name == wanted or name.startswith(f"{wanted}/"):
                return metrics[prefix + name]
    return metrics[prefix + names[0]] if names else None


# -- the model --------------------------------------------------------------------------------------------------


def _load_model(spec: TuningSpec, model_dir: str | None, device: str) -> tuple[Any, Any]:
    """(model, tokenizer): the base as training loaded it, the base + a PEFT adapter, or a full saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneplane.pretrained import from_pretrained, load_tokenizer
    from tuneplane.train.builders import torch_dtype

    dtype = torch_dtype(spec, device.startswith("cuda"))
    if model_dir is None:
        model = from_pretrained(AutoModelForCausalLM, spec.model.base, spec.model.revision, dtype=dtype)
        tokenizer = load_tokenizer(spec.model)
    elif (Path(model_dir) / "adapter_config.json").exists():
        from peft import PeftModel

        base = from_pretrained(AutoModelForCausalLM, spec.model.base, spec.model.revision, dtype=dtype)
        model = PeftModel.from_pretrained(base, model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.to(device).eval(), tokenizer


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# -- the harness's environment ----------------------------------------------------------------------------------


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SpecError(
            [
                (
                    _FIELD,
                    f"needs lm-evaluation-harness, which this image lacks ({exc.name}): install tuneplane[eval]",
                )
            ]
        ) from None
    return lm_eval, HFLM, TaskManager


def sandbox_templates() -> None:
    """Render lm-eval's task templates in Jinja's ImmutableSandboxedEnvironment (no attribute of Python
    internals, no mutation, bounded ranges), with lm-eval's own settings and filters. lm-eval renders through
    the module-level `lm_eval.utils.env`; replaced here, then checked with a template that only the sandbox
    refuses, so an lm-eval that stops using that environment fails loudly instead of running unsandboxed."""
    import jinja2
    import lm_eval.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    current = lm_eval.utils.env
    if not isinstance(current, ImmutableSandboxedEnvironment):
        sandboxed = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            undefined=current.undefined,
            keep_trailing_newline=current.keep_trailing_newline,
        )
        sandboxed.filters.update({k: v for k, v in current.filters.items() if k not in sandboxed.filters})
        lm_eval.utils.env = sandboxed
    try:
        lm_eval.utils.apply_template("{{ cycler.__init__.__globals__ }}", {})
    except jinja2.exceptions.SecurityError:
        return
    raise RuntimeError("lm-eval renders task templates outside Jinja's sandbox; refusing to run its tasks")


_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DISABLE_MULTIPROC": "1",  # lm-eval's bootstrap would fork a Pool of cpu_count() copies of this process
}


@contextlib.contextmanager
def _harness_env(cache: Path) -> Iterator[None]:
    """While the harness runs: no hub access, no forked workers, and a per-run datasets cache (the staged files'
    paths are new each run: a shared cache would only grow). `datasets` and `huggingface_hub` read the offline
    switch when first imported, long before this: their module-level copies are switched too."""
    import datasets.config
    import huggingface_hub.constants

    switches = [
        (datasets.config, "HF_HUB_OFFLINE", True),
        (datasets.config, "HF_DATASETS_CACHE", cache),
        (huggingface_hub.constants, "HF_HUB_OFFLINE", True),
    ]
    saved_env = {key: os.environ.get(key) for key in _ENV}
    saved = [(module, name, getattr(module, name)) for module, name, _ in switches]
    try:
        os.environ.update(_ENV)
        for module, name, value in switches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class _DropExpected(logging.Filter):
    """The warnings lm-eval gives on every run the way we call it: a model object instead of a hub id, and the
    spec's num_fewshot set on a task that has no default. (Overriding a task's own default still warns.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "model kwarg is not of type `str`" in message or "Passed an already-initialized model" in message:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            message.startswith("Overwriting default num_fewshot") and len(args) > 1 and args[1] is None
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' logs at WARNING, without datasets' progress bars."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    loggers = [logging.getLogger("lm_eval"), logging.getLogger("datasets")]
    levels = [lg.level for lg in loggers]
    # A filter acts only on the logger a record is made on, not on its parents.
    chatty, expected = (
        [logging.getLogger(f"lm_eval.{m}") for m in ("models.huggingface", "evaluator")],
        _DropExpected(),
    )
    bars_were_off = are_progress_bars_disabled()
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    for lg in chatty:
        lg.addFilter(expected)
    disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for lg in chatty:
            lg.removeFilter(expected)
        if not bars_were_off:
            enable_progress_bars()
