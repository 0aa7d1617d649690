"""Preference pairs (prompt, chosen, rejected): format, masking, pair batches, exact resume, preflight."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.config import REPO
from tuneplane.data import preflight
from tuneplane.data.formats import to_preference
from tuneplane.data.preference import PairBatch, PreferenceStream
from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer, render_pair
from tuneplane.errors import DataError
from tuneplane.spec import DataSpec, SourceSpec, load_spec

TEMPLATES = ["alpaca", "flan", "chatml", "llama3", "tokenizer"]

CONTEXT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Reply to: apple"},
    {"role": "assistant", "content": "Certainly! apple"},
    {"role": "user", "content": "Reply to: stone cloud"},
]
RECORDS = {
    "prompt": {"prompt": "Reply to: river", "chosen": "Certainly! river", "rejected": "No. river"},
    "messages": {
        "messages": CONTEXT,
        "chosen": {"role": "assistant", "content": "Of course! stone cloud"},
        "rejected": "No. stone cloud",
    },
}


def _write(path: Path, rows: list[dict]) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs(n: int, tag: str = "w") -> list[dict]:
    return [
        {
            "prompt": f"Reply to: {tag} {i}",
            "chosen": f"Certainly! {tag} {i}" + " yes" * (i % 5),
            "rejected": f"No. {tag} {i}",
        }
        for i in range(n)
    ]


def _spec(*sources: SourceSpec, **kw) -> DataSpec:
    return DataSpec(sources=list(sources), max_seq_len=kw.pop("max_seq_len", 128), **kw)


def _source(uri: str, **kw) -> SourceSpec:
    return SourceSpec(uri=uri, format="preference", **kw)


def _trained(tokenizer, ids: np.ndarray, labels: np.ndarray) -> str:
    return tokenizer.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_only_the_final_responses_are_trained(tokenizer, template, kind) -> None:
    pair = to_preference(RECORDS[kind], _source("m.jsonl"), "m.jsonl:1", seed=0)
    prompt, chosen, rejected = SegmentTokenizer(tokenizer).encode(render_pair(pair, template, tokenizer))
    assert (prompt[1] == IGNORE_INDEX).all()  # the context's own assistant turn is masked too
    assert _trained(tokenizer, *chosen) == pair.chosen
    assert _trained(tokenizer, *rejected) == pair.rejected
    # The prompt renders the same whichever side follows it: prompt + side is what `render` makes of that side.
    assert len(prompt[0]) > 0


def test_the_same_through_a_file_for_every_template(tokenizer, tmp_path) -> None:
    uri = _write(tmp_path / "p.jsonl", [RECORDS["prompt"], RECORDS["messages"]])
    for template in TEMPLATES:
        batch = next(
            iter(PreferenceStream(_spec(_source(uri), template=template), tokenizer, micro_batch_size=2))
        )
        assert batch.num_pairs == 2
        for row in range(2):
            chosen, rejected = row, row + 2
            ids, labels = batch.input_ids, batch.labels
            cut = int(np.argmax(labels[chosen] != IGNORE_INDEX))
            assert cut == int(np.argmax(labels[rejected] != IGNORE_INDEX))
            assert (ids[chosen, :cut] == ids[rejected, :cut]).all()
            record = [RECORDS["prompt"], RECORDS["messages"]][row]
            want = record["chosen"]["content"] if isinstance(record["chosen"], dict) else record["chosen"]
            assert _trained(tokenizer, ids[chosen], labels[chosen]) == want
            assert _trained(tokenizer, ids[rejected], labels[rejected]) == record["rejected"]
            # Padding is never attended to nor trained on.
            pad = batch.attention_mask[rejected] == 0
            assert (labels[rejected][pad] == IGNORE_INDEX).all()


BAD = [
    ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are identical"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "field 'chosen' is empty"),
    (
        {"prompt": "p", "chosen": {"role": "assistant", "content": ""}, "rejected": "r"},
        "'chosen.content' is empty",
    ),
    ({"prompt": "p", "chosen": {"role": "user", "content": "c"}, "rejected": "r"}, "expected 'assistant'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "must be a string or an assistant message, got int"),
    ({"chosen": "c", "rejected": "r"}, "missing field 'prompt' (or 'messages')"),
    ({"messages": CONTEXT[:3], "chosen": "c", "rejected": "r"}, "must end with a user turn"),
    (
        {"messages": [{"role": "robot", "content": "x"}], "chosen": "c", "rejected": "r"},
        "unknown role 'robot'",
    ),
    ({"messages": [], "chosen": "c", "rejected": "r"}, "must be a non-empty list"),
]


def test_each_bad_record_is_reported_as_uri_line(tokenizer, tmp_path) -> None:
    rows = [row for bad, _ in BAD for row in (_pairs(1)[0], bad)]
    uri = _write(tmp_path / "bad.jsonl", rows)
    stream = PreferenceStream(_spec(_source(uri, on_error="skip", max_error_fraction=0.5)), tokenizer)
    keys = [k for b in stream for row in b.keys for k in row]
    assert len(keys) == 2 * len(BAD)  # each good pair, twice (chosen and rejected rows)
    samples = stream.stats[0].error_samples
    assert len(samples) == len(BAD)
    for n, ((_, message), sample) in enumerate(zip(BAD, samples, strict=True)):
        assert sample.startswith(f"{uri}:{2 * n + 2}: ")
        assert message in sample


def test_on_error_fail_names_the_record(tokenizer, tmp_path) -> None:
    uri = _write(tmp_path / "bad.jsonl", [*_pairs(2), {"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError) as info:
        list(PreferenceStream(_spec(_source(uri)), tokenizer))
    assert str(info.value).startswith(f"{uri}:3: ") and "identical" in str(info.value)


def test_a_pair_stays_in_one_micro_batch(tokenizer, tmp_path) -> None:
    uri = _write(tmp_path / "p.jsonl", _pairs(10))
    batches = list(PreferenceStream(_spec(_source(uri)), tokenizer, micro_batch_size=3))
    assert [b.num_pairs for b in batches] == [3, 3, 3, 1]
    for b in batches:
        assert isinstance(b, PairBatch)
        n = b.num_pairs
        assert b.keys[:n] == b.keys[n:]  # rows [chosen_1..chosen_n, rejected_1..rejected_n]
        assert b.input_ids.shape[0] == 2 * n and b.attention_mask is not None
        lengths = b.attention_mask.sum(1)
        assert b.input_ids.shape[1] == lengths.max()  # padded to the longest, no packing
        assert (b.position_ids[:, : lengths.min()] == np.arange(lengths.min())).all()
    seen = [row[0] for b in batches for row in b.keys[: b.num_pairs]]
    assert sorted(seen) == sorted(f"{uri}:{i}" for i in range(1, 11))


def _run(spec: DataSpec, tokenizer, **kw) -> list[list[list[str]]]:
    return [b.keys for b in PreferenceStream(spec, tokenizer, **kw)]


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_resume_over_two_ranks_neither_repeats_nor_skips(tokenizer, tmp_path, cut) -> None:
    big = _write(tmp_path / "big.jsonl", _pairs(70, "big"))
    small = _write(tmp_path / "small.jsonl", _pairs(15, "small"))
    spec = _spec(_source(big, weight=3), _source(small))
    everything: list[str] = []
    for rank in range(2):
        kw = {"rank": rank, "world_size": 2, "micro_batch_size": 2, "seed": 5, "chunk_size": 8}
        uninterrupted = _run(spec, tokenizer, **kw)
        first = PreferenceStream(spec, tokenizer, **kw)
        it = iter(first)
        before = [next(it).keys for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain JSON
        after = _run(spec, tokenizer, state=state, **kw)
        assert before + after == uninterrupted
        everything += [row[0] for keys in uninterrupted for row in keys[: len(keys) // 2]]
    big_keys = [k for k in everything if "big.jsonl" in k]
    assert sorted(big_keys) == sorted(f"{big}:{i}" for i in range(1, 71))  # every pair on exactly one rank


def test_epochs_and_exhaustion(tokenizer, tmp_path) -> None:
    uri = _write(tmp_path / "p.jsonl", _pairs(6))
    stream = PreferenceStream(_spec(_source(uri)), tokenizer, micro_batch_size=4)
    first = _run_keys(stream)
    assert stream.exhausted and _run_keys(stream) == []
    stream.next_epoch()
    assert sorted(_run_keys(stream)) == sorted(first) and stream.epoch == 1


def _run_keys(stream: PreferenceStream) -> list[str]:
    return [row[0] for b in stream for row in b.keys[: b.num_pairs]]


def test_field_renames(tokenizer, tmp_path) -> None:
    rows = [
        {"question": "Reply to: a", "good": "Certainly! a", "bad": "No. a"},
        {"turns": [{"role": "user", "content": "Reply to: b"}], "good": "Certainly! b", "bad": "No. b"},
    ]
    uri = _write(tmp_path / "r.jsonl", rows)
    fields = {"prompt": "question", "messages": "turns", "chosen": "good", "rejected": "bad"}
    batch = next(iter(PreferenceStream(_spec(_source(uri, fields=fields)), tokenizer, micro_batch_size=2)))
    texts = [_trained(tokenizer, batch.input_ids[r], batch.labels[r]) for r in range(4)]
    assert texts == ["Certainly! a", "Certainly! b", "No. a", "No. b"]
    with pytest.raises(DataError, match="missing field 'good'"):
        list(
            PreferenceStream(
                _spec(_source(_write(tmp_path / "x.jsonl", [{"question": "q", "bad": "b"}]), fields=fields)),
                tokenizer,
            )
        )


def test_parquet_and_gzip_read_like_jsonl(tokenizer, tmp_path) -> None:
    rows = _pairs(9)
    plain = _write(tmp_path / "p.jsonl", rows)
    gz = _write(tmp_path / "p.jsonl.gz", rows)
    parquet = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=4)
    outputs = []
    for uri in (plain, gz, parquet):
        batches = list(PreferenceStream(_spec(_source(uri)), tokenizer, micro_batch_size=4))
        outputs.append(
            (
                [k[0].rsplit(":", 1)[1] for b in batches for k in b.keys],
                [b.input_ids.tolist() for b in batches],
            )
        )
    assert outputs[0] == outputs[1] == outputs[2]


def test_long_responses_are_cut_and_prompts_too_long_dropped(tokenizer, tmp_path) -> None:
    rows = [
        {"prompt": "short", "chosen": "Certainly! " + "yes " * 200, "rejected": "No."},
        {"prompt": "word " * 200, "chosen": "Certainly!", "rejected": "No."},
        {"prompt": "fine", "chosen": "Certainly!", "rejected": "No."},
    ]
    uri = _write(tmp_path / "l.jsonl", rows)
    stream = PreferenceStream(_spec(_source(uri), max_seq_len=48), tokenizer, micro_batch_size=4)
    batch = next(iter(stream))
    assert batch.num_pairs == 2 and batch.input_ids.shape[1] == 48
    stats = stream.stats[0]
    assert (stats.examples, stats.truncated, stats.dropped_no_response) == (2, 2, 1)
    # The cut pair still has its whole prompt on both sides, then the start of each response.
    assert _trained(tokenizer, batch.input_ids[2], batch.labels[2]) == "No."


def test_shipped_pairs_are_clean_and_follow_the_rule(tokenizer) -> None:
    for name, count in (("prefs-tone.jsonl", 600), ("prefs-tone-eval.jsonl", 100)):
        uri = str(REPO / "jobs" / "data" / name)
        stream = PreferenceStream(_spec(_source(uri)), tokenizer, micro_batch_size=50)
        batches = list(stream)
        assert stream.stats[0].errors == 0 and stream.stats[0].examples == count
        b = batches[0]
        for r in range(b.num_pairs):
            chosen = _trained(tokenizer, b.input_ids[r], b.labels[r])
            rejected = _trained(tokenizer, b.input_ids[r + b.num_pairs], b.labels[r + b.num_pairs])
            assert chosen.startswith(("Certainly!", "Of course!")) and not rejected.startswith(
                ("Certainly", "Of")
            )


def test_preflight_reports_both_sides_and_a_pair_sample(tokenizer, tmp_path, capsys) -> None:
    uri = _write(tmp_path / "p.jsonl", [*_pairs(20), {"prompt": "p", "chosen": "x"}])
    base = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    # The spec refuses preference sources until DPO lands; the data preflight itself does not care.
    data = base.data.model_copy(
        update={"sources": [_source(uri, on_error="skip", max_error_fraction=0.2)], "eval_sources": []}
    )
    spec = base.model_copy(
        update={"data": data, "eval": base.eval.model_copy(update={"zero_shot_sources": []})}
    )
    report = preflight(spec, tokenizer, quality=False)
    entry = report.to_dict()["sources"][0]
    assert entry["pairs"] == 20 and entry["bad_records"] == 1
    assert entry["bad_record_samples"][0].startswith(f"{uri}:21: missing field 'rejected'")
    assert entry["chosen_length_mean"] > entry["rejected_length_mean"] > 0
    assert sum(entry["rejected_length_histogram"].values()) == 20
    sample = report.sources[0].pair_samples[0]
    assert not any(s.trained for s in sample.prompt) and "Reply to: w 0" in "".join(
        s.text for s in sample.prompt
    )
    assert "".join(s.text for s in sample.chosen if s.trained).startswith("Certainly! w 0")
    assert "".join(s.text for s in sample.rejected if s.trained).startswith("No. w 0")

    from tuneplane.cli.local import _print_report

    _print_report(report)
    out = capsys.readouterr().out
    assert "preference pair from p" in out and "[rejected]" in out and "rejected token lengths" in out
