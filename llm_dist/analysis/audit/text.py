"""Text normalisation and stable hashing shared by every stage.

All hashes are process- and machine-independent (xxhash, fixed seeds), so shards computed on different
nodes merge into the same answer as one run.
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")
_P = np.uint64(0x100000001B3)  # FNV prime: the multiplier of the rolling n-gram hash


def normalize_exact(text: str) -> str:
    """What two texts must share to be exact duplicates: NFKC, lower case, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(normalize_exact(text).encode())


def norm_words(text: str) -> list[str]:
    """Words for shingles, n-grams and repetition rules: lower case, punctuation dropped (as lm-eval's
    decontamination normalises before taking 13-grams)."""
    return _WORD.findall(text.lower())


_CACHE: dict[str, int] = {}  # word -> hash; vocabularies repeat, hashing each word once is ~3x faster


def word_hashes(words: list[str]) -> np.ndarray:
    cache = _CACHE
    try:
        return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
    except KeyError:
        if len(cache) > 1_000_000:
            cache.clear()
        h = xxhash.xxh3_64_intdigest
        for w in words:
            if w not in cache:
                cache[w] = h(w.encode())
        return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """Rolling polynomial hash of every window of `n` consecutive word hashes (uint64, wrapping);
    empty when there are fewer than `n` words."""
    m = len(wh) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = wh[:m].copy()
    for k in range(1, n):
        h *= _P
        h ^= wh[k:k + m]
    return h


def shingle_hashes32(wh: np.ndarray, n: int) -> np.ndarray:
    """32-bit shingle hashes for MinHash (repeats are harmless: a minimum is a minimum); a text shorter
    than `n` words is one shingle."""
    if len(wh) == 0:
        return np.empty(0, dtype=np.uint32)
    h = ngram_hashes(wh, n) if len(wh) >= n else ngram_hashes(wh, len(wh))
    return ((h >> np.uint64(32)) ^ h).astype(np.uint32)
