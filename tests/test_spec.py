from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneplane.errors import SpecError
from tuneplane.spec import (
    TuningSpec,
    json_schema,
    load_spec,
    model_location_kind,
    parse_spec,
    parse_spec_text,
    spec_hash,
)

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {
    "name": "demo",
    "model": {"base": "s3://models/llama"},
    "data": {"sources": [{"uri": "s3://data/a.jsonl", "format": "alpaca"}]},
}


def _with(**changes) -> dict:
    spec = json.loads(json.dumps(MINIMAL))
    for dotted, value in changes.items():
        node = spec
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return spec


def _problems(data) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return dict(info.value.problems)


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name
    assert spec.data.sources


def test_defaults_are_lora_zero2_and_prompt_masking() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.method.type == "lora"
    assert spec.distributed.zero_stage == 2
    assert spec.data.train_on_inputs is False
    assert spec.data.packing is True


def test_unknown_field_is_rejected_with_its_path() -> None:
    problems = _problems(_with(data__sources=[{"uri": "a.jsonl", "format": "alpaca", "wieght": 2}]))
    assert problems == {"data.sources[0].wieght": "unknown field"}


def test_wrong_enum_names_the_field() -> None:
    problems = _problems(_with(data__sources=[{"uri": "a.jsonl", "format": "csv"}]))
    assert list(problems) == ["data.sources[0].format"]
    assert "alpaca" in problems["data.sources[0].format"]


def test_method_errors_name_the_method_field_not_the_union_tag() -> None:
    problems = _problems(_with(method={"type": "lora", "r": 0}))
    assert list(problems) == ["method.r"]
    problems = _problems(_with(method={"type": "partial"}))
    assert list(problems) == ["method.last_n_layers"]


@pytest.mark.parametrize("key", ["command", "entrypoint", "env", "secret", "password"])
def test_commands_env_and_secrets_are_refused_anywhere(key: str) -> None:
    problems = _problems(_with(distributed={"num_workers": 2, key: "rm -rf /"}))
    assert list(problems) == [f"distributed.{key}"]
    assert "platform" in problems[f"distributed.{key}"] or "secret" in problems[f"distributed.{key}"].lower()


@pytest.mark.parametrize(
    "uri",
    ["s3://AKIAXXXX:secret@bucket/a.jsonl", "https://acct.blob.core.windows.net/c/a.jsonl?sv=2020&sig=abc"],
)
def test_credentials_in_uris_are_refused(uri: str) -> None:
    problems = _problems(_with(data__sources=[{"uri": uri, "format": "alpaca"}]))
    assert "data.sources[0].uri" in problems


def test_cross_field_rules() -> None:
    assert "distributed" in _problems(_with(distributed={"zero_stage": 2, "offload_params": True}))
    problems = _problems(_with(data__sources=[{"uri": "a.jsonl", "format": "labeled"}]))
    assert "templates" in problems["data.sources[0]"]
    assert "name" in _problems(_with(name="Bad_Name"))
    assert "distributed.memory_per_worker" in _problems(_with(distributed={"memory_per_worker": "lots"}))


@pytest.mark.parametrize(
    ("distributed", "refused"),
    [
        ({"num_workers": 4, "min_workers": 2}, None),
        ({"num_workers": 4, "min_workers": 5}, "must not exceed num_workers"),
        ({"num_workers": 4, "min_workers": 2, "zero_stage": 0}, "needs zero_stage 1, 2 or 3"),
    ],
)
def test_elastic_bounds(distributed: dict, refused: str | None) -> None:
    if refused is None:
        assert parse_spec(_with(distributed=distributed)).distributed.elastic
    else:
        assert refused in _problems(_with(distributed=distributed))["distributed"]


def test_an_elastic_single_rank_keeps_its_zero_stage() -> None:
    from tuneplane.spec import DistributedSpec, effective_zero_stage

    assert effective_zero_stage(DistributedSpec(num_workers=4, zero_stage=2), 1) == 0
    assert effective_zero_stage(DistributedSpec(num_workers=4, min_workers=1, zero_stage=2), 1) == 2


def test_bad_template_placeholder_is_named() -> None:
    source = {
        "uri": "a.jsonl",
        "format": "labeled",
        "templates": [{"prompt": "{a b}", "response": "{label}"}],
    }
    problems = _problems(_with(data__sources=[source]))
    assert list(problems) == ["data.sources[0].templates[0].prompt"]


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(SpecError, match=r"^job.yaml: line 3: invalid YAML"):
        parse_spec_text("name: x\nmodel:\n  base: : :\n  dtype: x\n", source="job.yaml")


def test_non_mapping_document() -> None:
    with pytest.raises(SpecError, match="mapping"):
        parse_spec_text("- a\n- b\n")


def test_relative_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "j.yaml"
    path.write_text(
        "name: j\nmodel: {base: ../models/tiny}\n"
        "data: {sources: [{uri: data/*.jsonl, format: alpaca}, {uri: 's3://b/x.jsonl', format: alpaca}]}\n"
    )
    spec = load_spec(path)
    assert spec.model.base == str(tmp_path / "models" / "tiny")
    assert spec.data.sources[0].uri == str(tmp_path / "jobs" / "data" / "*.jsonl")
    assert spec.data.sources[1].uri == "s3://b/x.jsonl"
    hub = parse_spec_text(
        "name: j\nmodel: {base: meta-llama/Llama-3.1-8B}\ndata: {sources: [{uri: a.jsonl, format: alpaca}]}",
        base_dir=tmp_path,
    )
    assert hub.model.base == "meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize(
    ("location", "kind"),
    [
        ("meta-llama/Llama-3.1-8B", "hub"),
        ("gpt2", "hub"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "hub"),
        ("/models/tiny", "path"),
        ("./tiny", "path"),
        ("../models/tiny", "path"),
        ("~/models/tiny", "path"),
        (".cache/x", "path"),  # hub ids never start with a dot
        ("models/llama/8b", "path"),  # hub ids have at most one '/'
        (".", "path"),
        ("s3://bucket/models/tiny", "uri"),
        ("gs://bucket/tiny", "uri"),
        ("file:///models/tiny", "uri"),
    ],
)
def test_model_location_kind(location: str, kind: str) -> None:
    assert model_location_kind(location) == kind


