"""Instruction data: sources in object storage, their record formats and templates, and how they become rows."""

from __future__ import annotations

import string
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tuneplane.spec._fields import (
    MAX_SOURCES,
    MAX_TEXT,
    MAX_URI,
    FormatName,
    TemplateName,
    _check_uri,
    _Strict,
)


class InstructionTemplate(_Strict):
    """A FLAN-style template turning a labeled record into an (instruction, response) pair."""

    prompt: str = Field(
        max_length=MAX_TEXT,
        description="Text with `{field}` placeholders for the record's fields, e.g. '{premise}\\nTrue or false?'.",
    )
    response: str = Field(
        "{label}", max_length=MAX_TEXT, description="Text with `{field}` placeholders for the target."
    )

    @field_validator("prompt", "response")
    @classmethod
    def _well_formed(cls, value: str) -> str:
        """Plain `{field}` placeholders only: a format spec (`{x:>999999999}`) or conversion (`{x!r}`) could
        make one record render to gigabytes."""
        try:
            parts = [
                (name, spec, conv)
                for _, name, spec, conv in string.Formatter().parse(value)
                if name is not None
            ]
        except ValueError as exc:
            raise ValueError(f"not a valid format string: {exc}") from None
        for name, spec, conv in parts:
            if not name.isidentifier() or spec or conv:
                shown = f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"[:60]
                raise ValueError(f"placeholder {shown} must be a plain field name such as {{label}}")
        return value

    def fields(self) -> set[str]:
        return {
            name
            for text in (self.prompt, self.response)
            for _, name, _, _ in string.Formatter().parse(text)
            if name
        }


class SourceSpec(_Strict):
    """One instruction dataset: files in object storage with one record format."""

    uri: str = Field(
        max_length=MAX_URI,
        description="fsspec URI or local path; globs allowed (s3://bucket/flan/*.jsonl.gz).",
    )
    format: FormatName = Field(
        description="Record layout: alpaca, messages, sharegpt, prompt_completion, labeled."
    )
    name: str | None = Field(
        None, max_length=128, description="Short name for reports and metrics; defaults to the file stem."
    )
    weight: float = Field(1.0, gt=0, le=1e6, description="Relative sampling weight when mixing sources.")
    fields: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=128)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Canonical field -> record field, e.g. {instruction: question, output: answer}.",
    )
    templates: list[InstructionTemplate] = Field(
        default_factory=list,
        max_length=64,
        description="FLAN-style templates; one is drawn per example (seeded). Required for `labeled`.",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="`fail` stops at a bad record; `skip` reports it."
    )
    max_error_fraction: float = Field(
        0.01, ge=0, le=1, description="With on_error=skip: most bad records tolerated."
    )

    _uri = field_validator("uri")(lambda v: _check_uri(v))

    @model_validator(mode="after")
    def _templates_for_labeled(self) -> SourceSpec:
        if self.format == "labeled" and not self.templates:
            raise ValueError("format 'labeled' needs at least one entry in `templates`")
        return self

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        stem = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return stem.split(".", 1)[0] or self.uri


class DataSpec(_Strict):
    """Instruction data, how it is rendered into tokens, and held-out data for evaluation."""

    sources: list[SourceSpec] = Field(
        min_length=1, max_length=MAX_SOURCES, description="Training sources, mixed by weight."
    )
    eval_sources: list[SourceSpec] = Field(
        default_factory=list, max_length=MAX_SOURCES, description="Held-out sources for eval loss."
    )
    holdout_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Share of training records held out for eval."
    )
    template: TemplateName = Field(
        "alpaca", description="Prompt template; `tokenizer` = the tokenizer's chat template."
    )
    system_prompt: str | None = Field(
        None, max_length=MAX_TEXT, description="System message added where a conversation has none."
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: responses only).")
    max_seq_len: int = Field(
        2048, ge=16, le=1_048_576, description="Tokens per row; longer examples are truncated."
    )
    packing: bool = Field(True, description="Bin-pack examples into rows with per-example attention.")
    pack_buffer: int = Field(
        512, ge=1, le=65_536, description="Examples held for best-fit packing; larger packs tighter."
    )
    dedup: Literal["off", "exact", "near"] = Field(
        "off",
        description="Drop duplicate training records before training: `exact` (same normalised conversation "
        "text) or `near` (also MinHash near-duplicates at `near_dup_threshold`). The first occurrence in source "
        "order is kept; the same records are dropped on every rank, resume and re-run.",
    )
    near_dup_threshold: float = Field(
        0.8,
        ge=0.5,
        le=1.0,
        description="Word-shingle Jaccard similarity at which two records are near-duplicates.",
    )
    decontaminate: bool = Field(
        False,
        description="Drop training records that overlap an eval source or zero-shot task (a shared "
        "`contamination_ngram`-word n-gram, or a near-duplicate).",
    )
    contamination_ngram: int = Field(
        13,
        ge=4,
        le=64,
        description="Words in the n-grams compared for contamination (13 as in GPT-3 and Llama).",
    )
