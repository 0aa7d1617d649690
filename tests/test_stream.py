"""The per-rank stream: disjoint deterministic sharding, exact resume, weighted mixing, holdout, error policy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tuneplane.data import DataError, InstructionStream
from tuneplane.spec import DataSpec, SourceSpec

ALL = "all"


def _write_shards(folder: Path, name: str, files: int, per_file: int, tag: str = "t") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with (folder / f"{name}-{f}.jsonl").open("w") as fh:
            for i in range(per_file):
                fh.write(
                    json.dumps({"instruction": f"{tag} {f} {i}", "output": "x" * (1 + (i * 7 + f) % 23)})
                    + "\n"
                )
    return str(folder / f"{name}-*.jsonl")


def _spec(*sources: SourceSpec, **kw) -> DataSpec:
    return DataSpec(
        sources=list(sources),
        max_seq_len=kw.pop("max_seq_len", 128),
        pack_buffer=kw.pop("pack_buffer", 32),
        **kw,
    )


def _keys(stream: InstructionStream) -> list[str]:
    return [k for batch in stream for row in batch.keys for k in row]


@pytest.mark.parametrize(("files", "world"), [(3, 2), (4, 2), (4, 4), (1, 3)])
def test_ranks_are_disjoint_and_together_cover_every_record(tokenizer, tmp_path, files, world) -> None:
    uri = _write_shards(tmp_path, "d", files, 37)
    spec = _spec(SourceSpec(uri=uri, format="alpaca"))
    per_rank = [
        _keys(InstructionStream(spec, tokenizer, rank=r, world_size=world, micro_batch_size=2))
        for r in range(world)
    ]
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) == files * 37
    # Balanced: no rank gets more than its fair share plus one file's worth.
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 37


def test_same_seed_same_order_other_seed_other_order(tokenizer, tmp_path) -> None:
    uri = _write_shards(tmp_path, "d", 4, 30)
    spec = _spec(SourceSpec(uri=uri, format="alpaca"))
    a = _keys(InstructionStream(spec, tokenizer, seed=1))
    assert a == _keys(InstructionStream(spec, tokenizer, seed=1))
    assert a != _keys(InstructionStream(spec, tokenizer, seed=2))


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("cut", [1, 5, 13])
def test_resume_from_state_neither_repeats_nor_skips(tokenizer, tmp_path, packing, cut) -> None:
    big = _write_shards(tmp_path / "a", "big", 3, 60, tag="big")
    small = _write_shards(tmp_path / "b", "small", 1, 25, tag="small")
    spec = _spec(
        SourceSpec(uri=big, format="alpaca", weight=3),
        SourceSpec(uri=small, format="alpaca"),
        packing=packing,
    )
    kwargs = {"rank": 1, "world_size": 2, "micro_batch_size": 3, "seed": 5}

    uninterrupted = [b.keys for b in InstructionStream(spec, tokenizer, **kwargs)]

    first = InstructionStream(spec, tokenizer, **kwargs)
    it = iter(first)
    before = [next(it).keys for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain JSON
    del first, it
    after = [b.keys for b in InstructionStream(spec, tokenizer, state=state, **kwargs)]

    assert before + after == uninterrupted
    # Within one epoch the big source is read exactly once: no example repeated, none skipped.
    flat = [k for rows in before + after for row in rows for k in row if "big-" in k]
    assert len(flat) == len(set(flat)) == 90


def test_epochs_continue_and_state_carries_the_epoch(tokenizer, tmp_path) -> None:
    uri = _write_shards(tmp_path, "d", 1, 20)
    spec = _spec(SourceSpec(uri=uri, format="alpaca"))
    stream = InstructionStream(spec, tokenizer, micro_batch_size=4)
    epoch0 = _keys(stream)
    assert stream.exhausted and _keys(stream) == []  # the next epoch starts only when asked
    state = json.loads(json.dumps(stream.state_dict()))  # e.g. a checkpoint while other ranks still train
    resumed = InstructionStream(spec, tokenizer, micro_batch_size=4, state=state)
    assert resumed.exhausted and _keys(resumed) == [] and resumed.epoch == 0
    resumed.next_epoch()
    epoch1 = _keys(resumed)
    assert resumed.epoch == 1
    assert sorted(epoch0) == sorted(epoch1) and len(epoch0) == 20


def test_weighted_mixing_follows_the_weights(tokenizer, tmp_path) -> None:
    main = _write_shards(tmp_path / "m", "main", 1, 900, tag="main")
    cot = _write_shards(tmp_path / "c", "cot", 1, 40, tag="cot")
    spec = _spec(
        SourceSpec(uri=main, format="alpaca", weight=9), SourceSpec(uri=cot, format="alpaca", weight=1)
    )
    keys = _keys(InstructionStream(spec, tokenizer, micro_batch_size=8))
    counts = Counter("cot" if "cot-" in k else "main" for k in keys)
    # The epoch ends when the main source is read through; the small CoT set is repeated to keep its ~10% share.
    assert counts["main"] == 900
    assert 0.07 < counts["cot"] / len(keys) < 0.13
    assert counts["cot"] > 40


def test_holdout_split_is_disjoint_and_stable(tokenizer, tmp_path) -> None:
    uri = _write_shards(tmp_path, "d", 2, 200)
    spec = _spec(SourceSpec(uri=uri, format="alpaca"), holdout_fraction=0.1)
    train = set(_keys(InstructionStream(spec, tokenizer)))
    held = set(_keys(InstructionStream(spec, tokenizer, split="eval")))
    assert not train & held
    assert len(train | held) == 400
    assert 20 <= len(held) <= 60


def test_eval_without_eval_data_is_a_clear_error(tokenizer, tmp_path) -> None:
    spec = _spec(SourceSpec(uri=_write_shards(tmp_path, "d", 1, 3), format="alpaca"))
    with pytest.raises(ValueError, match="no eval data"):
        InstructionStream(spec, tokenizer, split="eval")


def _with_bad_lines(tmp_path: Path, good: int, bad_every: int) -> str:
    path = tmp_path / "mixed.jsonl"
    with path.open("w") as fh:
        for i in range(good):
            fh.write(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n")
            if i % bad_every == 0:
                fh.write('{"instruction": "no output"}\n')
    return str(path)


def test_on_error_fail_stops_at_the_first_bad_record_naming_it(tokenizer, tmp_path) -> None:
    uri = _with_bad_lines(tmp_path, 10, 100)
    with pytest.raises(DataError) as info:
        _keys(InstructionStream(_spec(SourceSpec(uri=uri, format="alpaca")), tokenizer))
    assert str(info.value).startswith(f"{uri}:2: missing field 'output'")


def test_on_error_skip_reports_and_continues_within_the_fraction(tokenizer, tmp_path) -> None:
    uri = _with_bad_lines(tmp_path, 300, 100)  # 3 bad in 303
    stream = InstructionStream(
        _spec(SourceSpec(uri=uri, format="alpaca", on_error="skip", max_error_fraction=0.02)), tokenizer
    )
    assert len(_keys(stream)) == 300
    assert stream.stats[0].errors == 3
    assert stream.stats[0].error_samples[0] == f"{uri}:2: missing field 'output'"


def test_on_error_skip_stops_past_the_fraction(tokenizer, tmp_path) -> None:
    uri = _with_bad_lines(tmp_path, 300, 10)  # ~9% bad
    stream = InstructionStream(
        _spec(SourceSpec(uri=uri, format="alpaca", on_error="skip", max_error_fraction=0.02)), tokenizer
    )
    with pytest.raises(DataError, match=r"exceed max_error_fraction 0\.02"):
        _keys(stream)


def test_long_examples_are_truncated_and_promptonly_ones_dropped(tokenizer, tmp_path) -> None:
    path = tmp_path / "long.jsonl"
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "long answer", "output": "word " * 400},  # truncated, still has trained tokens
        {"instruction": "prompt " * 400, "output": "lost"},  # the response falls past max_seq_len: dropped
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = InstructionStream(_spec(SourceSpec(uri=str(path), format="alpaca"), max_seq_len=64), tokenizer)
    batches = list(stream)
    assert all(b.input_ids.shape[1] <= 64 for b in batches)
    assert stream.stats[0].truncated == 2
    assert stream.stats[0].dropped_no_response == 1
    assert stream.stats[0].examples == 2


def test_s3_source_streams_like_local(tokenizer, tmp_path, s3_bucket) -> None:
    fs, base = s3_bucket
    local = _write_shards(tmp_path, "d", 2, 25)
    for path in sorted(Path(tmp_path).glob("d-*.jsonl")):
        fs.put_file(str(path), f"{base}/data/{path.name}")
    fs.invalidate_cache()
    kwargs = {"rank": 0, "world_size": 2, "micro_batch_size": 2}
    s3_keys = _keys(
        InstructionStream(
            _spec(SourceSpec(uri=f"{base}/data/d-*.jsonl", format="alpaca")), tokenizer, **kwargs
        )
    )
    local_keys = _keys(InstructionStream(_spec(SourceSpec(uri=local, format="alpaca")), tokenizer, **kwargs))
    assert [k.rsplit("/", 1)[1] for k in s3_keys] == [k.rsplit("/", 1)[1] for k in local_keys]