def test_only_model_paths_are_resolved_and_absolute_ones_are_kept(tmp_path: Path) -> None:
    text = (
        "name: j\nmodel: {base: .cache/tiny, tokenizer: org/tok}\n"
        "data: {sources: [{uri: /abs/../x.jsonl, format: alpaca}]}"
    )
    spec = parse_spec_text(text, base_dir=tmp_path)
    assert spec.model.base == str(tmp_path / ".cache" / "tiny") and spec.model.base_kind == "path"
    assert spec.model.tokenizer == "org/tok"
    assert spec.data.sources[0].uri == "/abs/../x.jsonl"  # as written: a stored spec comes back unchanged


def test_spec_hash_is_full_sha256_and_survives_a_round_trip_through_a_file(tmp_path: Path) -> None:
    import yaml

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    digest = spec_hash(spec)
    assert len(digest) == 64 and int(digest, 16) >= 0
    # What a backend does: write the stored spec to a file the training entrypoint loads again.
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    assert spec_hash(load_spec(tmp_path / "spec.yaml")) == digest
    assert spec_hash(spec.model_copy(update={"name": "other"})) != digest


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_json_schema_exports_and_forbids_extras() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert {"name", "model", "data", "method", "distributed", "hyperparameters"} <= set(schema["properties"])
    json.dumps(schema)  # serialisable


def test_round_trip() -> None:
    spec = load_spec(REPO / "jobs" / "llama3-70b-lora-zero3.yaml")
    assert TuningSpec.model_validate(spec.to_dict()) == spec


_TASK = {"uri": "s3://data/arith.jsonl", "format": "alpaca", "name": "arith"}


@pytest.mark.parametrize(
    ("evaluation", "where", "says"),
    [
        (
            {"gate": {"tasks": {"nope": {"min": 0.5}}}},
            "eval.gate.tasks.nope",
            "no zero-shot source or lm_eval task",
        ),
        ({"gate": {"keep": {"other": 0.1}}}, "eval.gate.keep.other", "known: arith"),
        ({"gate": {"tasks": {"arith": {}}}}, "eval.gate.tasks.arith", "give `min`, `min_gain` or both"),
        ({"gate": {"keep": {"arith": 2}}}, "eval.gate.keep.arith", "less than or equal to 1"),
    ],
)
def test_gate_conditions_name_known_tasks(evaluation: dict, where: str, says: str) -> None:
    problems = _problems(_with(eval={"zero_shot_sources": [_TASK], **evaluation}))
    assert says in problems[where], problems


def test_gate_may_name_zero_shot_and_lm_eval_tasks() -> None:
    spec = parse_spec(
        _with(
            eval={
                "zero_shot_sources": [_TASK],
                "lm_eval": {"tasks_dir": "s3://evals/tasks", "tasks": ["tiny_qa"]},
                "gate": {
                    "eval_loss_improves": True,
                    "tasks": {"tiny_qa": {"min_gain": 0.1}},
                    "keep": {"arith": 0.02},
                },
            }
        )
    )
    assert spec.eval.task_names() == {"arith", "tiny_qa"}
    assert spec.eval.gate is not None and spec.eval.gate.keep == {"arith": 0.02}


def test_data_quality_fields() -> None:
    spec = parse_spec(_with(data__dedup="near", data__decontaminate=True))
    assert (spec.data.dedup, spec.data.near_dup_threshold, spec.data.contamination_ngram) == ("near", 0.8, 13)
    assert "data.dedup" in _problems(_with(data__dedup="fuzzy"))
    assert "data.near_dup_threshold" in _problems(_with(data__near_dup_threshold=0.2))


def test_preference_pairs_and_preference_methods_go_together() -> None:
    pairs = _with(data__sources=[{"uri": "s3://data/prefs.jsonl", "format": "preference"}])
    assert "method.type lora trains on instruction records" in _problems(pairs)["data.sources[0].format"]
    dpo = parse_spec(pairs | {"method": {"type": "dpo", "beta": 0.2, "lora": {"r": 4}}})
    assert dpo.method.type == "dpo" and dpo.method.lora.r == 4
    assert (
        "trains on 'preference' pairs" in _problems(_with(method={"type": "orpo"}))["data.sources[0].format"]
    )
    full = parse_spec(pairs | {"method": {"type": "dpo", "base": "full"}})  # its reference: a frozen copy
    assert full.method.type == "dpo" and full.method.base == "full"
    assert "method.beta" in _problems(pairs | {"method": {"type": "dpo", "beta": 0}})


def test_weights_trained_is_the_one_answer_for_every_method() -> None:
    from tuneplane.spec import DpoMethod, FullMethod, LoraMethod, OrpoMethod

    lora = LoraMethod(r=4)
    assert lora.trained_weights() is lora
    assert DpoMethod(lora=lora).trained_weights() is lora
    assert isinstance(OrpoMethod(base="full").trained_weights(), FullMethod)
