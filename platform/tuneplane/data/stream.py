"""The per-rank instruction stream: sources -> mixing -> tokenized examples -> packed batches, resumable.

Sharding is deterministic and disjoint: when a source has a multiple of `world_size` files each rank reads
its own files; otherwise record j of a pass goes to rank j % world_size (other ranks skip the line unparsed).
Mixing draws a source per example by weight from a counter-based RNG, so resuming needs only a counter.
One epoch ends when every source has been read through once; a source that runs out earlier starts its next
pass (that is what a 10% weight on a small chain-of-thought set means: it is repeated to keep its share).

`state_dict()` after any batch captures everything needed to continue exactly there: per-source cursors, the
mixing counter, and the examples read but not yet emitted (the packing buffer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from tuneplane.data.formats import Conversation, to_conversation
from tuneplane.data.keyset import KeySet
from tuneplane.data.packing import Batch, BestFitPacker, Example, FifoRows, collate
from tuneplane.data.records import RawRecord
from tuneplane.data.sources import SourceCursor, SourceReader, Split
from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer, render
from tuneplane.errors import MAX_ECHO, DataError, FormatError, clip
from tuneplane.spec import DataSpec, SourceSpec

STATE_VERSION = 1
_MIN_SAMPLE_FOR_ERROR_RATE = 100
_MIX_BLOCK = 4096

T = TypeVar("T")


@dataclass
class SourceStats:
    name: str
    records: int = 0
    errors: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    filtered: int = 0  # in the drop-set (duplicates, contamination); default 0: older checkpoints lack it
    error_samples: list[str] = field(default_factory=list)

    def add_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(clip(message, 2 * MAX_ECHO))  # uri:line and the reason


class MixedSources(Generic[T]):
    """What every per-rank stream shares: the sources' readers and cursors, mixing by weight, the drop-set, the
    per-source stats and on_error policy, epochs, and the state that resumes them. Subclasses turn the records
    into rows (`convert` gives them the records as formats.py items) and keep their own pending buffer, which
    `_load_pending` sets up (from a checkpoint's `pending` when resuming)."""

    def __init__(
        self,
        data: DataSpec,
        tokenizer: Any,
        *,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        micro_batch_size: int = 1,
        split: Split = "train",
        state: dict[str, Any] | None = None,
        chunk_size: int = 64,
        drop: KeySet | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.chunk_size = chunk_size
        self.drop = drop if drop is not None and len(drop) else None  # records skipped (data/quality.py)
        sources, holdout = _split_sources(data, split)
        self.sources = sources
        cursors = [SourceCursor(**c) for c in state["cursors"]] if state else [None] * len(sources)
        if state and (state.get("version") != STATE_VERSION or len(cursors) != len(sources)):
            raise ValueError("data state does not match this spec's sources (or comes from another version)")
        self.readers = [
            SourceReader(i, s, seed=seed, rank=rank, world_size=world_size, holdout=holdout, cursor=c)
            for i, (s, c) in enumerate(zip(sources, cursors, strict=True))
        ]
        self.stats = [SourceStats(s.display_name) for s in sources]
        if state:
            self.stats = [SourceStats(**s) for s in state.get("stats", [asdict(s) for s in self.stats])]
        self._weights = np.asarray([s.weight for s in sources], dtype=np.float64)
        self._draws = state["draws"] if state else 0
        self.epoch = state["epoch"] if state else 0
        self._mix_block: tuple[int, np.ndarray] | None = None
        self.tokenizer, self.micro_batch_size = tokenizer, micro_batch_size
        self._segments = SegmentTokenizer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._load_pending(state["pending"] if state else None)

    def _load_pending(self, pending: list[Any] | None) -> None:
        raise NotImplementedError

    def _state(self, pending: list[Any]) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "draws": self._draws,
            "cursors": [asdict(r.cursor) for r in self.readers],
            "pending": pending,
            "stats": [asdict(s) for s in self.stats],
        }

    def _epoch_over(self) -> bool:
        return all(r.cursor.done_in_epoch or r.empty for r in self.readers)

    def next_epoch(self) -> None:
        self.epoch += 1
        for reader in self.readers:
            reader.cursor.done_in_epoch = False

    def _read_chunk(self) -> list[tuple[int, RawRecord]]:
        """Up to `chunk_size` records, each from a source drawn by weight, until the epoch is over."""
        chunk: list[tuple[int, RawRecord]] = []
        while len(chunk) < self.chunk_size and not self._epoch_over():
            i = self._choose_source()
            record = self.readers[i].next()
            if record is not None:  # None: that source's pass ended
                chunk.append((i, record))
        return chunk

    def _choose_source(self) -> int:
        block, offset = divmod(self._draws, _MIX_BLOCK)
        if self._mix_block is None or self._mix_block[0] != block:
            rng = np.random.default_rng([self.seed, self.rank, block])
            self._mix_block = (block, rng.random(_MIX_BLOCK))
        self._draws += 1
        live = np.asarray([not r.empty for r in self.readers], dtype=np.float64)
        cum = np.cumsum(self._weights * live)
        return int(
            min(np.searchsorted(cum, self._mix_block[1][offset] * cum[-1], side="right"), len(cum) - 1)
        )

    def convert(
        self, chunk: list[tuple[int, RawRecord]], to_item: Callable[..., T]
    ) -> list[tuple[int, str, T]]:
        """(source index, record) pairs -> (source index, key, item), `to_item` being a formats.py converter;
        records in the drop-set are counted and skipped here, after ownership was decided, so ranks keep the
        records they own."""
        out = []
        for i, record in chunk:
            stats = self.stats[i]
            stats.records += 1
            if record.data is None:
                self._bad(i, record.key, record.error or "unreadable")
            elif self.drop is not None and record.key in self.drop:
                stats.filtered += 1
            else:
                try:
                    item = to_item(
                        record.data, self.sources[i], record.key, self.seed, self.data.system_prompt
                    )
                except FormatError as exc:
                    self._bad(i, record.key, str(exc))
                    continue
                out.append((i, record.key, item))
        return out

    def _bad(self, i: int, key: str, reason: str) -> None:
        stats, source = self.stats[i], self.sources[i]
        uri, _, line = key.rpartition(":")
        stats.add_error(f"{key}: {reason}")
        if source.on_error == "fail":
            raise DataError(
                uri, f"{reason} (source '{source.display_name}' has on_error: fail)", int(line) or None
            )
        allowed = source.max_error_fraction * max(stats.records, _MIN_SAMPLE_FOR_ERROR_RATE)
        if stats.errors > allowed:
            raise DataError(
                source.uri,
                f"{stats.errors} bad records in the first {stats.records} exceed max_error_fraction "
                f"{source.max_error_fraction:g}; first: {stats.error_samples[0]}",
            )


class InstructionStream(MixedSources[Conversation]):
    """Packed (or padded) batches of prompt-masked examples for one data-parallel rank.

    Iterating yields the rest of the current epoch; `next_epoch()` starts the next one (a trainer calls it once
    every rank is `exhausted`, so ranks never disagree on the epoch, not even in a checkpoint). Call
    `state_dict()` between batches to checkpoint; pass it back as `state` to continue with exactly the next
    example: nothing repeated, nothing skipped. `drop` (data/quality.py's drop-set: duplicates, contaminated
    records) skips records by key and counts them as `filtered`; the same records go to the same ranks.
    """

    def _load_pending(self, pending: list[Any] | None) -> None:
        data = self.data
        self._rows = (
            BestFitPacker(data.max_seq_len, data.pack_buffer)
            if data.packing
            else FifoRows(self.micro_batch_size)
        )
        if pending is not None:
            self._rows.load(pending)

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self._state(self._rows.state())

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        while True:
            rows: list[list[Example]] = []
            while len(rows) < self.micro_batch_size:
                self._fill()
                if not len(self._rows):
                    break
                rows.append(self._rows.pop_row())
            if not rows:
                return
            yield collate(rows, self.pad_id, packed=self.data.packing)

    @property
    def exhausted(self) -> bool:
        """Every source read through this epoch and nothing left to emit."""
        return self._epoch_over() and not len(self._rows)

    def _fill(self) -> None:
        while not self._rows.full() and not self._epoch_over():
            for example in self.tokenize_records(self._read_chunk()):
                self._rows.add(example)

    def tokenize_records(self, chunk: list[tuple[int, RawRecord]]) -> list[Example]:
        """(source index, record) pairs -> examples, counting bad records per the sources' on_error policy."""
        return self.tokenize_conversations(self.conversations(chunk))

    def conversations(self, chunk: list[tuple[int, RawRecord]]) -> list[tuple[int, str, Conversation]]:
        """(source index, record) pairs -> (source index, key, conversation); see `convert`."""
        return self.convert(chunk, to_conversation)

    def tokenize_conversations(self, conversations: list[tuple[int, str, Conversation]]) -> list[Example]:
        rendered: list[tuple[int, str, list]] = []
        for i, key, conversation in conversations:
            try:
                rendered.append((i, key, render(conversation, self.data.template, self.tokenizer)))
            except FormatError as exc:
                self._bad(i, key, str(exc))
        encoded = self._segments.encode([segments for _, _, segments in rendered])
        examples = []
        for (i, key, _), (ids, labels) in zip(rendered, encoded, strict=True):
            example = self.make_example(i, key, ids, labels)
            if example is not None:
                examples.append(example)
        return examples

    def make_example(self, i: int, key: str, ids: np.ndarray, labels: np.ndarray) -> Example | None:
        stats, limit = self.stats[i], self.data.max_seq_len
        if self.data.train_on_inputs:
            labels = ids.copy()
        if len(ids) > limit:
            stats.truncated += 1
            ids, labels = ids[:limit], labels[:limit]
        trained = int((labels[1:] != IGNORE_INDEX).sum())
        if trained == 0:
            stats.dropped_no_response += 1
            return None
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained
        return Example(key, i, ids, labels)


def _split_sources(data: DataSpec, split: Split) -> tuple[list[SourceSpec], tuple[Split, float] | None]:
    if split == "train":
        return list(data.sources), (("train", data.holdout_fraction) if data.holdout_fraction > 0 else None)
    if data.eval_sources:
        return list(data.eval_sources), None
    if data.holdout_fraction > 0:
        return list(data.sources), ("eval", data.holdout_fraction)
    raise ValueError("no eval data: set data.eval_sources or data.holdout_fraction")
