"""The pretrained base model a job tunes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneplane.spec._fields import MAX_URI, LocationKind, _check_uri, _Strict, model_location_kind


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

    _uri = field_validator("base", "tokenizer")(lambda v: None if v is None else _check_uri(v))

    @property
    def base_kind(self) -> LocationKind:
        return model_location_kind(self.base)

    @property
    def tokenizer_location(self) -> str:
        return self.tokenizer or self.base
