"""One source's records for one data-parallel rank, pass after pass, from a resumable cursor.

Sharding is deterministic and disjoint: when a source has a multiple of `world_size` files each rank reads
its own files; otherwise record j of a pass goes to rank j % world_size (other ranks skip the line unparsed).
After a resize, a pass taken over from another world size follows data/reshard.py's handover.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from tuneplane.data.records import RawRecord, expand, file_kind, read_records
from tuneplane.data.reshard import Handover, shards_by_file
from tuneplane.errors import DataError
from tuneplane.spec import SourceSpec

Split = Literal["train", "eval"]


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
        "preference": ("chosen", "rejected"),  # and `prompt` or `messages`: either may be absent
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
