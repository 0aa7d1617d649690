"""A compact set of record keys (`uri:line`): the drop-set the driver hands to every training rank.

Stored as a sorted numpy uint64 array of 64-bit blake2b hashes of the keys (8 bytes a record, whatever the
URI length); `contains` is a binary search. A false positive needs a 64-bit collision: with a million keys the
chance that any other record is dropped by mistake is about 1 in 10^13 per record.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np

from tuneplane.data.minhash import digest64


class KeySet:
    def __init__(self, hashes: Iterable[int] | np.ndarray = ()):
        array = np.asarray(hashes if isinstance(hashes, np.ndarray) else list(hashes), dtype=np.uint64)
        self._hashes = np.unique(array.reshape(-1))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> KeySet:
        return cls(np.fromiter((digest64(k) for k in keys), dtype=np.uint64))

    def contains(self, key: str) -> bool:
        if not len(self._hashes):
            return False
        h = np.uint64(digest64(key))
        i = int(np.searchsorted(self._hashes, h))
        return i < len(self._hashes) and self._hashes[i] == h

    __contains__ = contains

    def __len__(self) -> int:
        return len(self._hashes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeySet) and np.array_equal(self._hashes, other._hashes)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking value type: equality only

    def to_bytes(self) -> bytes:
        """The .npy bytes of the sorted hash array (what a job stores and the driver sends to workers)."""
        buffer = io.BytesIO()
        np.save(buffer, self._hashes, allow_pickle=False)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeySet:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.uint64 or array.ndim != 1:
            raise ValueError(f"not a key set: a {array.ndim}-D {array.dtype} array")
        return cls(array)
