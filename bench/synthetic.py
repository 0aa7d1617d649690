"""Synthetic instruction data with a realistic length mix, and a tokenizer for it (shared by the benchmarks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np


def _vocabulary(rng: random.Random, size: int = 6000) -> tuple[list[str], np.ndarray]:
    words = [
        "".join(rng.choice("etaoinshrdlcumwfgypbvk") for _ in range(rng.randint(2, 9))) for _ in range(size)
    ]
    zipf = 1.0 / np.arange(1, size + 1)
    return words, zipf / zipf.sum()


def make_dataset(folder: Path, records: int, seed: int = 0) -> Path:
    """Alpaca-style records with a realistic length mix: log-normal prompts (median ~25 words) and responses
    (median ~110 words, long tail), a third with an `input` field."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    words, probs = _vocabulary(rng)

    def text(median: float, sigma: float, cap: int) -> str:
        n = int(min(cap, max(1, nrng.lognormal(np.log(median), sigma))))
        return " ".join(words[i] for i in nrng.choice(len(words), n, p=probs))

    path = folder / "mix.jsonl"
    with path.open("w") as fh:
        for _ in range(records):
            row = {"instruction": text(25, 0.8, 400), "output": text(110, 0.9, 1400)}
            if rng.random() < 0.33:
                row["input"] = text(40, 0.9, 600)
            fh.write(json.dumps(row) + "\n")
    return path


def make_tokenizer(folder: Path, corpus: Path):
    """A 16k-vocab byte-level BPE trained on the benchmark text: about one token per word, like a real one."""
    from tuneplane.devtools.tiny import build_tokenizer

    with corpus.open() as fh:
        texts = [" ".join(json.loads(line).values()) for _, line in zip(range(3000), fh, strict=False)]
    return build_tokenizer(folder / "tok", texts, vocab_size=16000)
