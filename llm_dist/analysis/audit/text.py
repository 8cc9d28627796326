"""Text normalisation and stable hashing shared by every stage.

All hashes are process- and machine-independent (xxhash, fixed seeds), so shards computed on different
nodes merge into the same answer as one run.

Units. Spaced scripts (Latin, Cyrillic, Greek, Hangul, ...) are cut into words (`\\w+`). Scripts written
without spaces (Han, Hiragana, Katakana: `CJK`) have no word boundaries in the text, so each of their
characters is one unit, as BERT's Chinese handling does (`BasicTokenizer._tokenize_chinese_chars`). A mixed
document gets both: "用BERT做预训练" → 用 / bert / 做 / 预 / 训 / 练. A document is *CJK* when at least half its
units are CJK characters (`is_cjk`); its shingle and n-gram sizes are then the CJK ones (in characters).
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")
# BERT's `_is_chinese_char` blocks (CJK unified ideographs, extensions, compatibility) plus kana
CJK_RANGES = ("\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
              "\U0002a700-\U0002ebef\U0002f800-\U0002fa1f")
_HAS_CJK = re.compile(f"[{CJK_RANGES}]")
_CJK_PUNCT = "\u3000-\u303f\uff00-\uffef"
_CJK_SPACE = re.compile(f" (?=[{CJK_RANGES}{_CJK_PUNCT}])|(?<=[{CJK_RANGES}{_CJK_PUNCT}]) ")
_UNIT = re.compile(f"[{CJK_RANGES}]|[^\\W{CJK_RANGES}]+")  # one CJK character, or a run of other word characters
_P = np.uint64(0x100000001B3)  # FNV prime: the multiplier of the rolling n-gram hash


def normalize_exact(text: str) -> str:
    """What two texts must share to be exact duplicates: NFKC, lower case, whitespace collapsed; and in
    text with CJK characters, no whitespace next to a CJK character or CJK/full-width punctuation (it does
    not separate words there: "数据。 \\n模型" == "数据。模型")."""
    out = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    if _HAS_CJK.search(out) is None:
        return out
    return _CJK_SPACE.sub("", out)


def exact_hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(normalize_exact(text).encode())


def norm_words(text: str) -> list[str]:
    """Words for shingles, n-grams and repetition rules: lower case, punctuation dropped (as lm-eval's
    decontamination normalises before taking 13-grams)."""
    return _WORD.findall(text.lower())


def has_cjk(text: str) -> bool:
    return _HAS_CJK.search(text) is not None


def norm_units(text: str) -> list[str]:
    """`norm_words`, except that every CJK character is a unit of its own (see the module docstring).
    Text without CJK characters gives exactly `norm_words(text)`."""
    low = text.lower()
    if _HAS_CJK.search(low) is None:
        return _WORD.findall(low)
    return _UNIT.findall(low)


def cjk_units(units: list[str]) -> int:
    """How many of `units` are CJK characters."""
    return sum(1 for u in units if len(u) == 1 and _HAS_CJK.match(u))


def is_cjk(units: list[str]) -> bool:
    """True when at least half of a document's units are CJK characters (so it is shingled by characters)."""
    return bool(units) and 2 * cjk_units(units) >= len(units)


# scripts for tokenizer coverage (the unknown-token rate per script): a token belongs to the script of its
# first character
SCRIPTS = ("cjk", "latin", "digit", "other")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f\u1e00-\u1eff]")


def script_of(ch: str) -> str:
    if _HAS_CJK.match(ch):
        return "cjk"
    if _LATIN.match(ch):
        return "latin"
    if ch.isdigit():
        return "digit"
    return "other"


def coverage_counts(text: str, ids, offsets, unk_id: int | None, special: set[int]) -> dict[str, list[int]]:
    """{script: [tokens, unknown tokens]} of one encoded text (special tokens and empty spans skipped)."""
    out = {s: [0, 0] for s in SCRIPTS}
    for i, (a, b) in zip(ids, offsets):
        if i in special or b <= a or a >= len(text):
            continue
        c = out[script_of(text[a])]
        c[0] += 1
        if i == unk_id:
            c[1] += 1
    return out


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
