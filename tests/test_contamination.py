"""Eval contamination: n-gram and near-duplicate overlap between eval sets and training data, reported by the
preflight and `tuneplane validate`, and dropped by the training drop-set."""

from __future__ import annotations

import random
from pathlib import Path

from typer.testing import CliRunner

from tests.test_dedup import VOCAB, clean_rows, edited, words, write_alpaca
from tuneplane.cli import app
from tuneplane.data import preflight
from tuneplane.data.quality import build_filter
from tuneplane.spec import TuningSpec


def make_spec(train: str, evals: list[str], zero_shot: list[str], **data: object) -> TuningSpec:
    def source(uri: str) -> dict[str, str]:
        return {"uri": uri, "format": "alpaca"}

    return TuningSpec.model_validate(
        {
            "name": "c",
            "model": {"base": "x"},
            "data": {"sources": [source(train)], "eval_sources": [source(u) for u in evals], **data},
            "eval": {"zero_shot_sources": [source(u) for u in zero_shot]},
        }
    )


def planted(tmp_path: Path) -> dict[str, str]:
    """Training data, an eval set with two contaminated examples (a shared 13-gram at eval line 4, an exact
    copy at line 9) and a zero-shot task of short examples, one of which (line 1) a training record contains."""
    rng = random.Random(3)
    train, ev = clean_rows(1, 50), clean_rows(2, 20)
    span = train[6][1].split()[2:15]  # 13 words of training line 7
    ev[3] = (ev[3][0], " ".join(words(rng, 5) + span + words(rng, 5)))
    ev[8] = train[11]
    short = words(rng, 6)
    train[19] = (train[19][0], " ".join(words(rng, 10) + short + words(rng, 10)))
    zero = [(" ".join(short[:3]), " ".join(short[3:5]))]  # 5 words, found in training line 20
    zero.append((" ".join(short[:3]), " ".join([short[4], short[3]])))  # the same words in another order
    zero += [(" ".join(words(rng, 3)), " ".join(words(rng, 3))) for _ in range(6)]
    return {
        "train": write_alpaca(tmp_path / "train.jsonl", train),
        "eval": write_alpaca(tmp_path / "heldout.jsonl", ev),
        "zero": write_alpaca(tmp_path / "task.jsonl", zero),
    }


def test_preflight_flags_planted_contamination_with_both_sides(tokenizer, tmp_path) -> None:
    uris = planted(tmp_path)
    spec = make_spec(uris["train"], [uris["eval"]], [uris["zero"]])
    quality = preflight(spec, tokenizer, samples=0).to_dict()["quality"]
    heldout, task = quality["contamination"]["heldout"], quality["contamination"]["task"]
    assert (heldout["examples"], heldout["contaminated"]) == (20, 2)
    assert {(p["eval"], p["train"]) for p in heldout["pairs"]} == {
        (f"{uris['eval']}:4", f"{uris['train']}:7"),
        (f"{uris['eval']}:9", f"{uris['train']}:12"),
    }
    assert (task["examples"], task["contaminated"]) == (8, 1)  # only the short example in training order
    assert task["pairs"] == [{"eval": f"{uris['zero']}:1", "train": f"{uris['train']}:20", "kind": "5-gram"}]
    assert "contamination: heldout 2 of 20, task 1 of 8" in quality["summary"]


def test_near_duplicate_without_a_shared_ngram_is_contamination(tokenizer, tmp_path) -> None:
    rng = random.Random(5)
    train = clean_rows(1, 20)
    long = words(rng, 240)
    train[4] = ("rewrite this", " ".join(long))
    # A word changed every 60: no 64-word run in common, yet ~85% of the 5-word shingles.
    ev = [*clean_rows(2, 10), ("rewrite this", " ".join(edited(long, 60, rng)))]
    uris = write_alpaca(tmp_path / "t.jsonl", train), write_alpaca(tmp_path / "e.jsonl", ev)
    spec = make_spec(uris[0], [uris[1]], [], contamination_ngram=64, near_dup_threshold=0.7)
    found = preflight(spec, tokenizer, samples=0).quality["contamination"]["e"]
    assert found["contaminated"] == 1
    (pair,) = found["pairs"]
    assert (pair["eval"], pair["train"]) == (f"{uris[1]}:11", f"{uris[0]}:5")
    assert pair["kind"].startswith("near")


def test_clean_eval_sets_and_a_shared_system_prompt_report_nothing(tokenizer, tmp_path) -> None:
    train = write_alpaca(tmp_path / "t.jsonl", clean_rows(1, 200))
    ev = write_alpaca(tmp_path / "e.jsonl", clean_rows(2, 50))
    short = write_alpaca(tmp_path / "s.jsonl", [(VOCAB[i], VOCAB[i + 1]) for i in range(19_000, 19_040, 2)])
    system = " ".join(VOCAB[:30])  # added to every record: must not make them all overlap
    quality = preflight(make_spec(train, [ev], [short], system_prompt=system), tokenizer, samples=0).quality
    assert quality["contamination"] == {
        "e": {"examples": 50, "contaminated": 0, "pairs": []},
        "s": {"examples": 20, "contaminated": 0, "pairs": []},
    }
    assert quality["dedup"]["t"]["exact"] == quality["dedup"]["t"]["near"] == 0


def test_decontaminate_drops_the_training_side(tmp_path) -> None:
    uris = planted(tmp_path)
    spec = make_spec(uris["train"], [uris["eval"]], [uris["zero"]], decontaminate=True)
    built = build_filter(spec, seed=1)
    assert built.drop == build_filter(spec, seed=1).drop
    train_keys = [f"{uris['train']}:{line}" for line in range(1, 51)]
    assert [k for k in train_keys if k in built.drop] == [f"{uris['train']}:{line}" for line in (7, 12, 20)]
    assert built.figures["contaminated"] == 3 and built.figures["exact_duplicates"] == 0
    assert built.figures["eval_sets"]["task"]["contaminated"] == 1
    off = make_spec(uris["train"], [uris["eval"]], [uris["zero"]])
    assert len(build_filter(off, seed=1).drop) == 0


def test_validate_prints_summary_and_pairs(tmp_path, tiny_dir) -> None:
    uris = planted(tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: c\nmodel: {{base: {tiny_dir}}}\n"
        f"data: {{sources: [{{uri: {uris['train']}, format: alpaca}}], "
        f"eval_sources: [{{uri: {uris['eval']}, format: alpaca}}]}}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    assert "duplicates: 0 exact, 0 near (of 50); contamination: heldout 2 of 20" in result.output
    assert f"{uris['eval']}:4 ~ {uris['train']}:7" in result.output
