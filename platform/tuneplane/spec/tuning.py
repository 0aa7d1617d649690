"""The whole tuning spec, and how a document becomes one: parsing, field-located errors, paths, hash, schema."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tuneplane.errors import SpecError
from tuneplane.spec._fields import (
    _FIELD_PREFIX,
    _FORBIDDEN_KEYS,
    _NAME,
    _TOO_DEEP,
    MAX_SPEC_BYTES,
    SPEC_VERSION,
    DataKind,
    LocationKind,
    _Strict,
    format_kind,
    is_local_path,
    model_location_kind,
)
from tuneplane.spec.data import DataSpec, SourceSpec
from tuneplane.spec.evaluation import EvalSpec
from tuneplane.spec.method import METHOD_TYPES, LoraMethod, Method
from tuneplane.spec.model import ModelSpec
from tuneplane.spec.run import CheckpointSpec, DistributedSpec, HyperParameters, TrackingSpec

# How a method's data-kind mismatch is worded.
_DATA_KIND_WORDS: dict[DataKind, str] = {
    "instruction": "instruction records (not 'preference')",
    "preference": "'preference' pairs",
}


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

    @model_validator(mode="after")
    def _data_fits_the_method(self) -> TuningSpec:
        wanted = self.method.data_kind
        for field, source in self.source_fields():
            if field.startswith("eval.zero_shot_sources"):
                continue  # zero-shot tasks are generation tasks for every method
            if format_kind(source.format) != wanted:
                what = _DATA_KIND_WORDS[wanted]
                raise ValueError(f"{field}.format: method.type {self.method.type} trains on {what}")
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

    def locations(self) -> list[tuple[str, str, LocationKind]]:
        """(field, location, kind) of everything the spec reads: data sources and lm-eval task folders (a path
        or a URI, never a hub id), model and tokenizer."""
        out: list[tuple[str, str, LocationKind]] = [
            (f"{field}.uri", source.uri, "path" if is_local_path(source.uri) else "uri")
            for field, source in self.source_fields()
        ]
        if lm_eval := self.eval.lm_eval:
            tasks_dir = lm_eval.tasks_dir
            out.append(("eval.lm_eval.tasks_dir", tasks_dir, "path" if is_local_path(tasks_dir) else "uri"))
        for key in ("base", "tokenizer"):
            if location := getattr(self.model, key):
                out.append((f"model.{key}", location, model_location_kind(location)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


_NUL = "contains a NUL character (\\x00), which no path, name or text may hold"


def _forbidden_keys(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """Keys a spec may never hold, and NUL characters anywhere (no file name, URL or database text has one:
    PostgreSQL refuses them, the OS cuts a path at them)."""
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                yield path or "(document)", f"a key {_NUL}"
            elif str(key).lower() in _FORBIDDEN_KEYS:
                yield sub, _FORBIDDEN_KEYS[str(key).lower()]
            else:
                yield from _forbidden_keys(value, sub)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _forbidden_keys(item, f"{path}[{i}]")
    elif isinstance(node, str) and "\x00" in node:
        yield path, _NUL


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in METHOD_TYPES and out.endswith("method"):
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
            if named := _FIELD_PREFIX.match(msg):  # a check on a whole model, naming the field it is about
                where = f"{where}.{named.group(1)}" if where else named.group(1)
                msg = named.group(2)
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


class BoundedYamlLoader(yaml.SafeLoader):
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
        data = (
            json.loads(text) if text.lstrip().startswith("{") else yaml.load(text, Loader=BoundedYamlLoader)
        )
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
    lm_eval = spec.eval.lm_eval
    if lm_eval is not None and is_local_path(lm_eval.tasks_dir):
        lm_eval = lm_eval.model_copy(update={"tasks_dir": resolve(lm_eval.tasks_dir)})
    ev = spec.eval.model_copy(
        update={"zero_shot_sources": [fix_source(s) for s in spec.eval.zero_shot_sources], "lm_eval": lm_eval}
    )
    return spec.model_copy(
        update={"model": spec.model.model_copy(update=model_update), "data": data, "eval": ev}
    )


def json_schema() -> dict[str, Any]:
    schema = TuningSpec.model_json_schema(by_alias=True)
    schema["$id"] = "https://tuneplane.dev/schemas/tuning-spec-v1.json"
    schema["title"] = "Tuneplane tuning spec (tuneplane/v1)"
    return schema
