"""Generate the small preference data shipped in jobs/data (deterministic; re-run to refresh).

The rule a tiny model can learn: whatever the message, the chosen reply is polite ("Certainly! ..."), the
rejected one curt ("No. ..."), and both echo the same words, so tone is the only difference between them.
Most pairs have a `prompt`; a fifth carry a short `messages` context (an earlier exchange, then the user
turn), and some give a side as an assistant message rather than a string, as OpenAI-style exports do.

    python -m tuneplane.devtools.synth_prefs jobs/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "paper",
    "garden",
    "window",
    "music",
    "bread",
    "yellow",
    "quiet",
    "rapid",
    "green",
    "orange",
    "table",
    "letter",
    "winter",
    "summer",
    "candle",
    "pocket",
    "ladder",
    "silver",
    "forest",
    "mirror",
    "basket",
    "planet",
    "rocket",
    "pencil",
    "jacket",
    "meadow",
    "harbor",
    "castle",
    "valley",
    "breeze",
    "copper",
    "marble",
    "sugar",
    "tiger",
    "violet",
    "walnut",
    "anchor",
    "bridge",
    "coffee",
    "desert",
    "engine",
    "feather",
    "guitar",
    "island",
    "jungle",
    "kettle",
    "lemon",
    "magnet",
    "needle",
    "ocean",
    "pepper",
    "puzzle",
    "rabbit",
]
ASKS = ("Reply to: {}", "Respond to this message: {}", "Answer the note: {}", "Say something about: {}")
POLITE = ("Certainly! {}", "Of course! {}", "Certainly! Happy to help with {}")
CURT = ("No. {}", "No. Not {}", "Whatever. {}")


def _phrase(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))


def _pair(rng: random.Random, words: list[str]) -> dict[str, Any]:
    echo = _phrase(rng, words)
    ask = rng.choice(ASKS).format(echo)
    chosen, rejected = rng.choice(POLITE).format(echo), rng.choice(CURT).format(echo)
    record: dict[str, Any]
    if rng.random() < 0.2:
        earlier = _phrase(rng, words)
        record = {
            "messages": [
                {"role": "user", "content": rng.choice(ASKS).format(earlier)},
                {"role": "assistant", "content": rng.choice(POLITE).format(earlier)},
                {"role": "user", "content": ask},
            ]
        }
    else:
        record = {"prompt": ask}
    if rng.random() < 0.1:
        return {**record, "chosen": {"role": "assistant", "content": chosen}, "rejected": rejected}
    return {**record, "chosen": chosen, "rejected": rejected}


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out_dir: str | Path, seed: int = 13, train: int = 600, held_out: int = 100) -> list[Path]:
    """prefs-tone.jsonl and prefs-tone-eval.jsonl; the eval set echoes mostly words the training set never uses."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_words, eval_words = list(WORDS[:48]), list(WORDS[48:])
    paths = [out / "prefs-tone.jsonl", out / "prefs-tone-eval.jsonl"]
    _write(paths[0], [_pair(rng, train_words) for _ in range(train)])
    _write(paths[1], [_pair(rng, eval_words + train_words[:8]) for _ in range(held_out)])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", nargs="?", default="jobs/data")
    parser.add_argument("--seed", type=int, default=13)
    for path in generate(parser.parse_args().out_dir, parser.parse_args().seed):
        print(path)


if __name__ == "__main__":
    main()
