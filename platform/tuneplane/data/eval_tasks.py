"""lm-evaluation-harness task folders a team names (`eval.lm_eval.tasks_dir`): read, checked, staged.

A task file is data, never code. Left alone, lm-eval would run a team's Python through `!function` tags
(`process_docs`, `process_results`, custom metrics, whole task classes), load YAML from anywhere through
`include`, read any file or folder through `dataset_kwargs`, and load a metric *script* through Hugging Face
`evaluate` for a metric name it does not know. `problems` refuses each of these, naming the file and key, and
is what submit, validate and the job's driver all call; `stage` copies a checked folder into a private one
(YAML rewritten from the checked data, data files copied, Python never), so lm-eval reads exactly what was
checked. Templates inside tasks (`doc_to_text: "{{question}}"`) render in Jinja's sandbox (train/harness.py).

Local folders are read through `tuneplane.files` (checked at open, inside the team's roots).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from fsspec.core import url_to_fs

from tuneplane.errors import DataError, Problems, SpecError, clip
from tuneplane.files import NotAllowed, may_read, open_local
from tuneplane.spec import BoundedYamlLoader, is_local_path

FIELD = "eval.lm_eval.tasks_dir"
LOCAL_LOADERS = ("json", "csv", "parquet")  # `dataset_path` values that read files, never the hub
MAX_FILES = 1_000  # files in one tasks folder
MAX_YAML_BYTES = 1 << 20  # one task file
MAX_YAML_TOTAL = 16 << 20  # every task file of a folder: what submit may read
MAX_FOLDER_BYTES = 1 << 30  # everything staged
_YAML = (".yaml", ".yml")
_METRIC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Keys that would make lm-eval load something a team wrote, with the reason given back.
_REFUSED_KEYS = {
    "hf_evaluate": "loads a metric script through Hugging Face `evaluate`, which runs code; use lm-eval's "
    "built-in metrics",
    "use_prompt": "reads promptsource templates; write doc_to_text and doc_to_target in the task instead",
    "custom_dataset": "builds the dataset with the team's own Python; name data files in dataset_kwargs",
}
_CODE = (
    "runs the team's own Python, which no job may do; use lm-eval's built-in metrics, filters and templates"
)


class _Tagged:
    """A YAML node with a custom tag (lm-eval's `!function utils.process_docs`): always refused."""

    def __init__(self, tag: str):
        self.tag = tag


class _TaskLoader(BoundedYamlLoader):
    pass


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: _Tagged(f"!{suffix}"))


