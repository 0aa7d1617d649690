"""The tuning spec: what a team asks the platform to train, as typed, validated data.

A spec says *what* to train (model, data, method, hyper-parameters, scale); it never says *how to run*:
no shell command, entrypoint, environment or secret. The platform builds those itself, so the same spec
runs on a laptop, in CI and on a GPU cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneplane.errors import SpecError

SPEC_VERSION: Literal["tuneplane/v1"] = "tuneplane/v1"

FormatName = Literal["alpaca", "messages", "sharegpt", "prompt_completion", "labeled"]
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
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_FIELD_PREFIX = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+): (.+)$", re.DOTALL)
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


class LoraMethod(_Strict):
    type: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(
        32,
        ge=1,
        le=65_536,
        description="LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA).",
    )
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: (
        Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=256)] | Literal["all-linear"]
    ) = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    modules_to_save: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list,
        max_length=64,
        description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens] when the "
        "template adds tokens the base model never learned.",
    )
    use_dora: bool = Field(
        False,
        description="DoRA: train each adapted weight's magnitude apart from its direction; closer to full tuning "
        "at low rank, for a slower step and one extra vector per adapted module.",
    )
    use_rslora: bool = Field(
        False,
        description="Rank-stabilised LoRA: scale = alpha / sqrt(r) instead of alpha / r, so large ranks keep "
        "learning instead of being scaled down.",
    )
    quantize: Literal["none", "4bit"] = Field(
        "none",
        description="`4bit` = QLoRA: the frozen base weights held in 4-bit NF4 (bitsandbytes), about a quarter of "
        "their 16-bit memory; GPU workers only, ZeRO stage 0-2.",
    )


class FullMethod(_Strict):
    type: Literal["full"] = "full"


class PartialMethod(_Strict):
    type: Literal["partial"] = "partial"
    last_n_layers: int = Field(
        ge=1, description="Train only the last N transformer blocks (and the final norm)."
    )
    train_lm_head: bool = Field(True, description="Also train the output projection.")


Method = Annotated[LoraMethod | FullMethod | PartialMethod, Field(discriminator="type")]


class DistributedSpec(_Strict):
    """Scale and DeepSpeed ZeRO layout."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload optimizer state to CPU memory.")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (data-parallel ranks).")
    gpus_per_worker: int = Field(1, ge=0, le=16, description="GPUs per worker; 0 = CPU training.")
    cpus_per_worker: float = Field(4, gt=0, le=512)
    memory_per_worker: str | None = Field(None, description="Kubernetes quantity, e.g. '128Gi'.")
    gpu_pool: str | None = Field(None, description="Named GPU pool from the platform config (e.g. 'h100').")
    max_failures: int = Field(
        2, ge=0, le=100, description="Worker failures tolerated; each resumes from checkpoint."
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Elastic training: run with anywhere from min_workers to num_workers workers, as the cluster "
        "has room, and resume on another number of workers after a node is lost (model and optimizer states "
        "re-partitioned exactly, the data re-sharded so every example of the epoch is still trained once).",
    )

    @field_validator("memory_per_worker")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not _QUANTITY.match(value):
            raise ValueError(f"'{value}' is not a Kubernetes quantity such as '64Gi'")
        return value

    @model_validator(mode="after")
    def _offload_needs_zero3(self) -> DistributedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError("min_workers must not exceed num_workers")
        if self.min_workers is not None and self.zero_stage == 0:
            # A resize reloads through DeepSpeed's universal checkpoint, a ZeRO format.
            raise ValueError("min_workers (elastic training) needs zero_stage 1, 2 or 3")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers


def effective_zero_stage(dist: DistributedSpec, world_size: int) -> int:
    """The ZeRO stage that really runs. ZeRO partitions across data-parallel ranks; with one rank there is
    nothing to partition and stages 1-3 only add buffer copies (measured: ZeRO-2 at 0.73x the tokens/s of
    ZeRO-0 on one CPU worker), so a single rank runs stage 0. Offload needs a ZeRO stage: it keeps its own, and
    so does an elastic job, whose checkpoints must load on any number of workers."""
    single = world_size == 1 and not (dist.offload_optimizer or dist.offload_params or dist.elastic)
    return 0 if single else dist.zero_stage


