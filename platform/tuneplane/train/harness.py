"""Standard benchmarks through EleutherAI's lm-evaluation-harness (the optional `eval` extra), run in the driver
after training on the base model and on the tuned one.

Tasks are lm-eval YAML files in `eval.lm_eval.tasks_dir` (a local folder or an object-storage URI), with their
data next to them: the folder is copied to a temporary one and each YAML's relative `dataset_kwargs.data_files`
paths are made absolute there. Only lm-eval's own local loaders are accepted (`dataset_path: json`, `csv` or
`parquet`): nothing is read from the model or dataset hub, which is switched off while the harness runs.
lm-eval's built-in task definitions are not indexed: they name hub datasets.

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

import yaml
from fsspec.core import url_to_fs

from tuneplane.errors import DataError, SpecError, clip
from tuneplane.spec import TuningSpec, is_local_path

LOCAL_LOADERS = ("json", "csv", "parquet")  # `dataset_path` values that read files, never the hub
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
    with tempfile.TemporaryDirectory(prefix="tuneplane-lm-eval-") as tmp, _quiet():
        tasks_dir = stage_tasks(config.tasks_dir, Path(tmp) / "tasks")
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


# -- the tasks folder -------------------------------------------------------------------------------------------


class _Tagged:
    """A YAML scalar with a custom tag (lm-eval's `!function utils.process_docs`), written back unchanged."""

    def __init__(self, tag: str, value: str):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Tagged:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(None, None, f"tag !{suffix} on a non-scalar", node.start_mark)
    return _Tagged(f"!{suffix}", loader.construct_scalar(node))


_Loader.add_multi_constructor("!", _construct_tagged)
_Dumper.add_representer(_Tagged, lambda dumper, t: dumper.represent_scalar(t.tag, t.value))


def stage_tasks(uri: str, dest: Path) -> Path:
    """A local copy of the tasks folder at `uri` in `dest`, each YAML's relative `data_files` made absolute."""
    location = os.path.expanduser(uri) if is_local_path(uri) else uri
    try:
        fs, root = url_to_fs(location)
        root = root.rstrip("/")
        files = [p for p in fs.find(root) if fs.isfile(p)]
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(
            uri, f"cannot list the tasks folder: {clip(str(exc) or type(exc).__name__)}"
        ) from None
    yamls = [p for p in files if p.endswith((".yaml", ".yml"))]
    if not yamls:
        raise DataError(uri, "no task files (*.yaml) in the tasks folder")
    for name in files:
        target = dest / name[len(root) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(name, str(target))
    for name in yamls:
        relative = name[len(root) :].lstrip("/")
        _localize(dest / relative, dest, f"{uri.rstrip('/')}/{relative}")
    return dest


def _localize(path: Path, root: Path, shown: str) -> None:
    """Refuse hub datasets and remote data files; make relative `data_files` absolute under `root`."""
    try:
        config = yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader that keeps tags
    except yaml.YAMLError as exc:
        raise DataError(shown, f"not valid YAML: {clip(str(exc))}") from None
    if not isinstance(config, dict):
        return  # not a task; lm-eval ignores it too
    loader = config.get("dataset_path")
    if loader is not None and loader not in LOCAL_LOADERS:
        raise DataError(
            shown,
            f"dataset_path {loader!r}: only local files are read here (dataset_path: "
            f"{', '.join(LOCAL_LOADERS)}, with dataset_kwargs.data_files next to the YAML); the hub is not reachable",
        )
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return
    kwargs["data_files"] = _absolute(kwargs["data_files"], root, shown)
    path.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))


def _absolute(files: Any, root: Path, shown: str) -> Any:
    """`data_files` (a path, a list, or a split -> path(s) mapping) with relative paths under `root`."""
    if isinstance(files, dict):
        return {split: _absolute(value, root, shown) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, root, shown) for value in files]
    if not isinstance(files, str):
        raise DataError(shown, f"dataset_kwargs.data_files: expected a path, got {type(files).__name__}")
    if not is_local_path(files):
        raise DataError(
            shown, f"data_files {files!r}: put the data in the tasks folder and name it relatively"
        )
    return files if os.path.isabs(files) else str(root / files)


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
