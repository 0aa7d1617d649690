"""Shared ground of the spec's parts: strict models, limits, and what a URI or model location is."""

from __future__ import annotations

import re
from itertools import takewhile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

SPEC_VERSION: Literal["tuneplane/v1"] = "tuneplane/v1"

FormatName = Literal["alpaca", "messages", "sharegpt", "prompt_completion", "labeled", "preference"]
# What a format's records are: examples to imitate (instruction) or chosen/rejected pairs (preference). A method
# trains on one kind (`Method.data_kind`).
DataKind = Literal["instruction", "preference"]
_PAIR_FORMATS: frozenset[str] = frozenset({"preference"})


def format_kind(fmt: str) -> DataKind:
    """The kind of records a data format holds: the one rule for "is this preference data?"."""
    return "preference" if fmt in _PAIR_FORMATS else "instruction"


TemplateName = Literal["alpaca", "flan", "chatml", "llama3", "tokenizer"]

# Keys that would let a spec run arbitrary code or carry credentials. Rejected anywhere in the document with
# a message that says why, rather than the generic "extra field" error.
_FORBIDDEN_KEYS = {
    "command": "a spec carries no shell command: the platform runs `python -m tuneplane.train` itself",
    "entrypoint": "a spec carries no entrypoint: the platform runs `python -m tuneplane.train` itself",
    "env": "a spec carries no environment variables: the platform sets the runtime environment",
    "secret": "a spec carries no secrets: storage credentials come from the platform's Secret references",
    "secrets": "a spec carries no secrets: storage credentials come from the platform's Secret references",
    "credentials": "a spec carries no credentials: they come from the platform's Secret references",
    "aws_secret_access_key": "a spec carries no secrets: use the platform's storage Secret",
    "password": "a spec carries no secrets: use the platform's Secret references",
    "token": "a spec carries no secrets: use the platform's Secret references",
}
_URI_SECRET_HINTS = re.compile(
    r"(X-Amz-Signature|X-Amz-Credential|[?&]sig=|[?&]token=|[?&]sv=)", re.IGNORECASE
)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A check on a whole model names the field it is about as "path.to.field: message" (see parse_spec).
_FIELD_PREFIX = re.compile(r"^([a-z_]+(?:\.[A-Za-z0-9_-]+|\[\d+\])+): (.+)$", re.DOTALL)
# A model-hub id: `name` or `org/name`, starting with a letter or digit (never '.', '/' or '~').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

LocationKind = Literal["uri", "path", "hub"]


# Run-time limits a spec must fit: beyond them a value is a mistake or an attack (a step count no job reaches,
# a seed numpy cannot take), refused at submit rather than failing hours later.
MAX_STEPS = 100_000_000
MAX_SOURCES = 64
MAX_URI = 4096
MAX_TEXT = 32_768
MAX_SPEC_BYTES = 1 << 20
_TOO_DEEP = "nested too deeply to be a spec"
# Experiment and registered-model names: MLflow's own characters, never a path (no '/', no '..').
_MLFLOW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Strict(BaseModel):
    # Floats are finite: NaN or Infinity (which JSON cannot even store) would loop or crash a run.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


def _check_uri(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if _SCHEME.match(value) and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(
            "credentials inside a URI are not accepted; the platform's storage Secret provides them"
        )
    if _URI_SECRET_HINTS.search(value):
        raise ValueError(
            "signed or token-bearing URIs are not accepted; the platform's storage Secret provides access"
        )
    return value


def is_local_path(value: str) -> bool:
    """For data sources and run storage: anything without a `scheme://` is a local path."""
    return not _SCHEME.match(value)


def model_location_kind(value: str) -> LocationKind:
    """What a model or tokenizer location names; decided here and nowhere else. `scheme://...` is a URI
    (object storage, or file://); `org/name` or `name` is a model-hub id; anything else is a local path, so
    a local folder is written `/x`, `./x`, `../x` or `~/x` (`.cache/x` is a path too: hub ids never start
    with a dot)."""
    if _SCHEME.match(value):
        return "uri"
    return "hub" if _HUB_ID.match(value) else "path"


def static_prefix(location: str) -> str:
    """The part of a local glob before its first wildcard: the folder every match lies under."""
    fixed = list(takewhile(lambda part: not any(c in part for c in "*?["), Path(location).parts))
    return str(Path(*fixed)) if fixed else "/"