class HyperParameters(_Strict):
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    epochs: int | None = Field(
        None, ge=1, le=10_000, description="Passes over the data; default 1 unless max_steps is set."
    )
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Optimizer steps; stops before `epochs` if reached."
    )
    micro_batch_size: int = Field(1, ge=1, le=4096, description="Rows per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    weight_decay: float = Field(0.0, ge=0, le=10)
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping; 0 disables.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds Python, NumPy and torch (32 bits).")


class CheckpointSpec(_Strict):
    every_n_steps: int = Field(100, ge=1, le=MAX_STEPS)
    keep: int = Field(2, ge=1, le=100, description="Checkpoints kept; older ones are deleted.")


class TrackingSpec(_Strict):
    experiment: str | None = Field(
        None,
        description="MLflow experiment, `<team>/<experiment>`; defaults to the spec name. Letters, digits, "
        "'.', '_', '-' (no paths).",
    )
    registered_model_name: str | None = Field(
        None,
        description="Register the adapter as `<team>.<name>` (same characters as `experiment`): consumers load "
        "`models:/<team>.<name>/<version>`, and no other team can publish into it.",
    )
    log_every_n_steps: int = Field(10, ge=1, le=MAX_STEPS)

    @field_validator("experiment", "registered_model_name")
    @classmethod
    def _mlflow_name(cls, value: str | None) -> str | None:
        if value is not None and (not _MLFLOW_NAME.match(value) or ".." in value):
            raise ValueError(
                "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"
            )
        return value

    export_merged: bool = Field(False, description="Also log a merged (base + adapter) model.")


class EvalSpec(_Strict):
    every_n_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Eval loss cadence; default: at the end only."
    )
    max_batches: int | None = Field(None, ge=1, le=MAX_STEPS)
    zero_shot_sources: list[SourceSpec] = Field(
        default_factory=list,
        max_length=MAX_SOURCES,
        description="Held-out *tasks* (never trained on) scored by exact-match generation.",
    )
    max_examples: int = Field(200, ge=1, le=100_000, description="Examples per zero-shot task.")
    max_new_tokens: int = Field(32, ge=1, le=4096)


class TuningSpec(_Strict):
    """A complete instruction-tuning job."""

    api_version: Literal["tuneplane/v1"] = Field(SPEC_VERSION, alias="apiVersion")
    name: str = Field(
        min_length=1, max_length=53, description="DNS-1123 label: lowercase letters, digits, '-'."
    )
    model: ModelSpec
    data: DataSpec
    method: Method = Field(default_factory=LoraMethod)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    hyperparameters: HyperParameters = Field(default_factory=HyperParameters)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending alnum"
            )
        return value

    @model_validator(mode="after")
    def _quantize_fits_the_job(self) -> TuningSpec:
        # Reported by parse_spec under `method.quantize` (the "field: message" prefix names it).
        if not isinstance(self.method, LoraMethod) or self.method.quantize == "none":
            return self
        if self.distributed.gpus_per_worker == 0:
            raise ValueError(
                "method.quantize: '4bit' (QLoRA) needs GPU workers: bitsandbytes' 4-bit weights run on CUDA only, "
                "and this job has distributed.gpus_per_worker 0"
            )
        if self.distributed.zero_stage == 3:
            raise ValueError(
                "method.quantize: '4bit' (QLoRA) cannot run under ZeRO-3 here: PEFT supports that only for a model "
                "built inside deepspeed.zero.Init with a matching bnb_4bit_quant_storage, and this runtime loads the "
                "base model before DeepSpeed partitions it; use distributed.zero_stage 2 (the adapters' gradients "
                "and optimizer states are still partitioned)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_commands_or_secrets(cls, data: Any) -> Any:
        # parse_spec reports these per field first; this keeps direct model_validate() calls just as strict.
        problems = list(_forbidden_keys(data, ""))
        if problems:
            raise ValueError("; ".join(f"{path}: {msg}" for path, msg in problems))
        return data

    def source_fields(self) -> Iterator[tuple[str, SourceSpec]]:
        """Every data source with its field path (`data.sources[0]`), for messages that name the field."""
        groups = {
            "data.sources": self.data.sources,
            "data.eval_sources": self.data.eval_sources,
            "eval.zero_shot_sources": self.eval.zero_shot_sources,
        }
        for name, sources in groups.items():
            for i, source in enumerate(sources):
                yield f"{name}[{i}]", source

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _forbidden_keys(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if str(key).lower() in _FORBIDDEN_KEYS:
                yield sub, _FORBIDDEN_KEYS[str(key).lower()]
            else:
                yield from _forbidden_keys(value, sub)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _forbidden_keys(item, f"{path}[{i}]")


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"lora", "full", "partial"} and out.endswith("method"):
            continue  # discriminated-union tag: not a field the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_spec(data: Any, source: str | None = None) -> TuningSpec:
    """Validate a decoded document; raises SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError([("", f"a spec is a mapping, got {type(data).__name__}")], source)
    try:
        forbidden = list(_forbidden_keys(data, ""))
    except RecursionError:
        raise SpecError([("", _TOO_DEEP)], source) from None
    if forbidden:
        raise SpecError(forbidden, source)
    try:
        return TuningSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            where = _loc_to_path(err["loc"])
            if not where and (named := _FIELD_PREFIX.match(msg)):  # a whole-spec check naming its field
                where, msg = named.group(1), named.group(2)
            problems.append((where, msg))
        raise SpecError(problems, source) from None


def load_spec(path: str | Path) -> TuningSpec:
    """Load a YAML or JSON spec file; relative local paths in it resolve against the file's folder."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(
                [("", f"larger than {MAX_SPEC_BYTES} bytes; a spec names its data, it holds none")]
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("", "file not found")], str(path)) from None
    except UnicodeDecodeError:
        raise SpecError([("", "not UTF-8 text")], str(path)) from None
    return parse_spec_text(text, source=str(path), base_dir=path.resolve().parent)