@dataclass(frozen=True)
class _Folder:
    """A tasks folder: where it is, and its files by folder-relative name (Python files left out)."""

    uri: str
    fs: Any  # None for a local folder: read through tuneplane.files
    root: str
    names: tuple[str, ...]

    def shown(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def open(self, name: str) -> BinaryIO:
        path = f"{self.root}/{name}"
        if self.fs is None:
            return open_local(path)
        handle: BinaryIO = self.fs.open(path, "rb")
        return handle


def problems(uri: str) -> Problems:
    """Everything the task files at `uri` say that is refused here, as (field, "file: key: reason") pairs
    naming `eval.lm_eval.tasks_dir`; empty when the folder may be used."""
    try:
        folder = _list(uri)
        return [(FIELD, message) for message in _checked(folder)[1]]
    except DataError as exc:
        return [(FIELD, str(exc))]


def stage(uri: str, dest: Path) -> Path:
    """A private copy of the checked tasks folder at `uri` in `dest`: each YAML rewritten from its checked data
    with its `data_files` made absolute under `dest`, the data files copied, no Python. SpecError naming
    `eval.lm_eval.tasks_dir` when a task file says something refused (see `problems`)."""
    folder = _list(uri)
    configs, found = _checked(folder)
    if found:
        raise SpecError([(FIELD, message) for message in found])
    copied = 0
    for name in folder.names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in configs:
            target.write_text(
                yaml.safe_dump(_localized(configs[name], dest), sort_keys=False, allow_unicode=True)
            )
            continue
        with _reading(folder, name) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                copied += len(chunk)
                if copied > MAX_FOLDER_BYTES:
                    raise DataError(uri, f"more than {MAX_FOLDER_BYTES >> 20} MiB of task data")
                out.write(chunk)
    return dest


# -- reading ----------------------------------------------------------------------------------------------------


def _list(uri: str) -> _Folder:
    try:
        if is_local_path(uri) or uri.startswith("file://"):
            root = os.path.expanduser(uri.removeprefix("file://")).rstrip("/") or "/"
            if not may_read(root) or not os.path.isdir(root):
                raise NotAllowed(root)
            fs, paths = None, _walk(root)
        else:
            fs, root = url_to_fs(uri)
            root = root.rstrip("/")
            paths = (p for p in fs.find(root) if fs.isfile(p))
        names = []
        for path in paths:
            name = path[len(root) :].lstrip("/")
            normal = posixpath.normpath(name)
            if (
                normal != name or normal == ".." or normal.startswith(("../", "/"))
            ):  # an object key `a/../../x`
                raise DataError(uri, f"{clip(name, 200)}: not a plain path inside the tasks folder")
            names.append(name)
            if len(names) > MAX_FILES:
                raise DataError(uri, f"more than {MAX_FILES} files in the tasks folder")
    except NotAllowed:
        raise DataError(
            uri, "no readable tasks folder here (missing, or outside this team's data roots)"
        ) from None
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(
            uri, f"cannot list the tasks folder: {clip(str(exc) or type(exc).__name__)}"
        ) from None
    kept = tuple(sorted(n for n in names if not n.endswith((".py", ".pyc")) and "__pycache__" not in n))
    if not any(n.endswith(_YAML) for n in kept):
        raise DataError(uri, "no task files (*.yaml) in the tasks folder")
    return _Folder(uri, fs, root, kept)


def _walk(root: str) -> Iterator[str]:
    """Files under `root`, symlinked folders not followed (a symlinked file is checked when opened)."""
    for dirpath, _, files in os.walk(root, followlinks=False):
        for name in files:
            yield os.path.join(dirpath, name)


@contextlib.contextmanager
def _reading(folder: _Folder, name: str) -> Iterator[BinaryIO]:
    """A file of the folder opened for reading; refusals and I/O errors as DataError naming the file."""
    try:
        handle = folder.open(name)
    except NotAllowed:
        raise DataError(folder.shown(name), "not a regular file inside this team's data roots") from None
    except OSError as exc:
        raise DataError(folder.shown(name), f"cannot read: {clip(str(exc))}") from None
    with handle:
        yield handle


def _checked(folder: _Folder) -> tuple[dict[str, Any], list[str]]:
    """(each task file's parsed content by name, every problem as "file: key: reason")."""
    configs: dict[str, Any] = {}
    found: list[str] = []
    total = 0
    for name in (n for n in folder.names if n.endswith(_YAML)):
        shown = folder.shown(name)
        with _reading(folder, name) as handle:
            text = handle.read(MAX_YAML_BYTES + 1)
        if len(text) > MAX_YAML_BYTES:
            found.append(f"{shown}: larger than {MAX_YAML_BYTES >> 10} KiB")
            continue
        total += len(text)
        if total > MAX_YAML_TOTAL:
            found.append(f"{folder.uri}: task files over {MAX_YAML_TOTAL >> 20} MiB in all")
            break
        try:
            config = yaml.load(text, Loader=_TaskLoader)  # a SafeLoader; tags become _Tagged
        except (yaml.YAMLError, RecursionError) as exc:
            found.append(f"{shown}: not valid YAML: {clip(str(exc))}")
            continue
        configs[name] = config
        found += [f"{shown}: {key}: {reason}" for key, reason in _rules(config, name, set(folder.names))]
    return configs, found


# -- the rules --------------------------------------------------------------------------------------------------


def _rules(node: Any, name: str, files: set[str], path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, reason) for everything in one task document (the file `name`) that is refused."""
    if isinstance(node, _Tagged):
        yield path or "(document)", f"{node.tag} {_CODE}"
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _rules(item, name, files, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            yield from ((where, reason) for reason in _key_rule(str(key), value, name, files))
            yield from _rules(value, name, files, where)


def _key_rule(key: str, value: Any, name: str, files: set[str]) -> Iterator[str]:
    if key in _REFUSED_KEYS:
        yield _REFUSED_KEYS[key]
    elif key == "include":  # only task files of the folder, each checked here (lm-eval runs their tags)
        yamls = {f for f in files if f.endswith(_YAML)}
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not item.endswith(_YAML):
                yield f"{clip(item, 200)}: an include names a task file (*.yaml) of the folder"
                continue
            yield from _within(item, posixpath.dirname(name), yamls, "an included task file")
    elif key == "dataset_path" and value not in LOCAL_LOADERS:
        yield (
            f"{clip(repr(value), 100)}: only local files are read here (dataset_path: {', '.join(LOCAL_LOADERS)}, "
            "with dataset_kwargs.data_files in the tasks folder); the hub is not reachable"
        )
    elif key == "dataset_kwargs":
        if not isinstance(value, dict):
            yield "expected a mapping with data_files"
            return
        for other in sorted(set(value) - {"data_files"}):
            yield f"{other}: only data_files is read here (paths inside the tasks folder)"
        for item in _leaves(value.get("data_files")):
            yield from _within(item, "", files, "a data file")
    elif key == "metric" and isinstance(value, str) and not _known_metric(value):
        yield f"{clip(repr(value), 100)} is not one of lm-eval's built-in metrics"


def _within(item: Any, base: str, files: set[str], what: str) -> Iterator[str]:
    """A path relative to `base` (inside the folder) naming a file of the folder; globs match folder files."""
    if not isinstance(item, str) or not item:
        yield f"expected a relative path, got {type(item).__name__}"
        return
    joined = posixpath.normpath(posixpath.join(base, item))
    if "://" in item or item.startswith(("/", "~")) or joined == ".." or joined.startswith("../"):
        yield f"{clip(item, 200)}: {what} must lie in the tasks folder, named relatively"
    elif not any(_matches(joined, f) for f in files):
        yield f"{clip(item, 200)}: no such file in the tasks folder"


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else pattern == name


def _leaves(files: Any) -> Iterator[Any]:
    """The paths of `data_files`: a path, a list, or a split -> path(s) mapping."""
    if isinstance(files, dict):
        for value in files.values():
            yield from _leaves(value)
    elif isinstance(files, list):
        for value in files:
            yield from _leaves(value)
    else:
        yield files


def _known_metric(name: str) -> bool:
    """A plain metric name, and where lm-eval is installed, one it registers (an unknown one would send lm-eval
    to Hugging Face `evaluate`, which loads metric scripts)."""
    if not _METRIC.match(name):
        return False
    try:
        import lm_eval.api.metrics  # noqa: F401 - registers the built-in metrics
        from lm_eval.api.registry import metric_registry
    except ImportError:
        return True  # an API image without the eval extra: the driver checks again with lm-eval at hand
    return name in metric_registry


def _localized(config: Any, dest: Path) -> Any:
    """The checked document with every `data_files` path made absolute under `dest` (lm-eval resolves them
    against its working directory otherwise)."""
    if isinstance(config, list):
        return [_localized(item, dest) for item in config]
    if not isinstance(config, dict):
        return config
    out = {key: _localized(value, dest) for key, value in config.items()}
    kwargs = out.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        kwargs["data_files"] = _absolute(kwargs["data_files"], dest)
    return out


def _absolute(files: Any, dest: Path) -> Any:
    if isinstance(files, dict):
        return {split: _absolute(value, dest) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, dest) for value in files]
    return str(dest / posixpath.normpath(files))
