"""Duplicates and eval contamination of instruction data: the preflight's figures and training's drop-set.

One pass over conversations: the eval sets (data.eval_sources, eval.zero_shot_sources) first, then ALL records
of all training sources in one fixed global order (source index, file order as `records.expand` lists it, line).
The first occurrence of a text is kept and later exact or near duplicates are dropped; training records that
overlap an eval example are dropped too. The same spec and seed give the same drop-set in every process.

Texts are whole conversations (every turn, system prompt and alpaca input included), normalised (NFKC,
lowercase, no punctuation, single spaces). The spec's own `system_prompt`, added to every record, is left out:
shared by all records it would make them all overlap.

Memory is bounded whatever the data size: exact hashes and LSH band tables live in a SQLite file in a temp
folder (data/dedup.py), eval n-grams in numpy arrays sized by the eval sets (data/contamination.py), the
drop-set as 8 bytes per dropped record (data/keyset.py); records are handled in batches of BATCH.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneplane.data.contamination import ContaminationIndex
from tuneplane.data.dedup import ExactIndex, NearIndex, ScratchDB
from tuneplane.data.formats import Conversation, to_conversation
from tuneplane.data.keyset import KeySet
from tuneplane.data.minhash import NUM_PERM, Features, Featuriser, digest64
from tuneplane.data.records import expand, read_records
from tuneplane.data.sources import required_columns
from tuneplane.errors import DataError, FormatError
from tuneplane.spec import DataSpec, SourceSpec, TuningSpec

BATCH = 512
MAX_PAIRS = 5  # example pairs kept per source and per eval set

Item = tuple[str, Conversation]  # (uri:line, conversation)


def conversation_text(conversation: Conversation, spec_system_prompt: str | None = None) -> str:
    messages = conversation.messages
    first = messages[0] if messages else None
    if spec_system_prompt and first and first.role == "system" and first.content == spec_system_prompt:
        messages = messages[1:]
    return "\n".join(m.text() for m in messages)


@dataclass
class SourceFigures:
    name: str
    records: int = 0
    exact: int = 0  # records whose text an earlier record had (this source or an earlier one)
    near: int = 0  # near-duplicates of an earlier kept record
    contaminated: int = 0  # records (not already duplicates) that overlap an eval example
    pairs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "name"}


class QualityScan:
    """Feed eval sets first (`add_eval`), then training sources in their global order (`add_train`)."""

    def __init__(self, data: DataSpec, *, exact: bool = True, near: bool = True, contamination: bool = True):
        self._system_prompt = data.system_prompt
        self._db = ScratchDB()
        self._features = Featuriser()
        self._exact = ExactIndex(self._db) if exact or near else None
        self._near = NearIndex(self._db, data.near_dup_threshold, NUM_PERM) if near else None
        self._contamination = (
            ContaminationIndex(
                self._db, data.contamination_ngram, data.near_dup_threshold, NUM_PERM, MAX_PAIRS
            )
            if contamination
            else None
        )
        self.sources: list[SourceFigures] = []
        self._refs = 0

    def __enter__(self) -> QualityScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the scratch SQLite file and its folder."""
        self._db.close()

    def _featurise(self, items: Sequence[Item]) -> Features:
        texts = [conversation_text(c, self._system_prompt) for _, c in items]
        return self._features(texts, minhash=self._near is not None or self._contamination is not None)

    def add_eval_set(self, name: str) -> int:
        if self._contamination is None:
            raise RuntimeError("this scan does not check contamination")
        return self._contamination.add_set(_unique(name, [s.name for s in self._contamination.sets]))

    def add_eval(self, set_index: int, items: Sequence[Item]) -> None:
        if self._contamination is not None and items:
            self._contamination.add(set_index, [k for k, _ in items], self._featurise(items))

    def add_source(self, name: str) -> int:
        self.sources.append(SourceFigures(_unique(name, [s.name for s in self.sources])))
        return len(self.sources) - 1

    def add_train(self, source: int, items: Sequence[Item]) -> list[str]:
        """Keys of the records to drop: duplicates of earlier records, or overlapping an eval example."""
        if not items:
            return []
        keys, features = [k for k, _ in items], self._featurise(items)
        overlaps = (
            self._contamination.check(keys, features)
            if self._contamination is not None
            else np.zeros(len(keys), dtype=bool)
        )
        buckets = (
            self._near.buckets(features.signatures)
            if self._near and features.signatures is not None
            else None
        )
        figures, drop = self.sources[source], []
        with self._db.batch():
            for i, key in enumerate(keys):
                figures.records += 1
                if self._duplicate(figures, i, key, features, buckets):
                    drop.append(key)
                elif overlaps[i]:
                    figures.contaminated += 1
                    drop.append(key)
        return drop

    def _duplicate(
        self, figures: SourceFigures, i: int, key: str, features: Features, buckets: np.ndarray | None
    ) -> bool:
        if self._exact is None:
            return False
        first = self._exact.first(features.digests[i], key)
        if first is not None:
            figures.exact += 1
            self._pair(figures, "exact", first, key, 1.0)
            return True
        if self._near is None or buckets is None or features.signatures is None or not features.lengths[i]:
            return False
        found = self._near.matches(features.signatures[i], buckets[i])
        if found:
            _, first, similarity = found[0]
            figures.near += 1
            self._pair(figures, "near", first, key, similarity)
            return True
        self._near.add(self._refs, key, features.signatures[i], buckets[i])
        self._refs += 1
        return False

    @staticmethod
    def _pair(figures: SourceFigures, kind: str, first: str, duplicate: str, similarity: float) -> None:
        if len(figures.pairs) < MAX_PAIRS:
            figures.pairs.append(
                {"kind": kind, "first": first, "duplicate": duplicate, "similarity": round(similarity, 3)}
            )

    # -- figures -------------------------------------------------------------------------------------
    def totals(self) -> dict[str, int]:
        return {
            "records": sum(s.records for s in self.sources),
            "exact_duplicates": sum(s.exact for s in self.sources),
            "near_duplicates": sum(s.near for s in self.sources),
            "contaminated": sum(s.contaminated for s in self.sources),
        }

    def dedup(self) -> dict[str, Any]:
        return {s.name: {k: v for k, v in s.to_dict().items() if k != "contaminated"} for s in self.sources}

    def contamination(self) -> dict[str, Any]:
        return {s.name: s.to_dict() for s in (self._contamination.sets if self._contamination else [])}

    def summary(self) -> str:
        t = self.totals()
        dups = f"duplicates: {t['exact_duplicates']} exact, {t['near_duplicates']} near (of {t['records']})"
        sets = self._contamination.sets if self._contamination else []
        found = ", ".join(f"{s.name} {s.contaminated} of {s.examples}" for s in sets) or "no eval sets"
        return f"{dups}; contamination: {found}"


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}#{n}" in taken:
        n += 1
    return f"{name}#{n}"


