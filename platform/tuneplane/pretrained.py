"""Locating pretrained checkpoints: a local path, an object-storage URI (copied once per node), or a hub id.

Loading itself is always Hugging Face `from_pretrained` on a local folder, the same code path a user runs.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from tuneplane.spec import ModelSpec, is_local_path

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


class PretrainedError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("TUNEPLANE_CACHE", Path.home() / ".cache" / "tuneplane")) / "pretrained"


def local_copy(uri: str, patterns: tuple[str, ...] = ("*",), cache_dir: Path | None = None) -> Path:
    """A local folder holding the checkpoint at `uri`. Object storage is copied once; concurrent callers on
    the node wait on a file lock, and a copy without its completion marker is never used."""
    if is_local_path(uri) or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise PretrainedError(f"{uri}: no such checkpoint folder")
        return path
    fs, root = url_to_fs(uri)
    key = hashlib.sha256(f"{uri}|{'|'.join(patterns)}".encode()).hexdigest()[:16]
    target = (cache_dir or cache_root()) / key
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
            raise PretrainedError(f"{uri}: cannot list checkpoint: {exc}") from None
        if not names:
            raise PretrainedError(f"{uri}: no checkpoint files found")
        for name in names:
            dest = target / name[len(root) :].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(dest))
        (target / _COMPLETE).touch()
    return target


def load_tokenizer(model: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    location = model.tokenizer or model.base
    if is_local_path(location) and not location.startswith(("/", ".", "~")) and not Path(location).exists():
        return _from_hub(AutoTokenizer, location, model.revision)
    path = local_copy(location, TOKENIZER_FILES)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise PretrainedError(f"{location}: cannot load tokenizer: {exc}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise PretrainedError(f"{location}: a fast (tokenizer.json) tokenizer is required")
    return tokenizer


def _from_hub(cls: Any, hub_id: str, revision: str | None) -> Any:
    try:
        return cls.from_pretrained(hub_id, revision=revision)
    except OSError as exc:
        raise PretrainedError(
            f"{hub_id}: not a local path and not loadable from the hub here ({exc.__class__.__name__}); "
            "mirror it to object storage and use its URI"
        ) from None
