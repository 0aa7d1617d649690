"""Elastic data: a checkpoint of N ranks continued on N' ranks trains every example of the epoch exactly once."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from tests.test_stream import _spec, _write_shards
from tuneplane.data import InstructionStream
from tuneplane.data.reshard import reshard
from tuneplane.spec import DataSpec, SourceSpec

SEED, BATCH = 7, 3


def _run(
    spec: DataSpec, tokenizer: Any, world: int, states: list[dict] | None, batches: int | None
) -> tuple[list[str], list[dict]]:
    """Every rank takes `batches` batches (None: to the end of the epoch) from `states`; the keys trained and
    the ranks' states after (as a checkpoint holds them: plain JSON)."""
    keys, after = [], []
    for rank in range(world):
        stream = InstructionStream(
            spec, tokenizer, seed=SEED, rank=rank, world_size=world, micro_batch_size=BATCH,
            state=states[rank] if states else None,
        )  # fmt: skip
        it = iter(stream)
        for _ in range(batches) if batches is not None else iter(int, 1):
            batch = next(it, None)
            if batch is None:
                break
            keys += [k for row in batch.keys for k in row]
        after.append(json.loads(json.dumps(stream.state_dict())))
    return keys, after


def _big(keys: list[str]) -> Counter[str]:
    return Counter(k for k in keys if "big-" in k)


@pytest.mark.parametrize(
    ("files", "worlds", "packing"),
    [
        (4, (4, 2), True),  # whole files per rank before, records striding after
        (3, (2, 3), False),  # striding to striding, padded rows
        (1, (4, 2), True),
        (6, (2, 3), True),  # whole files before and after
        (4, (4, 2, 3), True),  # resized twice: the second handover nests the first
    ],
)
def test_every_example_of_the_epoch_once_after_a_resize(tokenizer, tmp_path, files, worlds, packing) -> None:
    # Large enough that no stage reaches the end of the epoch before the last one.
    big = _write_shards(tmp_path / "a", "big", files, 600 // files, tag="big")
    small = _write_shards(tmp_path / "b", "small", 1, 15, tag="small")  # repeated to keep its weight
    spec = _spec(
        SourceSpec(uri=big, format="alpaca", weight=3),
        SourceSpec(uri=small, format="alpaca"),
        packing=packing,
    )
    uninterrupted, _ = _run(spec, tokenizer, worlds[0], None, None)
    assert (
        _big(uninterrupted) == Counter({k: 1 for k in _big(uninterrupted)})
        and len(_big(uninterrupted)) == 600
    )

    trained, states = _run(spec, tokenizer, worlds[0], None, 4)
    for world in worlds[1:-1]:
        more, states = _run(spec, tokenizer, world, reshard(states, world), 3)
        trained += more
    rest, _ = _run(spec, tokenizer, worlds[-1], reshard(states, worlds[-1]), None)
    trained += rest

    assert {s["epoch"] for s in states} == {0}  # the resizes happened mid-epoch
    assert set(_big(trained)) == set(_big(uninterrupted))  # nothing skipped...
    assert max(_big(trained).values()) == 1  # ...nothing trained twice


def test_the_resharded_state_resumes_exactly_like_any_other(tokenizer, tmp_path) -> None:
    """A rank killed mid-handover resumes from its checkpoint with the same examples as without the kill."""
    big = _write_shards(tmp_path / "a", "big", 4, 30, tag="big")
    spec = _spec(SourceSpec(uri=big, format="alpaca"))
    _, states = _run(spec, tokenizer, 4, None, 3)
    handed = reshard(states, 2)
    straight, _ = _run(spec, tokenizer, 2, handed, None)
    first, mid = _run(spec, tokenizer, 2, handed, 2)
    second, _ = _run(spec, tokenizer, 2, mid, None)
    assert sorted(first + second) == sorted(straight)


def test_reshard_refuses_states_of_different_checkpoints(tokenizer, tmp_path) -> None:
    spec = _spec(SourceSpec(uri=_write_shards(tmp_path, "big", 1, 30, tag="big"), format="alpaca"))
    _, states = _run(spec, tokenizer, 2, None, 1)
    states[1]["epoch"] += 1
    with pytest.raises(ValueError, match="different epochs"):
        reshard(states, 3)
