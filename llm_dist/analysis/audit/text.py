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
# first character. cjk: CJK_RANGES; latin: A-Z, a-z, U+00C0-024F, U+1E00-1EFF; digit: 0-9 and full-width
# digits; other: everything else (punctuation, symbols, other scripts).
SCRIPTS = ("cjk", "latin", "digit", "other")
_CJK_BOUNDS = np.array([(0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF),
                        (0x2A700, 0x2EBEF), (0x2F800, 0x2FA1F)], dtype=np.int64)
_LATIN_BOUNDS = np.array([(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)], dtype=np.int64)
_DIGIT_BOUNDS = np.array([(0x30, 0x39), (0xFF10, 0xFF19)], dtype=np.int64)


def _in(codes: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    return ((codes[:, None] >= bounds[:, 0]) & (codes[:, None] <= bounds[:, 1])).any(axis=1)


def script_codes(codes: np.ndarray) -> np.ndarray:
    """Index into SCRIPTS of each code point (vectorised: the coverage counts run over every token)."""
    out = np.full(len(codes), 3, dtype=np.int64)
    out[_in(codes, _DIGIT_BOUNDS)] = 2
    out[_in(codes, _LATIN_BOUNDS)] = 1
    out[_in(codes, _CJK_BOUNDS)] = 0
    return out


def script_of(ch: str) -> str:
    return SCRIPTS[int(script_codes(np.array([ord(ch)], dtype=np.int64))[0])]


def coverage_counts(text: str, ids, offsets, unk_id: int | None, special: set[int]) -> dict[str, list[int]]:
    """{script: [tokens, unknown tokens]} of one encoded text (special tokens and empty spans skipped)."""
    out = {s: [0, 0] for s in SCRIPTS}
    if not len(ids) or not text:
        return out
    ids = np.asarray(ids, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64).reshape(len(ids), 2)
    keep = (offs[:, 1] > offs[:, 0]) & (offs[:, 0] < len(text))
    if special:
        keep &= ~np.isin(ids, list(special))
    if not keep.any():
        return out
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    sc = script_codes(codes[offs[keep, 0]])
    tok = np.bincount(sc, minlength=4)
    unk = np.bincount(sc[ids[keep] == unk_id], minlength=4) if unk_id is not None else np.zeros(4, dtype=np.int64)
    for i, s_ in enumerate(SCRIPTS):
        out[s_] = [int(tok[i]), int(unk[i])]
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
