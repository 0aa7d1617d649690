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

import hashlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from tuneplane.data.formats import Conversation, to_conversation
from tuneplane.data.keyset import KeySet
from tuneplane.data.packing import Batch, BestFitPacker, Example, FifoRows, collate
from tuneplane.data.records import RawRecord, expand, file_kind, read_records
from tuneplane.data.reshard import Handover, shards_by_file
from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer, render
from tuneplane.errors import MAX_ECHO, DataError, FormatError, clip
from tuneplane.spec import DataSpec, SourceSpec

STATE_VERSION = 1
_MIN_SAMPLE_FOR_ERROR_RATE = 100
_MIX_BLOCK = 4096

Split = Literal["train", "eval"]


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


@dataclass
class SourceCursor:
    pass_no: int = 0
    file_index: int = 0  # position in this pass's (shuffled) file order
    line: int = 0  # lines consumed in the current file
    seen: int = 0  # records of this pass seen by all ranks together (for record striding)
    done_in_epoch: bool = False
    owned_in_pass: int = 0  # records this rank took in the current pass; 0 after a full pass = empty shard
    handover: dict[str, Any] | None = None  # what an old world took, after a resize (see data/reshard.py)


def required_columns(source: SourceSpec) -> tuple[str, ...]:
    names = {
        "alpaca": ("instruction", "output"),
        "prompt_completion": ("prompt", "completion"),
        "messages": ("messages",),
        "sharegpt": ("conversations",),
    }.get(source.format)
    if names is None:  # labeled: the union of the templates' fields
        names = tuple(sorted({f for t in source.templates for f in t.fields()}))
    return tuple(source.fields.get(n, n) for n in names)


def in_holdout(key: str, fraction: float, seed: int) -> bool:
    """Stable per-record draw on the file name and line, so moving data between stores keeps the split."""
    if fraction <= 0:
        return False
    name = key.rsplit("/", 1)[-1]
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class SourceReader:
    """This rank's records of one source, pass after pass, from a resumable cursor."""

    def __init__(
        self,
        index: int,
        spec: SourceSpec,
        *,
        seed: int,
        rank: int,
        world_size: int,
        holdout: tuple[Split, float] | None = None,
        cursor: SourceCursor | None = None,
    ):
        self.index, self.spec, self.seed = index, spec, seed
        self.rank, self.world_size = rank, world_size
        self.holdout = holdout
        self.files = expand(spec.uri)
        for uri in self.files:
            file_kind(uri)  # fail fast on unknown extensions
        self.by_file = shards_by_file(len(self.files), world_size)
        self.cursor = cursor or SourceCursor()
        self._handover = Handover.from_state(self.cursor.handover)
        self._columns = required_columns(spec)
        self.empty = False  # a full pass gave this rank nothing (tiny source, many ranks)
        self._records = self._iterate()

    def _pass_files(self, pass_no: int) -> list[str]:
        order = list(self.files)
        random.Random(f"{self.seed}:{self.index}:{pass_no}").shuffle(order)
        return order[self.rank :: self.world_size] if self._by_file(pass_no) else order

    def _by_file(self, pass_no: int) -> bool:
        """Whole files per rank, except in a pass taken over from another world size (read record by record)."""
        return self.by_file and not self._taking_over(pass_no)

    def _taking_over(self, pass_no: int) -> bool:
        return self._handover is not None and self._handover.governs(pass_no)

    def _owns(self, c: SourceCursor) -> bool:
        """Whether this rank owns the record the cursor is on (`c.line`, the `c.seen`-th of the pass)."""
        if self._handover is not None and self._taking_over(c.pass_no):
            taken = self._handover.taken(c.pass_no, c.file_index, c.line, c.seen, len(self.files))
            return not taken and c.seen % self.world_size == self.rank
        return self.by_file or c.seen % self.world_size == self.rank  # not taking over: the world's own rule

    def next(self) -> RawRecord | None:
        """The next owned record; None when a pass ends (the cursor then points at the next pass)."""
        return None if self.empty else next(self._records)

    def _iterate(self) -> Iterator[RawRecord | None]:
        c = self.cursor
        while True:
            files = self._pass_files(c.pass_no)
            while c.file_index < len(files):
                uri = files[c.file_index]
                try:
                    for record in read_records(uri, c.line, self._columns):
                        c.line = record.line
                        owned = self._owns(c)
                        c.seen += 1
                        if owned and self._wanted(record):
                            c.owned_in_pass += 1
                            yield record
                except DataError as exc:  # the rest of this file is unreadable: report it, go on to the next
                    reported = self._reports_file_error(c, exc.line or 0)
                    c.line = 0
                    c.file_index += 1
                    if reported:
                        yield RawRecord(exc.uri, exc.line or 0, None, exc.reason)
                    continue
                c.file_index, c.line = c.file_index + 1, 0
            # Never loop over an empty shard (a pass taken over may leave this rank nothing: that is not one).
            self.empty = c.owned_in_pass == 0 and not self._taking_over(c.pass_no)
            c.pass_no, c.file_index, c.line, c.seen, c.owned_in_pass = c.pass_no + 1, 0, 0, 0, 0
            if not self._taking_over(c.pass_no):
                self._handover, c.handover = None, None
            c.done_in_epoch = True
            yield None

    def _reports_file_error(self, c: SourceCursor, line: int) -> bool:
        """Whether this rank reports an unreadable rest of a file: in a pass taken over, only where the old world
        had not reached it, and by one new rank (every rank reads every file then)."""
        if self._handover is None or not self._taking_over(c.pass_no):
            return True
        if c.file_index % self.world_size != self.rank:
            return False
        return not self._handover.taken(c.pass_no, c.file_index, line, c.seen, len(self.files))

    def _wanted(self, record: RawRecord) -> bool:
        if self.holdout is None:
            return True
        split, fraction = self.holdout
        return in_holdout(record.key, fraction, self.seed) == (split == "eval")