class _SpecLoader(yaml.SafeLoader):
    """YAML with its aliases bounded: `*name` repeats a node without copying it, so a few lines can stand for
    billions of nodes (the "billion laughs") that every later walk of the document would visit. A spec may
    repeat at most MAX_ALIASED_NODES nodes through aliases (its own templates, say, are a few dozen)."""

    MAX_ALIASED_NODES = 10_000

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliased = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self.anchors:
                self._aliased += self._size(self.anchors[event.anchor])
                if self._aliased > self.MAX_ALIASED_NODES:
                    raise yaml.composer.ComposerError(
                        None,
                        None,
                        f"aliases expand to more than {self.MAX_ALIASED_NODES} nodes",
                        event.start_mark,
                    )
        return super().compose_node(parent, index)

    def _size(self, node: Any) -> int:
        """Nodes under `node`, an alias counted in full; memoised, so a nested alias costs one lookup."""
        if id(node) not in self._sizes:
            children = node.value if isinstance(node.value, list) else []
            flat = [c for child in children for c in (child if isinstance(child, tuple) else (child,))]
            self._sizes[id(node)] = 1 + sum(self._size(child) for child in flat)
        return self._sizes[id(node)]


def parse_spec_text(text: str, source: str = "<spec>", base_dir: Path | None = None) -> TuningSpec:
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.load(text, Loader=_SpecLoader)
    except json.JSONDecodeError as exc:
        raise SpecError([("", f"line {exc.lineno}: invalid JSON: {exc.msg}")], source) from None
    except RecursionError:
        raise SpecError([("", _TOO_DEEP)], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise SpecError([("", f"{where}invalid YAML: {getattr(exc, 'problem', exc)}")], source) from None
    spec = parse_spec(data, source)
    return resolve_paths(spec, base_dir) if base_dir is not None else spec


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


def spec_hash(spec: TuningSpec) -> str:
    """A spec's identity: the SHA-256 (64 hex digits) of its canonical JSON. The job record, its MLflow run
    and its registered versions all carry this one value, so each can be joined to the others."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def resolve_paths(spec: TuningSpec, base_dir: Path) -> TuningSpec:
    """Make relative local paths absolute so the spec means the same thing from any working directory.
    Absolute paths are kept as written: a spec the platform stored comes back from its file unchanged."""

    def resolve(value: str) -> str:
        path = Path(value).expanduser()
        return value if path.is_absolute() and not value.startswith("~") else str((base_dir / path).resolve())

    def fix_source(src: SourceSpec) -> SourceSpec:
        return src.model_copy(update={"uri": resolve(src.uri)}) if is_local_path(src.uri) else src

    model_update = {
        key: resolve(location)
        for key in ("base", "tokenizer")
        if (location := getattr(spec.model, key)) and model_location_kind(location) == "path"
    }
    data = spec.data.model_copy(
        update={
            "sources": [fix_source(s) for s in spec.data.sources],
            "eval_sources": [fix_source(s) for s in spec.data.eval_sources],
        }
    )
    ev = spec.eval.model_copy(
        update={"zero_shot_sources": [fix_source(s) for s in spec.eval.zero_shot_sources]}
    )
    return spec.model_copy(
        update={"model": spec.model.model_copy(update=model_update), "data": data, "eval": ev}
    )


def json_schema() -> dict[str, Any]:
    schema = TuningSpec.model_json_schema(by_alias=True)
    schema["$id"] = "https://tuneplane.dev/schemas/tuning-spec-v1.json"
    schema["title"] = "Tuneplane tuning spec (tuneplane/v1)"
    return schema
