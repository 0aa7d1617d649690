"""Generate the small synthetic instruction data shipped in jobs/data (deterministic; re-run to refresh).

Tasks with written instructions (repeat, reverse, sort, uppercase, count, add) in every supported record format,
a chain-of-thought arithmetic set, a FLAN-style labeled set, and held-out tasks never used in training
(for the zero-shot test).

    python -m tuneplane.devtools.synth jobs/data
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

Task = Callable[[random.Random], tuple[str, str, str]]  # -> (instruction, input, output)


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def repeat(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    return rng.choice(["Repeat the word.", "Copy the word exactly."]), w, w


def reverse(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    return rng.choice(["Reverse the word.", "Write the word backwards."]), w, w[::-1]


def sort_letters(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    return (
        rng.choice(["Sort the letters alphabetically.", "Put the letters in alphabetical order."]),
        w,
        "".join(sorted(w)),
    )


def uppercase(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    return rng.choice(["Write the word in capital letters.", "Uppercase the word."]), w, w.upper()


def count_letters(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 1, 9)
    return rng.choice(["How many letters are in the word?", "Count the letters."]), w, str(len(w))


def add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return rng.choice(["Add the two numbers.", "What is the sum?"]), f"{a} + {b}", str(a + b)


def cot_arith(rng: random.Random) -> tuple[str, str, str]:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    steps = f"First {a} * {b} = {a * b}. Then {a * b} + {c} = {a * b + c}. The answer is {a * b + c}."
    return "Compute step by step.", f"{a} * {b} + {c}", steps


# Held out: never in training data; used only for zero-shot exact-match evaluation.
def first_letter(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    return "What is the first letter of the word?", w, w[0]


def double_word(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 2, 5)
    return "Write the word twice.", w, w + w


TRAIN_TASKS: list[Task] = [repeat, reverse, sort_letters, uppercase, count_letters, add]
HELDOUT_TASKS: list[Task] = [first_letter, double_word]


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out_dir: str | Path, seed: int = 7) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def draw(tasks: list[Task]) -> tuple[str, str, str]:
        return rng.choice(tasks)(rng)

    alpaca = [
        dict(zip(("instruction", "input", "output"), draw(TRAIN_TASKS), strict=True)) for _ in range(2000)
    ]
    messages = []
    for _ in range(300):
        (i1, x1, y1), (i2, x2, y2) = draw(TRAIN_TASKS), draw(TRAIN_TASKS)
        messages.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a careful assistant."},
                    {"role": "user", "content": f"{i1}\n{x1}"},
                    {"role": "assistant", "content": y1},
                    {"role": "user", "content": f"{i2}\n{x2}"},
                    {"role": "assistant", "content": y2},
                ]
            }
        )
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"{i}\n{x}"}, {"from": "gpt", "value": y}]}
        for i, x, y in (draw(TRAIN_TASKS) for _ in range(300))
    ]
    completion = [
        {"prompt": f"{i} {x} =>", "completion": f" {y}"}
        for i, x, y in (draw(TRAIN_TASKS) for _ in range(300))
    ]
    labeled = []
    for _ in range(300):
        n = rng.randint(0, 999)
        labeled.append({"number": n, "label": "even" if n % 2 == 0 else "odd"})
    cot = [dict(zip(("instruction", "input", "output"), cot_arith(rng), strict=True)) for _ in range(300)]
    # Held-out examples of the trained tasks (separate files, never in a training source).
    alpaca_eval = [
        dict(zip(("instruction", "input", "output"), draw(TRAIN_TASKS), strict=True)) for _ in range(200)
    ]
    labeled_eval = []
    for _ in range(100):
        n = rng.randint(0, 999)
        labeled_eval.append({"number": n, "label": "even" if n % 2 == 0 else "odd"})
    heldout = [
        dict(zip(("instruction", "input", "output"), draw(HELDOUT_TASKS), strict=True)) for _ in range(200)
    ]

    files: dict[str, list[dict]] = {
        "tasks-alpaca.jsonl": alpaca,
        "tasks-messages.jsonl": messages,
        "tasks-sharegpt.jsonl": sharegpt,
        "tasks-completion.jsonl": completion,
        "parity-labeled.jsonl": labeled,
        "cot-arith.jsonl": cot,
        "heldout-tasks.jsonl": heldout,
        "tasks-alpaca-eval.jsonl": alpaca_eval,
        "parity-labeled-eval.jsonl": labeled_eval,
    }
    written = []
    for name, rows in files.items():
        _write(out / name, rows)
        written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for path in generate(args.out_dir, args.seed):
        print(path)


if __name__ == "__main__":
    main()