class InstructionStream:
    """Packed (or padded) batches of prompt-masked examples for one data-parallel rank.

    Iterating yields the rest of the current epoch; `next_epoch()` starts the next one (a trainer calls it once
    every rank is `exhausted`, so ranks never disagree on the epoch, not even in a checkpoint). Call
    `state_dict()` between batches to checkpoint; pass it back as `state` to continue with exactly the next
    example: nothing repeated, nothing skipped. `drop` (data/quality.py's drop-set: duplicates, contaminated
    records) skips records by key and counts them as `filtered`; the same records go to the same ranks.
    """

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
        self.data, self.tokenizer, self.seed = data, tokenizer, seed
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
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
        self._weights = np.asarray([s.weight for s in sources], dtype=np.float64)
        self._draws = state["draws"] if state else 0
        self.epoch = state["epoch"] if state else 0
        self._mix_block: tuple[int, np.ndarray] | None = None
        self._segments = SegmentTokenizer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._rows = (
            BestFitPacker(data.max_seq_len, data.pack_buffer) if data.packing else FifoRows(micro_batch_size)
        )
        if state:
            self._rows.load(state["pending"])
            self.stats = [SourceStats(**s) for s in state.get("stats", [asdict(s) for s in self.stats])]

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "draws": self._draws,
            "cursors": [asdict(r.cursor) for r in self.readers],
            "pending": self._rows.state(),
            "stats": [asdict(s) for s in self.stats],
        }

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

    def _epoch_over(self) -> bool:
        return all(r.cursor.done_in_epoch or r.empty for r in self.readers)

    @property
    def exhausted(self) -> bool:
        """Every source read through this epoch and nothing left to emit."""
        return self._epoch_over() and not len(self._rows)

    def next_epoch(self) -> None:
        self.epoch += 1
        for reader in self.readers:
            reader.cursor.done_in_epoch = False

    def _fill(self) -> None:
        while not self._rows.full() and not self._epoch_over():
            chunk: list[tuple[int, RawRecord]] = []
            while len(chunk) < self.chunk_size and not self._epoch_over():
                i = self._choose_source()
                record = self.readers[i].next()
                if record is not None:  # None: that source's pass ended
                    chunk.append((i, record))
            for example in self.tokenize_records(chunk):
                self._rows.add(example)

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

    def tokenize_records(self, chunk: list[tuple[int, RawRecord]]) -> list[Example]:
        """(source index, record) pairs -> examples, counting bad records per the sources' on_error policy."""
        return self.tokenize_conversations(self.conversations(chunk))

    def conversations(self, chunk: list[tuple[int, RawRecord]]) -> list[tuple[int, str, Conversation]]:
        """(source index, record) pairs -> (source index, key, conversation); records in the drop-set are
        counted and skipped here, after ownership was decided, so ranks keep the records they own."""
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
                    conversation = to_conversation(
                        record.data, self.sources[i], record.key, self.seed, self.data.system_prompt
                    )
                except FormatError as exc:
                    self._bad(i, record.key, str(exc))
                    continue
                out.append((i, record.key, conversation))
        return out

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


def _split_sources(data: DataSpec, split: Split) -> tuple[list[SourceSpec], tuple[Split, float] | None]:
    if split == "train":
        return list(data.sources), (("train", data.holdout_fraction) if data.holdout_fraction > 0 else None)
    if data.eval_sources:
        return list(data.eval_sources), None
    if data.holdout_fraction > 0:
        return list(data.sources), ("eval", data.holdout_fraction)
    raise ValueError("no eval data: set data.eval_sources or data.holdout_fraction")
