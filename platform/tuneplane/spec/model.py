"""The pretrained base model a job tunes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from tuneplane.spec._fields import MAX_URI, LocationKind, _check_uri, _Strict, model_location_kind

# A registered version by number: what a job was tuned from must not change under it (no aliases or `latest`).
_REGISTERED = re.compile(r"^models:/[A-Za-z0-9][A-Za-z0-9_.-]{0,255}/[1-9][0-9]{0,8}$")
# A job's id, as store.jobs.new_job_id makes it: the spec's name, cut to fit the backend's id length (at most
# the store's 63 characters), and 8 hex digits.
_JOB_ID = re.compile(r"^[a-z0-9][-a-z0-9]{0,53}-[0-9a-f]{8}$")


def adapter_is_job_id(adapter: str) -> bool:
    """`model.adapter` names a job (resolved to the version it registered when the API admits the spec)
    rather than a registered version."""
    return bool(_JOB_ID.match(adapter))


def registered_team(uri: str) -> str:
    """The team a registered model belongs to: `<team>.<name>` names are the platform's (tracking/tags.py)."""
    return uri.removeprefix("models:/").split("/", 1)[0].split(".", 1)[0]


class ModelSpec(_Strict):
    """The pretrained base model."""

    base: str = Field(
        max_length=MAX_URI,
        description="Object-storage URI (s3://, gs://, az://), hub id (org/name) or local folder (/x, ./x, ~/x).",
    )
    revision: str | None = Field(
        None, max_length=256, description="Hub revision (branch, tag or commit); hub ids only."
    )
    tokenizer: str | None = Field(
        None, max_length=MAX_URI, description="Tokenizer location when it differs from `base`."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; `auto` = bfloat16 on GPU, float32 on CPU."
    )
    activation_checkpointing: Literal["off", "on", "auto"] = Field(
        "auto",
        description="Keep only each decoder layer's input and recompute the rest in the backward: activation "
        "memory drops to about one hidden state per layer for roughly a third more compute per step. `auto` turns "
        "it on when the memory estimate without it does not fit the worker's GPU (never on CPU).",
    )

    adapter: str | None = Field(
        None,
        max_length=MAX_URI,
        description="Start from a registered adapter, `models:/<team>.<name>/<version>` or the id of a job of your "
        "team that registered one (the API pins it to that version on submit), e.g. DPO after an SFT job: LoRA "
        "methods go on training it (its own rank and targets), full fine-tuning starts from base + adapter merged. "
        "It must have been tuned from the same `base`; the new version records it as its parent.",
    )

    _uri = field_validator("base", "tokenizer")(lambda v: None if v is None else _check_uri(v))

    @field_validator("adapter")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None and not (_REGISTERED.match(value) or adapter_is_job_id(value)):
            raise ValueError(
                "use a registered model version, models:/<team>.<name>/<version>, or the id of a job that "
                "registered one"
            )
        return value

    @property
    def base_kind(self) -> LocationKind:
        return model_location_kind(self.base)

    @property
    def tokenizer_location(self) -> str:
        return self.tokenizer or self.base
