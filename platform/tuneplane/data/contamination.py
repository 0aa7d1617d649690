"""Eval contamination: which eval examples overlap the training data, and which training records overlap them.

An eval example is contaminated when a training record shares one of its `ngram`-word n-grams (an example
shorter than `ngram` words counts as one n-gram of its own length, matched against the training records'
n-grams of that length), or is a MinHash near-duplicate of it. Eval sets are indexed first; training batches
are then checked against them, so training data is only streamed.

Memory: eval n-grams are held as sorted numpy arrays (16 bytes per eval n-gram, plus each eval example's key):
eval sets are held-out samples, orders of magnitude smaller than training data. Their MinHash signatures go
to the LSH tables of the shared SQLite file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tuneplane.data.dedup import NearIndex, ScratchDB
from tuneplane.data.minhash import Features

_NONE = np.empty(0, np.int64)


@dataclass
class EvalSetFigures:
    name: str
    examples: int = 0
    contaminated: int = 0
    pairs: list[dict[str, str]] = field(default_factory=list)  # {"eval": uri:line, "train": uri:line, "kind"}

    def to_dict(self) -> dict[str, object]:
        return {"examples": self.examples, "contaminated": self.contaminated, "pairs": self.pairs}


class ContaminationIndex:
    """Add every eval set (`add_set`, `add`), then `check` training batches; figures are in `sets`."""

    def __init__(self, db: ScratchDB, ngram: int, threshold: float, num_perm: int, max_pairs: int = 5):
        self.ngram, self.max_pairs = ngram, max_pairs
        self.sets: list[EvalSetFigures] = []
        self._keys: list[str] = []  # eval example id -> uri:line
        self._set_of: list[int] = []  # eval example id -> index in `sets`
        self._hit = np.zeros(0, dtype=bool)  # per eval example: contaminated (sized when frozen)
        self._parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # n-gram length -> (hashes, ids)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] | None = None  # frozen: sorted hashes, ids
        self._near = NearIndex(db, threshold, num_perm, name="eval")

    def add_set(self, name: str) -> int:
        if self._tables is not None:
            raise RuntimeError("eval sets must all be added before training data is checked")
        self.sets.append(EvalSetFigures(name))
        return len(self.sets) - 1

    def add(self, set_index: int, keys: list[str], features: Features) -> None:
        if self._tables is not None:
            raise RuntimeError("eval sets must all be added before training data is checked")
        first = len(self._keys)
        self._keys.extend(keys)
        self._set_of.extend([set_index] * len(keys))
        self.sets[set_index].examples += len(keys)
        hashes, owner = features.windows.of(self.ngram)
        self._parts.setdefault(self.ngram, []).append((hashes, owner + first))
        for length in np.unique(features.lengths[(features.lengths > 0) & (features.lengths < self.ngram)]):
            short = np.flatnonzero(features.lengths == length)
            self._parts.setdefault(int(length), []).append((features.windows.whole(short), short + first))
        if features.signatures is not None:
            buckets = self._near.buckets(features.signatures)
            for i in np.flatnonzero(features.lengths > 0):
                self._near.add(first + int(i), keys[i], features.signatures[i], buckets[i])

    def _freeze(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        if self._tables is None:
            self._tables = {}
            for length, parts in self._parts.items():
                hashes = np.concatenate([h for h, _ in parts])
                ids = np.concatenate([i for _, i in parts])
                order = np.argsort(hashes, kind="stable")
                self._tables[length] = (hashes[order], ids[order])
            self._parts.clear()
            self._hit = np.zeros(len(self._keys), dtype=bool)
        return self._tables

    def check(self, keys: list[str], features: Features) -> np.ndarray:
        """Mark the eval examples these training records overlap; True per training record that overlaps one."""
        overlaps = np.zeros(len(keys), dtype=bool)
        for length, (table, ids) in self._freeze().items():
            if len(table):
                records, found = _lookup(*features.windows.of(length), table, ids)
                overlaps[records] = True
                for eval_id, record in _first_hits(records, found, self._hit):
                    self._mark(eval_id, keys[record], f"{length}-gram")
        if features.signatures is not None and self._keys:
            buckets = self._near.buckets(features.signatures)
            for i in np.flatnonzero(features.lengths > 0):
                record = int(i)
                for eval_id, _, similarity in self._near.matches(
                    features.signatures[record], buckets[record]
                ):
                    overlaps[record] = True
                    self._mark(eval_id, keys[record], f"near {similarity:.2f}")
        return overlaps

    def _mark(self, eval_id: int, train_key: str, kind: str) -> None:
        if self._hit[eval_id]:
            return
        self._hit[eval_id] = True
        figures = self.sets[self._set_of[eval_id]]
        figures.contaminated += 1
        if len(figures.pairs) < self.max_pairs:
            figures.pairs.append({"eval": self._keys[eval_id], "train": train_key, "kind": kind})


def _lookup(
    hashes: np.ndarray, owner: np.ndarray, table: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(training record, eval id) for every window hash found in the sorted table (a hash may name several)."""
    left = np.searchsorted(table, hashes, side="left")
    found = table[np.minimum(left, len(table) - 1)] == hashes
    if not found.any():
        return _NONE, _NONE
    left = left[found]
    counts = np.searchsorted(table, hashes[found], side="right") - left
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(owner[found], counts), ids[np.repeat(left, counts) + offsets]


def _first_hits(records: np.ndarray, eval_ids: np.ndarray, hit: np.ndarray) -> list[tuple[int, int]]:
    """(eval id, its earliest training record) for eval examples not hit before. Vectorised: a phrase shared
    by many eval examples and many training records must not cost a Python step per pair."""
    new = ~hit[eval_ids]
    records, eval_ids = records[new], eval_ids[new]
    order = np.lexsort((records, eval_ids))
    firsts, at = np.unique(eval_ids[order], return_index=True)
    return list(zip(firsts.tolist(), records[order][at].tolist(), strict=True))
