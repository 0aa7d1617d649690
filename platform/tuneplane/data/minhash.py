"""Text features for duplicate and contamination checks: normalised words, k-word window hashes, MinHash.

Everything here is deterministic across processes and machines (no Python `hash()`, which PYTHONHASHSEED
salts): words hash with blake2b, windows combine word hashes arithmetically, permutations come from a fixed seed.

Window hashes: a k-word window w_i..w_{i+k-1} hashes to sum_j w_{i+j} * P^j (mod 2^64) with an odd P. P is
invertible mod 2^64, so every window of every length comes from ONE prefix sum per batch: (S[i+k] - S[i]) *
P^-i. MinHash applies 128 permutations (a*h + b) mod (2^61 - 1) to 32-bit folds of the 5-word shingle hashes
(a < 2^32 keeps a*h inside 64 bits, so the arithmetic is exact in numpy's uint64).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MERSENNE = (1 << 61) - 1
NUM_PERM = 128
SHINGLE_WORDS = 5
_SEED = 0x7475_6E65_706C_616E  # fixed: signatures must agree between the preflight, the driver and reruns
_P = 0x9E37_79B9_7F4A_7C15  # odd: invertible mod 2^64
_MAX_CACHED_WORDS = 500_000  # bounds the word-hash cache (~60 MB); cleared when full, hashes stay the same
_BLOCK = 1024  # shingles per MinHash block: its (shingles x permutations) matrix (1 MiB) stays in cache
_EMPTY = 1 << 62  # above every permuted value: a record without shingles


@functools.cache
def _punctuation() -> dict[int, None]:
    """str.translate table deleting every Unicode punctuation character (categories P*), built once."""
    return {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def normalise(text: str) -> str:
    """Unicode NFKC, lowercase, punctuation removed, whitespace collapsed to single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().translate(_punctuation()).split())


def digest64(text: str) -> int:
    """A stable 64-bit hash of a string."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class WordHasher:
    """Stable 64-bit word hashes, cached (the cache is bounded: it is cleared when full)."""

    def __init__(self, max_cached: int = _MAX_CACHED_WORDS):
        self._cache: dict[str, int] = {}
        self._max = max_cached

    def __call__(self, words: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter(map(self._cache.__getitem__, words), dtype=np.uint64, count=len(words))
        except KeyError:  # new words: hash them all at once, then look up again
            new = set(words).difference(self._cache)
            if len(self._cache) + len(new) > self._max:
                self._cache.clear()
                new = set(words)
            self._cache.update((w, digest64(w)) for w in new)
            return np.fromiter(map(self._cache.__getitem__, words), dtype=np.uint64, count=len(words))


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i (mod 2^64) for i < n (a power of two); tables up to 2^20 (16 MiB) are kept for reuse."""
    return _cached_powers(n) if n <= 1 << 20 else _make_powers(n)


@functools.cache
def _cached_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    return _make_powers(n)


def _make_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    inverse = pow(_P, -1, 1 << 64)
    up = np.cumprod(np.full(n, _P, dtype=np.uint64))
    down = np.cumprod(np.full(n, inverse, dtype=np.uint64))
    one = np.ones(1, dtype=np.uint64)
    return np.concatenate([one, up[:-1]]), np.concatenate([one, down[:-1]])


