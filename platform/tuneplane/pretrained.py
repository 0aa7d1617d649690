"""Loading pretrained checkpoints from a local path, an object-storage URI (copied once per node), or a hub id.

Loading itself is always Hugging Face `from_pretrained` on a local folder, the same code path a user runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from tuneplane.errors import PretrainedError, clip
from tuneplane.files import NotAllowed, pinned_folder
from tuneplane.home import pretrained_cache
from tuneplane.spec import ModelSpec, is_local_path, model_location_kind

TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "*.model",
    "vocab*",
    "merges.txt",
    "added_tokens.json",
    "config.json",
    "generation_config.json",
)
_COMPLETE = ".tuneplane-complete"
# One answer for a local model folder that is missing, holds a FIFO or device, or reaches outside the roots.
NOT_A_CHECKPOINT = "no readable checkpoint folder here (missing, or a file in it is not a regular file inside the data roots)"


def local_copy(
    uri: str, patterns: tuple[str, ...] = ("*",), cache_dir: Path | None = None, field: str = "model.base"
) -> Path:
    """A local folder holding the checkpoint at the object-storage `uri`, copied once; concurrent callers on
    the node wait on a file lock, and a copy without its completion marker is never used."""
    fs, root = url_to_fs(uri)
    key = hashlib.sha256(f"{uri}|{'|'.join(patterns)}".encode()).hexdigest()[:16]
    target = (cache_dir or pretrained_cache()) / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _COMPLETE).exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        root = root.rstrip("/")
        try:
            names = [
                p
                for p in fs.find(root)
                if any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat) for pat in patterns)
            ]
        except (OSError, ValueError) as exc:
            raise PretrainedError(f"{field}: {uri}: cannot list checkpoint: {clip(str(exc))}") from None
        if not names:
            raise PretrainedError(f"{field}: {uri}: no checkpoint files found")
        for name in names:
            dest = target / name[len(root) :].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(dest))
        (target / _COMPLETE).touch()
    return target


@contextlib.contextmanager
def checkpoint_folder(
    location: str, files: tuple[str, ...] = ("*",), field: str = "model.base", expect: str = "config.json"
) -> Iterator[Path]:
    """A local folder holding the checkpoint at a local path or URI, for a loader that opens files by name.
    A local folder (a path or file://) is *pinned* (`tuneplane.files.pinned_folder`): only its regular files
    inside this process's roots, exactly as they were checked, whatever is swapped in later; object storage
    is copied to this node once. Refused, naming `field`, when the folder has no `expect` file."""
    if is_local_path(location) or location.startswith("file://"):
        stack = contextlib.ExitStack()
        try:
            view = stack.enter_context(pinned_folder(location.removeprefix("file://"), files))
        except (NotAllowed, FileNotFoundError):
            raise PretrainedError(f"{field}: {location}: {NOT_A_CHECKPOINT}") from None
        with stack:
            if not (view / expect).exists():
                raise PretrainedError(f"{field}: no {expect} in {location}")
            yield view
        return
    folder = local_copy(location, files, field=field)
    if not (folder / expect).is_file():
        raise PretrainedError(f"{field}: no {expect} in {location}")
    yield folder


def from_pretrained(
    cls: Any,
    location: str,
    revision: str | None = None,
    files: tuple[str, ...] = ("*",),
    field: str = "model.base",
    expect: str = "config.json",
    **kwargs: Any,
) -> Any:
    """`cls.from_pretrained` (a transformers Auto class) on a model location: the one way base models and
    tokenizers are loaded. A hub id goes to the hub as it is; a local folder or object storage through
    `checkpoint_folder`. The loaded object keeps `location` as its name (what PEFT writes as the base)."""
    kind = model_location_kind(location)
    with contextlib.ExitStack() as stack:
        source = location
        if kind != "hub":
            source = str(stack.enter_context(checkpoint_folder(location, files, field, expect)))
            revision = None  # a revision names a hub commit only
        try:
            loaded = cls.from_pretrained(source, revision=revision, **kwargs)
        except (OSError, ValueError) as exc:
            if kind == "hub":
                raise PretrainedError(
                    f"{field}: {location} is not a local path or URI, and not loadable from the hub here "
                    f"({type(exc).__name__}); mirror it to object storage and use its URI"
                ) from None
            reason = clip(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise PretrainedError(f"{field}: {location}: cannot load: {reason}") from None
    _name(loaded, location)
    return loaded


def _name(loaded: Any, location: str) -> None:
    """Name a model or tokenizer after where it came from, not the private folder it was read through."""
    config = getattr(loaded, "config", None)
    if config is not None and hasattr(config, "_name_or_path"):
        config._name_or_path = location
    if hasattr(loaded, "name_or_path"):  # a model keeps its own copy (what PEFT records as the base)
        with contextlib.suppress(AttributeError):
            loaded.name_or_path = location


def load_tokenizer(model: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    field = "model.tokenizer" if model.tokenizer else "model.base"
    location = model.tokenizer_location
    tokenizer = from_pretrained(
        AutoTokenizer, location, model.revision, TOKENIZER_FILES, field=field, expect="tokenizer.json"
    )
    if not getattr(tokenizer, "is_fast", False):
        raise PretrainedError(f"{field}: {location}: a fast (tokenizer.json) tokenizer is required")
    return tokenizer


def fetch_adapter(model: ModelSpec, tracking_uri: str | None, into: Path) -> Path:
    """The adapter folder of the registered version `model.adapter`, copied from MLflow into `into`."""
    return download_adapter(locate_adapter(model, tracking_uri), model, tracking_uri, into)


def locate_adapter(model: ModelSpec, tracking_uri: str | None) -> str:
    """Where the adapter of the registered version `model.adapter` (`models:/<team>.<name>/<version>`) lies in
    MLflow's artifact store: only the adapter, never the base the pyfunc may carry. The driver asks once (one
    registry lookup per job, not one per worker); refused, naming `model.adapter`, when the version is missing
    or was tuned from another base."""
    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    uri = model.adapter
    assert uri is not None
    if not uri.startswith("models:/"):  # a job id: the API pins it to a version before any run starts
        raise PretrainedError(
            f"model.adapter: job {uri}: a job id is resolved by the API on submit; name its models:/ version"
        )
    if not tracking_uri:
        raise PretrainedError(
            f"model.adapter: {uri} needs the platform's MLflow, and this run has no tracking"
        )
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    try:
        found = MlflowClient(tracking_uri=tracking_uri).get_model_version(name, version)
        base = found.tags.get("tuneplane.base_model")
        if base != model.base:  # checked before any download: a refused version costs no transfer
            raise PretrainedError(
                f"model.adapter: {uri} was tuned from {base}, and this job's model.base is {model.base}"
            )
        repo = ModelsArtifactRepository(uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)
        with tempfile.TemporaryDirectory() as scratch:
            description = yaml.safe_load(Path(repo.download_artifacts("MLmodel", scratch)).read_text())
        path = description["flavors"]["python_function"]["artifacts"]["model"]["path"]
        return f"{repo.repo.artifact_uri.rstrip('/')}/{path}"  # the version's own store, not a second lookup
    except (MlflowException, KeyError, TypeError, OSError) as exc:
        raise PretrainedError(
            f"model.adapter: {uri}: cannot fetch: {clip(str(exc).splitlines()[0])}"
        ) from None


def download_adapter(location: str, model: ModelSpec, tracking_uri: str | None, into: Path) -> Path:
    """The adapter at `location` (from `locate_adapter`) copied into `into`, straight from the artifact store
    (each worker in parallel, no registry query)."""
    import mlflow

    into.mkdir(parents=True, exist_ok=True)
    try:
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(into), tracking_uri=tracking_uri
            )
        )
    except Exception as exc:  # MLflow, OS and each object store's client (botocore, gcsfs...) errors alike
        reason = clip(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise PretrainedError(f"model.adapter: {model.adapter}: cannot fetch: {reason}") from None
    if not (folder / "adapter_config.json").is_file():
        raise PretrainedError(f"model.adapter: {model.adapter} holds a full model, not an adapter")
    return folder
