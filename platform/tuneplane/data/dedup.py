"""Duplicate indexes on disk: exact (hash of the normalised text) and near (MinHash LSH), in one SQLite file.

Memory stays bounded on data larger than RAM: the exact-hash table and the LSH band tables live in a SQLite
file in a temp folder (SQLite's page cache is capped at CACHE_MIB), never in Python dicts. What stays in memory
per record is nothing; per batch, its features. The file grows per record by its key plus about 20 bytes for
the exact table, and by about 700 bytes more when it is near-indexed (band ids, a 512-byte signature kept to
verify candidates). The folder is tempfile's (TMPDIR); it is removed when the scan closes.

Near-duplicate search is LSH over MinHash signatures with (bands, rows) chosen for the threshold; a candidate
counts only when the estimated Jaccard of the two signatures reaches the threshold. Records are indexed in the
order they are offered, so "the first occurrence" is the lowest `ref`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tuneplane.data.minhash import band_hashes, jaccard_estimate, lsh_params

CACHE_MIB = 64
MAX_CANDIDATES = 32  # per band and query, lowest refs first: a huge bucket (templated data) stays cheap


def _signed(value: int) -> int:
    """uint64 -> SQLite's signed 64-bit INTEGER."""
    return value - (1 << 64) if value >= 1 << 63 else value


class ScratchDB:
    """A SQLite file in its own temp folder, written without journal or fsync, removed on close."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="tuneplane-quality-")
        self.conn = sqlite3.connect(Path(self._folder.name) / "index.sqlite", isolation_level=None)
        for pragma in (
            "journal_mode = OFF",
            "synchronous = OFF",
            "locking_mode = EXCLUSIVE",
            "temp_store = FILE",
            f"cache_size = -{CACHE_MIB * 1024}",
        ):
            self.conn.execute(f"PRAGMA {pragma}")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction per batch of records: per-statement commits would be ~50x slower."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()
        self._folder.cleanup()


class ExactIndex:
    """First key per normalised-text hash."""

    def __init__(self, db: ScratchDB, name: str = "exact"):
        self._conn, self._table = db.conn, name
        self._conn.execute(f"CREATE TABLE {name} (h INTEGER PRIMARY KEY, key TEXT NOT NULL)")

    def first(self, digest: int, key: str) -> str | None:
        """None when `digest` is new (it is recorded with `key`); otherwise the key that had it first."""
        h = _signed(digest)
        if self._conn.execute(f"INSERT OR IGNORE INTO {self._table} VALUES (?, ?)", (h, key)).rowcount:
            return None
        row = self._conn.execute(f"SELECT key FROM {self._table} WHERE h = ?", (h,)).fetchone()
        return str(row[0])


class NearIndex:
    """MinHash LSH: `matches(signature)` finds indexed records whose estimated Jaccard >= threshold."""

    def __init__(self, db: ScratchDB, threshold: float, num_perm: int, name: str = "near"):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self._conn, self._name = db.conn, name
        self._conn.execute(f"CREATE TABLE {name}_sig (ref INTEGER PRIMARY KEY, key TEXT NOT NULL, sig BLOB)")
        self._conn.execute(
            f"CREATE TABLE {name}_band (b INTEGER, ref INTEGER, PRIMARY KEY (b, ref)) WITHOUT ROWID"
        )
        # Each band's bucket is read only up to its first MAX_CANDIDATES refs (a primary-key range scan), so a
        # query costs the same however large a bucket grows.
        per_band = (
            f"SELECT * FROM (SELECT ref FROM {name}_band WHERE b = ? ORDER BY ref LIMIT {MAX_CANDIDATES})"
        )
        self._query = (
            f"SELECT ref, key, sig FROM {name}_sig WHERE ref IN ({' UNION '.join([per_band] * self.bands)}) "
            "ORDER BY ref"
        )

    def buckets(self, signatures: np.ndarray) -> np.ndarray:
        """Band bucket ids of a batch of signatures, (records, bands): compute once, then match and add."""
        return band_hashes(signatures, self.bands, self.rows)

    def matches(self, signature: np.ndarray, buckets: np.ndarray) -> list[tuple[int, str, float]]:
        """(ref, key, estimated Jaccard) of the indexed records at or above the threshold, lowest ref first."""
        rows = self._conn.execute(self._query, buckets.tolist()).fetchall()
        if not rows:
            return []
        stored = np.stack([np.frombuffer(sig, dtype=np.uint32) for _, _, sig in rows])
        similarity = jaccard_estimate(stored, _compact(signature))
        return [
            (int(ref), str(key), float(s))
            for (ref, key, _), s in zip(rows, similarity, strict=True)
            if s >= self.threshold
        ]

    def add(self, ref: int, key: str, signature: np.ndarray, buckets: np.ndarray) -> None:
        self._conn.execute(
            f"INSERT INTO {self._name}_sig VALUES (?, ?, ?)", (ref, key, _compact(signature).tobytes())
        )
        self._conn.executemany(
            f"INSERT OR IGNORE INTO {self._name}_band VALUES (?, ?)", [(b, ref) for b in buckets.tolist()]
        )


def _compact(signature: np.ndarray) -> np.ndarray:
    """The low 32 bits of each value: half the disk; two different values agree with chance 2^-32."""
    return (signature & np.uint64(0xFFFF_FFFF)).astype(np.uint32)
