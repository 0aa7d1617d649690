"""Packing tokenized examples into fixed-length rows, and collating rows into batches.

Packed rows carry `position_ids` that restart at 0 for every example and no attention mask: transformers
derives a per-example (block-diagonal) causal mask from the position restarts, for SDPA/eager on CPU and for
varlen flash-attention on GPU alike, so packed examples never attend to each other.
"""

from __future__ import annotations

import base64
import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneplane.data.templates import IGNORE_INDEX


@dataclass(slots=True)
class Example:
    key: str  # uri:line of the record it came from
    source: int
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_state(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source": self.source,
            "ids": base64.b64encode(self.input_ids.astype("<i4").tobytes()).decode(),
            "train": base64.b64encode(np.packbits(self.labels != IGNORE_INDEX).tobytes()).decode(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Example:
        ids = np.frombuffer(base64.b64decode(state["ids"]), dtype="<i4").astype(np.int32)
        bits = np.frombuffer(base64.b64decode(state["train"]), dtype=np.uint8)
        train = np.unpackbits(bits)[: len(ids)].astype(bool)
        return cls(state["key"], state["source"], ids, np.where(train, ids, IGNORE_INDEX).astype(np.int32))


@dataclass
class Batch:
    """Rows for one forward pass. `attention_mask` is None for packed rows (see module doc)."""

    input_ids: np.ndarray  # [rows, length] int64
    labels: np.ndarray
    position_ids: np.ndarray
    attention_mask: np.ndarray | None
    real_token_mask: np.ndarray  # True where a row holds a real token, False on padding
    keys: list[list[str]] = field(default_factory=list)  # record keys per row, for accounting and tests
    sources: np.ndarray | None = None  # [rows, length] source index of each token, -1 on padding

    def target_sources(self) -> np.ndarray:
        """The source of every scored target, in the order the loss visits them (row-major over the shifted
        labels): what per-source loss and trained-token counts are tallied by."""
        assert self.sources is not None
        targets = self.labels[:, 1:] != IGNORE_INDEX
        return self.sources[:, 1:][targets].astype(np.int64)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.real_token_mask.sum())

    @property
    def num_slots(self) -> int:
        return int(self.input_ids.size)

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @classmethod
    def idle(cls, pad_id: int, packed: bool) -> Batch:
        """A batch of no data: one padding row with one target, for a rank whose data ran out before the
        others' (its loss is multiplied by 0, but the step must still run every parameter's collectives)."""
        ids = np.full((1, 2), pad_id, dtype=np.int64)
        labels = np.array([[IGNORE_INDEX, pad_id]], dtype=np.int64)
        mask = None if packed else np.ones((1, 2), dtype=np.int64)
        real, sources = np.zeros((1, 2), dtype=bool), np.full((1, 2), -1, dtype=np.int16)
        return cls(ids, labels, np.arange(2)[None, :], mask, real, [[]], sources)

    def to_torch(self, device: Any = "cpu") -> dict[str, Any]:
        import torch

        out = {
            "input_ids": torch.from_numpy(self.input_ids).to(device),
            "labels": torch.from_numpy(self.labels).to(device),
            "position_ids": torch.from_numpy(self.position_ids).to(device),
        }
        if self.attention_mask is not None:
            out["attention_mask"] = torch.from_numpy(self.attention_mask).to(device)
        return out


class BestFitPacker:
    """Holds up to `buffer_size` examples; each row starts with the longest and is topped up best-fit.

    A larger buffer packs tighter (more short examples to fill gaps with) at the cost of memory and of
    reordering examples within a window of `buffer_size`.
    """

    def __init__(self, max_len: int, buffer_size: int):
        self.max_len = max_len
        self.buffer_size = buffer_size
        self._lengths: list[int] = []  # sorted, parallel to _examples
        self._examples: list[Example] = []

    def __len__(self) -> int:
        return len(self._examples)

    def full(self) -> bool:
        return len(self._examples) >= self.buffer_size

    def add(self, example: Example) -> None:
        i = bisect.bisect_right(self._lengths, len(example))
        self._lengths.insert(i, len(example))
        self._examples.insert(i, example)

    def pop_row(self) -> list[Example]:
        row = [self._take(len(self._examples) - 1)]
        room = self.max_len - len(row[0])
        while room > 0 and self._examples:
            i = bisect.bisect_right(self._lengths, room) - 1
            if i < 0:
                break
            example = self._take(i)
            row.append(example)
            room -= len(example)
        return row

    def _take(self, i: int) -> Example:
        self._lengths.pop(i)
        return self._examples.pop(i)

    def state(self) -> list[dict[str, Any]]:
        return [e.to_state() for e in self._examples]

    def load(self, state: list[dict[str, Any]]) -> None:
        for item in state:
            self.add(Example.from_state(item))


class FifoRows:
    """No packing: one example per row, in arrival order."""

    def __init__(self, buffer_size: int = 1):
        self.buffer_size = buffer_size
        self._queue: deque[Example] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.buffer_size

    def add(self, example: Example) -> None:
        self._queue.append(example)

    def pop_row(self) -> list[Example]:
        return [self._queue.popleft()]

    def state(self) -> list[dict[str, Any]]:
        return [e.to_state() for e in self._queue]

    def load(self, state: list[dict[str, Any]]) -> None:
        for item in state:
            self.add(Example.from_state(item))


def collate(rows: list[list[Example]], pad_id: int, packed: bool, length: int | None = None) -> Batch:
    """Rows -> a batch padded to `length` (default: the longest row). Padding is never trained on.

    Packed batches carry no attention mask (position restarts separate the examples); padded batches carry
    the usual 2-D mask.
    """
    width = length or max(sum(len(e) for e in row) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    real = np.zeros((len(rows), width), dtype=bool)
    sources = np.full((len(rows), width), -1, dtype=np.int16)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example)
            input_ids[r, at : at + n] = example.input_ids
            labels[r, at : at + n] = example.labels
            # The first token of an example is never a target: in a packed row it would otherwise be
            # predicted from the previous example's last token.
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = np.arange(n)
            real[r, at : at + n] = True
            sources[r, at : at + n] = example.source
            at += n
        # Padding gets its own position run, so it forms a separate (ignored) "sequence" in packed mode.
        position_ids[r, at:] = np.arange(width - at)
    attention_mask = None if packed else real.astype(np.int64)
    keys = [[e.key for e in row] for row in rows]
    return Batch(input_ids, labels, position_ids, attention_mask, real, keys, sources)
