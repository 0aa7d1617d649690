"""Prompt masking: for every record format and every template, the trained tokens decode to exactly the responses."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneplane.data.formats import to_conversation
from tuneplane.data.packing import collate
from tuneplane.data.stream import InstructionStream
from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer, render
from tuneplane.errors import FormatError
from tuneplane.spec import DataSpec, InstructionTemplate, SourceSpec

TEMPLATES = ["alpaca", "flan", "chatml", "llama3", "tokenizer"]

RECORDS = {
    "alpaca": {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    "prompt_completion": {"prompt": "2 + 2 =", "completion": " 4"},
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Sort: cab"},
            {"role": "assistant", "content": "abc"},
        ]
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Uppercase: dog"}, {"from": "gpt", "value": "DOG"}]
    },
    "labeled": {"number": 7, "label": "odd"},
}


def _source(fmt: str) -> SourceSpec:
    templates = [InstructionTemplate(prompt="Is {number} even or odd?")] if fmt == "labeled" else []
    return SourceSpec(uri="mem.jsonl", format=fmt, templates=templates)


def _trained_text(tokenizer, segments) -> tuple[str, np.ndarray, np.ndarray]:
    ids, labels = SegmentTokenizer(tokenizer).encode([segments])[0]
    trained = ids[labels != IGNORE_INDEX]
    return tokenizer.decode(trained.tolist(), skip_special_tokens=True), ids, labels


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_trained_tokens_decode_to_exactly_the_responses(tokenizer, fmt: str, template: str) -> None:
    conversation = to_conversation(RECORDS[fmt], _source(fmt), "mem.jsonl:1", seed=0)
    text, _ids, labels = _trained_text(tokenizer, render(conversation, template, tokenizer))
    assert text == "".join(conversation.responses)
    # The end-of-turn token is trained (the model must learn to stop), and the prompt is not.
    assert labels[-1] != IGNORE_INDEX or template in {"alpaca", "flan", "tokenizer"}
    assert (labels == IGNORE_INDEX).sum() > 0


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_response_ends_with_a_trained_end_of_turn_token(tokenizer, template: str) -> None:
    conversation = to_conversation(RECORDS["messages"], _source("messages"), "k:1", seed=0)
    _, ids, labels = _trained_text(tokenizer, render(conversation, template, tokenizer))
    special = set(tokenizer.all_special_ids)
    trained_special = [
        int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX and i in special
    ]
    assert len(trained_special) == 2  # one per assistant turn


def test_record_text_cannot_inject_special_tokens(tokenizer) -> None:
    record = {"instruction": "Say <|im_end|><|end_of_text|>", "output": "ok <|eot_id|>"}
    conversation = to_conversation(record, _source("alpaca"), "k:1", seed=0)
    ids, labels = SegmentTokenizer(tokenizer).encode([render(conversation, "chatml", tokenizer)])[0]
    special = set(tokenizer.all_special_ids)
    # Only the template's scaffolding yields special ids: 2 per turn start/end here, none from the record text.
    assert sum(int(i) in special for i in ids) == 4
    assert tokenizer.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True) == "ok <|eot_id|>"


def test_train_on_inputs_trains_everything_but_the_first_token(tokenizer, tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "Reverse.", "input": "abc", "output": "cba"}\n')
    spec = DataSpec(sources=[SourceSpec(uri=str(path), format="alpaca")], train_on_inputs=True, packing=False)
    batch = next(iter(InstructionStream(spec, tokenizer)))
    assert batch.labels[0, 0] == IGNORE_INDEX
    assert (batch.labels[0, 1:] == batch.input_ids[0, 1:]).all()


@pytest.mark.parametrize(
    ("fmt", "record", "message"),
    [
        ("alpaca", {"instruction": "x"}, "missing field 'output'"),
        ("alpaca", {"instruction": "x", "output": "  "}, "field 'output' is empty"),
        ("alpaca", {"instruction": "x", "output": 3}, "field 'output' must be a string, got int"),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}]},
            "must end with an assistant response",
        ),
        (
            "messages",
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role: unknown role 'robot'",
        ),
        ("messages", {"messages": "hi"}, "must be a non-empty list"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
            "empty response",
        ),
        ("messages", {"messages": [{"role": "assistant", "content": "a"}]}, "turn 1 should be 'user'"),
        ("labeled", {"label": "odd"}, "missing field 'number' used by the template"),
    ],
)
def test_malformed_records_name_the_field(fmt: str, record: dict, message: str) -> None:
    with pytest.raises(FormatError) as info:
        to_conversation(record, _source(fmt), "k:1", seed=0)
    assert message in str(info.value)


def test_field_mapping(tokenizer) -> None:
    source = SourceSpec(
        uri="m.jsonl", format="alpaca", fields={"instruction": "question", "output": "answer"}
    )
    conversation = to_conversation({"question": "Q?", "answer": "A."}, source, "k:1", seed=0)
    assert conversation.responses == ["A."]


def test_flan_templates_are_drawn_per_record_deterministically() -> None:
    templates = [InstructionTemplate(prompt=p) for p in ("A {x}", "B {x}", "C {x}")]
    source = SourceSpec(uri="m.jsonl", format="labeled", templates=templates)
    prompts = [
        to_conversation({"x": 1, "label": "y"}, source, f"k:{i}", seed=3).messages[0].content
        for i in range(60)
    ]
    assert {p[0] for p in prompts} == {"A", "B", "C"}  # all templates used
    again = [
        to_conversation({"x": 1, "label": "y"}, source, f"k:{i}", seed=3).messages[0].content
        for i in range(60)
    ]
    assert prompts == again


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    str.strip
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(text, text), min_size=1, max_size=3), template=st.sampled_from(TEMPLATES))
def test_masking_property_any_text(tokenizer, turns, template) -> None:
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    conversation = to_conversation({"messages": messages}, _source("messages"), "k:1", seed=0)
    segments = render(conversation, template, tokenizer)
    decoded, ids, labels = _trained_text(tokenizer, segments)
    assert decoded == "".join(conversation.responses)
    # Collated (first token masked, padding ignored) keeps every response token trained.
    batch = collate([[_example(ids, labels)]], pad_id=0, packed=False, length=len(ids) + 3)
    assert (batch.labels[0, len(ids) :] == IGNORE_INDEX).all()


def _example(ids, labels):
    from tuneplane.data.packing import Example

    return Example("k:1", 0, ids, labels)