# -- the training pass -------------------------------------------------------------------------------------
@dataclass
class DataFilter:
    """The records training skips (`drop`, keys `uri:line`) and the counts behind it."""

    drop: KeySet
    figures: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"dropped": len(self.drop), **self.figures}


def filtering(data: DataSpec) -> bool:
    """Whether training drops records (`data.dedup` or `data.decontaminate`): the driver then reads them all."""
    return data.dedup != "off" or data.decontaminate


def build_filter(spec: TuningSpec, seed: int) -> DataFilter:
    """Read every record of the spec's eval sets and training sources (no tokenization) and decide, per
    `data.dedup` and `data.decontaminate`, which training records to drop. Records a `holdout_fraction` sets
    aside count too (they are records of training sources). Bad records are skipped (the stream reports them);
    a source that cannot be listed raises DataError."""
    data = spec.data
    if not filtering(data):
        return DataFilter(
            KeySet(), {"records": 0, "exact_duplicates": 0, "near_duplicates": 0, "contaminated": 0}
        )
    start = time.monotonic()
    dropped = array("Q")
    checks = {"exact": data.dedup != "off", "near": data.dedup == "near", "contamination": data.decontaminate}
    with QualityScan(data, **checks) as scan:
        if data.decontaminate:
            for source in [*data.eval_sources, *spec.eval.zero_shot_sources]:
                set_index = scan.add_eval_set(source.display_name)
                for items in _conversations(source, seed, data.system_prompt):
                    scan.add_eval(set_index, items)
        for source in data.sources:
            index = scan.add_source(source.display_name)
            for items in _conversations(source, seed, data.system_prompt):
                dropped.extend(digest64(key) for key in scan.add_train(index, items))
        figures = {
            **scan.totals(),
            "sources": {s.name: s.to_dict() for s in scan.sources},
            "eval_sets": scan.contamination(),
            "seconds": round(time.monotonic() - start, 3),
        }
    return DataFilter(KeySet(np.frombuffer(dropped.tobytes(), dtype=np.uint64)), figures)


def _conversations(source: SourceSpec, seed: int, system_prompt: str | None) -> Iterator[list[Item]]:
    """A source's readable records as conversations, in file order, in batches."""
    columns, batch = required_columns(source), []
    for uri in expand(source.uri):
        try:
            for record in read_records(uri, 0, columns):
                if record.data is None:
                    continue
                try:
                    conversation = to_conversation(record.data, source, record.key, seed, system_prompt)
                except FormatError:
                    continue
                batch.append((record.key, conversation))
                if len(batch) >= BATCH:
                    yield batch
                    batch = []
        except DataError:  # the rest of this file is unreadable; the stream reports it
            continue
    if batch:
        yield batch
