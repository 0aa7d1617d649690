"""Duplicate detection: the MinHash estimator, the preflight's duplicate figures, the drop-set and the stream's
`drop=` filter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tuneplane.data import InstructionStream, preflight
from tuneplane.data.keyset import KeySet
from tuneplane.data.minhash import (
    SHINGLE_WORDS,
    Featuriser,
    Windows,
    WordHasher,
    jaccard_estimate,
    lsh_params,
    normalise,
)
from tuneplane.data.quality import build_filter
from tuneplane.spec import DataSpec, SourceSpec, TuningSpec

VOCAB = ["".join(random.Random(i).choices("bcdfghjklmnpqrstvwxz", k=7)) for i in range(20_000)]


def words(rng: random.Random, n: int) -> list[str]:
    return rng.sample(VOCAB, n)  # distinct words: records never share a shingle by chance


def write_alpaca(path: Path, rows: list[tuple[str, str]]) -> str:
    with path.open("w") as fh:
        for instruction, output in rows:
            fh.write(json.dumps({"instruction": instruction, "output": output}) + "\n")
    return str(path)


def write_messages(path: Path, rows: list[tuple[str, str]]) -> str:
    with path.open("w") as fh:
        for user, assistant in rows:
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            fh.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


def clean_rows(seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(words(rng, 12)), " ".join(words(rng, rng.randint(20, 60)))) for _ in range(n)]


def spec_for(*sources: SourceSpec, **data: object) -> TuningSpec:
    return TuningSpec.model_validate(
        {"name": "q", "model": {"base": "x"}, "data": {"sources": [s.model_dump() for s in sources], **data}}
    )


def shingle_jaccard(a: str, b: str) -> float:
    def shingles(text: str) -> set[tuple[str, ...]]:
        w = normalise(text).split()
        return {tuple(w[i : i + SHINGLE_WORDS]) for i in range(len(w) - SHINGLE_WORDS + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edited(text: list[str], every: int, rng: random.Random) -> list[str]:
    """A copy with every `every`-th word replaced: the further apart the edits, the more shingles survive."""
    return [rng.choice(VOCAB) if every and i % every == every - 1 else w for i, w in enumerate(text)]


@pytest.mark.parametrize("every", [0, 40, 20, 12, 8, 6, 5])
def test_minhash_estimate_tracks_exact_jaccard(every) -> None:
    rng = random.Random(every)
    base = words(rng, 200)
    a, b = " ".join(base), " ".join(edited(base, every, rng))
    sig = Featuriser()([a, b]).signatures
    assert sig is not None
    exact = shingle_jaccard(a, b)
    # 128 permutations: standard error sqrt(J(1-J)/128) <= 0.045
    assert abs(float(jaccard_estimate(sig[0], sig[1])) - exact) < 0.12, exact


def test_lsh_bands_separate_the_threshold() -> None:
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_params(threshold)
        assert bands * rows <= 128

        def candidate(s: float, bands: int = bands, rows: int = rows) -> float:
            return 1 - (1 - s**rows) ** bands

        assert candidate(threshold - 0.25) < 0.1 and candidate(min(threshold + 0.15, 1.0)) > 0.9


def test_window_hashes_depend_on_the_words_only() -> None:
    hasher = WordHasher()
    seq = normalise("One two three four five six").split()
    batch = [normalise(t).split() for t in ("zero " * 7, "one two three four five six", "x")]
    alone = Windows(hasher(seq), np.array([len(seq)]))
    mixed = Windows(hasher([w for s in batch for w in s]), np.array([len(s) for s in batch]))
    hashes, owner = mixed.of(3)
    assert set(owner.tolist()) == {0, 1}  # no window spans two records; "x" has none
    assert hashes[owner == 1].tolist() == alone.of(3)[0].tolist()
    assert mixed.whole(np.array([1])).tolist() == alone.of(6)[0].tolist()


def test_signatures_do_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from tuneplane.data.minhash import Featuriser; f = Featuriser()(['a b c d e f g h', 'x y']);"
        "print(f.digests, f.signatures.sum(axis=1).tolist())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1


def test_normalise_ignores_case_punctuation_width_and_spacing() -> None:
    assert normalise("Hello,  WORLD!\n“Ｑuoted” — text…") == normalise("hello world quoted text")


@pytest.fixture()
def planted(tmp_path) -> dict[str, str]:
    """Two sources of clean records with planted duplicates; returns their uris."""
    rng = random.Random(7)
    a_rows, b_rows = clean_rows(1, 40), clean_rows(2, 30)
    a_rows[9] = (a_rows[1][0].upper() + "!", a_rows[1][1] + " .")  # exact within a (line 10 ~ line 2)
    b_rows[4] = a_rows[2]  # exact across sources, another format (b line 5 ~ a line 3)
    long = words(rng, 120)
    a_rows[5] = ("summarise this", " ".join(long))
    b_rows[20] = ("summarise this", " ".join(edited(long, 60, rng)))  # near across (b 21 ~ a 6)
    a_rows[30] = ("summarise this", " ".join(edited(long, 40, rng)))  # near within a (a 31 ~ a 6)
    return {
        "a": write_alpaca(tmp_path / "a.jsonl", a_rows),
        "b": write_messages(tmp_path / "b.jsonl", b_rows),
    }


def test_preflight_finds_planted_duplicates_within_and_across_sources(tokenizer, planted) -> None:
    a, b = planted["a"], planted["b"]
    spec = spec_for(SourceSpec(uri=a, format="alpaca"), SourceSpec(uri=b, format="messages"))
    quality = preflight(spec, tokenizer, samples=0).to_dict()["quality"]
    dedup = quality["dedup"]
    assert (dedup["a"]["records"], dedup["a"]["exact"], dedup["a"]["near"]) == (40, 1, 1)
    assert (dedup["b"]["records"], dedup["b"]["exact"], dedup["b"]["near"]) == (30, 1, 1)
    pairs = {(p["kind"], p["first"], p["duplicate"]) for s in dedup.values() for p in s["pairs"]}
    assert pairs == {
        ("exact", f"{a}:2", f"{a}:10"),
        ("near", f"{a}:6", f"{a}:31"),
        ("exact", f"{a}:3", f"{b}:5"),
        ("near", f"{a}:6", f"{b}:21"),
    }
    assert quality["summary"].startswith("duplicates: 2 exact, 2 near (of 70)")
    assert quality["covers"] == "every record"


def test_preflight_reports_no_duplicates_on_clean_data(tokenizer, tmp_path) -> None:
    spec = spec_for(
        SourceSpec(uri=write_alpaca(tmp_path / "a.jsonl", clean_rows(1, 300)), format="alpaca"),
        SourceSpec(uri=write_messages(tmp_path / "b.jsonl", clean_rows(2, 200)), format="messages"),
    )
    quality = preflight(spec, tokenizer, samples=0, max_records=250).to_dict()["quality"]
    assert all(s["exact"] == s["near"] == 0 and not s["pairs"] for s in quality["dedup"].values())
    assert quality["dedup"]["a"]["records"] == 250
    assert "at most 250 records per source" in quality["covers"]


def test_drop_set_is_deterministic_and_keeps_first_occurrences(planted) -> None:
    a, b = planted["a"], planted["b"]
    sources = (SourceSpec(uri=a, format="alpaca"), SourceSpec(uri=b, format="messages"))
    near = build_filter(spec_for(*sources, dedup="near"), seed=3)
    assert near.drop == build_filter(spec_for(*sources, dedup="near"), seed=3).drop
    assert near.drop.to_bytes() == KeySet.from_bytes(near.drop.to_bytes()).to_bytes()
    dropped = {f"{a}:10", f"{a}:31", f"{b}:5", f"{b}:21"}
    assert all(k in near.drop for k in dropped) and len(near.drop) == 4
    assert not any(k in near.drop for k in (f"{a}:2", f"{a}:3", f"{a}:6"))
    assert near.to_dict()["dropped"] == 4
    assert (near.figures["exact_duplicates"], near.figures["near_duplicates"]) == (2, 2)
    exact = build_filter(spec_for(*sources, dedup="exact"), seed=3)
    assert {k for k in dropped if k in exact.drop} == {f"{a}:10", f"{b}:5"}
    assert len(build_filter(spec_for(*sources), seed=3).drop) == 0  # dedup off, no decontamination


def _stream_keys(stream: InstructionStream) -> list[str]:
    return [k for batch in stream for row in batch.keys for k in row]


def test_stream_skips_the_drop_set_on_every_rank(tokenizer, tmp_path) -> None:
    uris = [write_alpaca(tmp_path / f"s{f}.jsonl", clean_rows(10 + f, 25)) for f in range(3)]
    data = DataSpec(sources=[SourceSpec(uri=str(tmp_path / "s*.jsonl"), format="alpaca")], max_seq_len=256)
    every = [f"{u}:{line}" for u in uris for line in range(1, 26)]
    dropped = set(random.Random(0).sample(every, 20))
    drop = KeySet.from_bytes(KeySet.from_keys(dropped).to_bytes())  # as a worker receives it
    streams = [InstructionStream(data, tokenizer, rank=r, world_size=2, drop=drop) for r in range(2)]
    seen = [k for s in streams for k in _stream_keys(s)]
    assert sorted(seen) == sorted(set(every) - dropped)  # each kept record exactly once, no dropped one
    assert sum(s.stats[0].filtered for s in streams) == len(dropped)
    plain = [
        k for r in range(2) for k in _stream_keys(InstructionStream(data, tokenizer, rank=r, world_size=2))
    ]
    assert sorted(plain) == sorted(every)


def test_filtered_counter_survives_a_checkpoint_and_old_states_load(tokenizer, tmp_path) -> None:
    uri = write_alpaca(tmp_path / "d.jsonl", clean_rows(5, 60))
    data = DataSpec(sources=[SourceSpec(uri=uri, format="alpaca")], max_seq_len=256, pack_buffer=4)
    drop = KeySet.from_keys(f"{uri}:{line}" for line in range(1, 61, 3))
    first = InstructionStream(data, tokenizer, drop=drop, chunk_size=8)
    it = iter(first)
    before = [k for _ in range(3) for row in next(it).keys for k in row]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["stats"][0]["filtered"] > 0
    resumed = InstructionStream(data, tokenizer, drop=drop, chunk_size=8, state=state)
    assert resumed.stats[0].filtered == state["stats"][0]["filtered"]
    after = _stream_keys(resumed)
    assert sorted(before + after) == sorted(f"{uri}:{line}" for line in range(1, 61) if line % 3 != 1)
    assert resumed.stats[0].filtered == 20
    for stats in state["stats"]:
        del stats["filtered"]  # a checkpoint written before the counter existed
    assert InstructionStream(data, tokenizer, state=state).stats[0].filtered == 0