class Windows:
    """Hashes of the k-word windows of a batch of word sequences laid end to end (records stay apart)."""

    def __init__(self, word_hashes: np.ndarray, lengths: np.ndarray):
        self.lengths = lengths.astype(np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        total = int(self.lengths.sum())
        up, self._down = _powers(1 << max(total, 1).bit_length())
        self._prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(word_hashes * up[:total])])
        self._owner = np.repeat(np.arange(len(lengths), dtype=np.int64), self.lengths)

    def _span(self, begin: np.ndarray, k: np.ndarray | int) -> np.ndarray:
        return (self._prefix[begin + k] - self._prefix[begin]) * self._down[begin]

    def of(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(hashes, record index) of every window of exactly k words, in record order."""
        n = len(self._owner)
        if n < k:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        begin = np.arange(n - k + 1, dtype=np.int64)
        begin = begin[self._owner[begin] == self._owner[begin + k - 1]]
        return self._span(begin, k), self._owner[begin]

    def whole(self, records: np.ndarray) -> np.ndarray:
        """The hash of each given record's whole word sequence (a window of its own length)."""
        return self._span(self.starts[records], self.lengths[records])

    def shingles(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k-word shingles; a record shorter than k words (but not empty) is one shingle of all its words."""
        hashes, owner = self.of(k)
        short = np.flatnonzero((self.lengths > 0) & (self.lengths < k))
        if len(short):
            hashes = np.concatenate([hashes, self.whole(short)])
            owner = np.concatenate([owner, short])
            order = np.argsort(owner, kind="stable")
            hashes, owner = hashes[order], owner[order]
        return hashes, owner


class MinHasher:
    """MinHash signatures (num_perm values per record, each < 2^61) from shingle hashes."""

    def __init__(self, num_perm: int = NUM_PERM):
        rng = np.random.default_rng(_SEED)
        self.num_perm = num_perm
        self._a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64)
        self._b = rng.integers(0, MERSENNE, num_perm, dtype=np.uint64)

    def signatures(self, shingles: np.ndarray, owner: np.ndarray, records: int) -> np.ndarray:
        """(records, num_perm) uint64; `owner` (sorted) names each shingle's record. A record without
        shingles keeps all values at 2^62 (it matches nothing)."""
        out = np.full((records, self.num_perm), _EMPTY, dtype=np.uint64)
        folded = (shingles ^ (shingles >> np.uint64(32))) & np.uint64(0xFFFF_FFFF)
        for lo in range(0, len(folded), _BLOCK):
            values, own = self._permute(folded[lo : lo + _BLOCK]), owner[lo : lo + _BLOCK]
            cuts = np.concatenate([[0], np.flatnonzero(own[1:] != own[:-1]) + 1])
            rows = own[cuts]
            out[rows] = np.minimum(out[rows], np.minimum.reduceat(values, cuts, axis=0))
        return out

    def _permute(self, h: np.ndarray) -> np.ndarray:
        """(a*h + b) mod (2^61 - 1) for every (h, permutation), in place and without `%` (3x faster): since
        2^61 = 1 (mod p), x = (x & p) + (x >> 61) keeps x's residue; the result is the residue, or the residue
        + p in the rare case that leaves it in [p, p + 1] (still one fixed value per input)."""
        m, shift = np.uint64(MERSENNE), np.uint64(61)
        x = np.multiply(h[:, None], self._a)  # a, h < 2^32: exact in 64 bits
        high = x >> shift
        np.bitwise_and(x, m, out=x)
        x += high
        x += self._b
        np.right_shift(x, shift, out=high)
        np.bitwise_and(x, m, out=x)
        x += high
        return x


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature values: the MinHash estimate of Jaccard similarity (b may be a matrix)."""
    return np.mean(np.asarray(a) == np.asarray(b), axis=-1)


@functools.cache
def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false positive + false negative probability mass around the
    threshold (datasketch's `_optimal_param` idea: both weights 0.5)."""
    best, best_error = (1, num_perm), float("inf")
    below, above = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_pos = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            false_neg = np.trapezoid((1 - above**rows) ** bands, above)
            error = float(0.5 * false_pos + 0.5 * false_neg)
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(records, bands) int64 bucket ids: each band's rows combined with fixed odd multipliers, band-salted."""
    rng = np.random.default_rng(_SEED + 1)
    mult = rng.integers(1, 1 << 63, rows, dtype=np.uint64) | np.uint64(1)
    salt = rng.integers(0, 1 << 63, bands, dtype=np.uint64)
    grouped = signatures[:, : bands * rows].reshape(len(signatures), bands, rows)
    mixed = (grouped * mult).sum(axis=2, dtype=np.uint64) + salt
    return (mixed ^ (mixed >> np.uint64(29))).view(np.int64)


@dataclass
class Features:
    """What the checks need of a batch of texts."""

    digests: list[int]  # of each normalised text (exact duplicates)
    lengths: np.ndarray  # words per text
    windows: Windows
    signatures: np.ndarray | None  # (texts, num_perm) MinHash, when asked for


class Featuriser:
    def __init__(self, num_perm: int = NUM_PERM, shingle_words: int = SHINGLE_WORDS):
        self.num_perm, self.shingle_words = num_perm, shingle_words
        self._words = WordHasher()
        self._minhash = MinHasher(num_perm)

    def __call__(self, texts: Sequence[str], minhash: bool = True) -> Features:
        normal = [normalise(t) for t in texts]
        split = [n.split() for n in normal]
        lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        windows = Windows(self._words([w for words in split for w in words]), lengths)
        signatures = None
        if minhash:
            signatures = self._minhash.signatures(*windows.shingles(self.shingle_words), len(texts))
        return Features([digest64(n) for n in normal], lengths, windows, signatures)
