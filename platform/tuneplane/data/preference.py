"""The per-rank preference stream: `preference` sources -> (chosen, rejected) token pairs -> padded batches.

It reads, shards, mixes, filters and resumes exactly as the instruction stream does (stream.MixedSources);
only the rows differ. A pair is never split: a batch of n pairs has rows [chosen_1..chosen_n,
rejected_1..rejected_n], padded to the longest, never packed. Both sides of a pair share the same prompt
tokens and are trained (labelled) on their final response only.

Length limit: a side longer than `max_seq_len` loses the end of its response (counted as `truncated`); a pair
whose prompt leaves no room for a response token is dropped (counted as `truncated` and
`dropped_no_response`). Keeping the prompt whole keeps the two sides comparable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneplane.data.formats import PreferencePair, to_preference
from tuneplane.data.packing import Batch, Example, collate
from tuneplane.data.records import RawRecord
from tuneplane.data.stream import MixedSources
from tuneplane.data.templates import IGNORE_INDEX, Segment, render_pair
from tuneplane.errors import FormatError


@dataclass(slots=True)
class PairExample:
    """One tokenized pair; `chosen` and `rejected` carry the shared prompt followed by their response."""

    chosen: Example
    rejected: Example

    @property
    def key(self) -> str:
        return self.chosen.key

    @property
    def source(self) -> int:
        return self.chosen.source

    @property
    def prompt_len(self) -> int:
        """Tokens before the first trained one (the shared prompt)."""
        return int(np.argmax(self.chosen.labels != IGNORE_INDEX))

    def to_state(self) -> dict[str, Any]:
        return {"chosen": self.chosen.to_state(), "rejected": self.rejected.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PairExample:
        return cls(Example.from_state(state["chosen"]), Example.from_state(state["rejected"]))


@dataclass
class PairBatch(Batch):
    """A padded batch of n pairs: rows 0..n-1 are the chosen sides, rows n..2n-1 the rejected ones, in the same
    pair order (`keys[i] == keys[n + i]`)."""

    @property
    def num_pairs(self) -> int:
        return len(self.input_ids) // 2

    @classmethod
    def idle_pairs(cls, pad_id: int) -> PairBatch:
        """One pair of padding rows with one target each: the step of a rank whose data ran out (see
        Batch.idle)."""
        one = Batch.idle(pad_id, packed=False)
        assert one.attention_mask is not None and one.sources is not None
        return cls(
            input_ids=_twice(one.input_ids),
            labels=_twice(one.labels),
            position_ids=_twice(one.position_ids),
            attention_mask=_twice(one.attention_mask),
            real_token_mask=_twice(one.real_token_mask),
            keys=[[], []],
            sources=_twice(one.sources),
        )


def _twice(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows, rows])


def collate_pairs(pairs: list[PairExample], pad_id: int) -> PairBatch:
    rows = [[p.chosen] for p in pairs] + [[p.rejected] for p in pairs]
    return PairBatch(**vars(collate(rows, pad_id, packed=False)))


class PreferenceStream(MixedSources[PreferencePair]):
    """Padded batches of `micro_batch_size` preference pairs for one data-parallel rank; iteration, epochs,
    `state_dict()` / `state=` and `drop=` behave as in InstructionStream (`packing` and `train_on_inputs` do
    not apply: a pair is never packed, and only responses are compared)."""

    def _load_pending(self, pending: list[Any] | None) -> None:
        self._pending: deque[PairExample] = deque(PairExample.from_state(p) for p in pending or [])

    def state_dict(self) -> dict[str, Any]:
        return self._state([p.to_state() for p in self._pending])

    def __iter__(self) -> Iterator[PairBatch]:
        while True:
            while len(self._pending) < self.micro_batch_size and not self._epoch_over():
                self._pending.extend(self.tokenize_pairs(self.pairs(self._read_chunk())))
            if not self._pending:
                return
            take = min(self.micro_batch_size, len(self._pending))
            yield collate_pairs([self._pending.popleft() for _ in range(take)], self.pad_id)

    @property
    def exhausted(self) -> bool:
        """Every source read through this epoch and nothing left to emit."""
        return self._epoch_over() and not self._pending

    def pairs(self, chunk: list[tuple[int, RawRecord]]) -> list[tuple[int, str, PreferencePair]]:
        """(source index, record) pairs -> (source index, key, pair); see `convert`."""
        return self.convert(chunk, to_preference)

    def tokenize_pairs(self, pairs: list[tuple[int, str, PreferencePair]]) -> list[PairExample]:
        rendered: list[tuple[int, str, tuple[list[Segment], list[Segment], list[Segment]]]] = []
        for i, key, pair in pairs:
            try:
                rendered.append((i, key, render_pair(pair, self.data.template, self.tokenizer)))
            except FormatError as exc:
                self._bad(i, key, str(exc))
        # One batched call for every prompt and response: a prompt is tokenized once for both sides.
        encoded = iter(self._segments.encode([segments for _, _, parts in rendered for segments in parts]))
        out = []
        for i, key, _ in rendered:
            prompt, chosen, rejected = next(encoded), next(encoded), next(encoded)
            example = self.make_pair(i, key, prompt[0], chosen, rejected)
            if example is not None:
                out.append(example)
        return out

    def make_pair(
        self,
        i: int,
        key: str,
        prompt: np.ndarray,
        chosen: tuple[np.ndarray, np.ndarray],
        rejected: tuple[np.ndarray, np.ndarray],
    ) -> PairExample | None:
        stats, room = self.stats[i], self.data.max_seq_len - len(prompt)
        if room <= 0:
            stats.truncated += 1
            stats.dropped_no_response += 1
            return None
        if max(len(chosen[0]), len(rejected[0])) > room:
            stats.truncated += 1
        masked = np.full(len(prompt), IGNORE_INDEX, dtype=np.int32)
        sides = [
            Example(key, i, np.concatenate([prompt, ids[:room]]), np.concatenate([masked, labels[:room]]))
            for ids, labels in (chosen, rejected)
        ]
        trained = [int((e.labels[1:] != IGNORE_INDEX).sum()) for e in sides]
        if min(trained) == 0:
            stats.dropped_no_response += 1
            return None
        stats.examples += 1
        stats.tokens += sum(len(e) for e in sides)
        stats.trained_tokens += sum(trained)
        return PairExample(*sides)
