"""Per-document quality flags: a documented subset of the Gopher (Rae et al. 2021, App. A) and C4
(Raffel et al. 2020, §2.2) heuristics, with their published thresholds.

Each rule *flags*; nothing is dropped. A flag says "a web-corpus filter would have removed or edited
this document", which for a curated classification set is a prompt to look, not a verdict (short texts
trip `gopher_word_count` by design).

| rule                    | flags a document when                                                     | from   |
|-------------------------|---------------------------------------------------------------------------|--------|
| gopher_word_count       | fewer than `min_words` (50) or more than `max_words` (100,000) words      | Gopher |
| gopher_mean_word_length | mean word length outside [3, 10] characters                               | Gopher |
| gopher_symbol_ratio     | '#' or ellipses ('...', '…') per word above 0.1                            | Gopher |
| gopher_bullet_lines     | more than 90% of lines start with a bullet ('•', '-', '*')                | Gopher |
| gopher_ellipsis_lines   | more than 30% of lines end with an ellipsis                               | Gopher |
| gopher_alpha_words      | fewer than 80% of words contain a letter                                  | Gopher |
| gopher_stop_words       | fewer than 2 of: the, be, to, of, and, that, have, with                   | Gopher |
| gopher_dup_lines        | duplicate lines > 30% of lines, or > 20% of characters                    | Gopher |
| gopher_dup_paragraphs   | duplicate paragraphs > 30% of paragraphs, or > 20% of characters          | Gopher |
| gopher_top_ngram        | the most frequent 2/3/4-gram covers > 20/18/16% of word characters        | Gopher |
| gopher_dup_ngram        | repeated 5..10-grams cover > 15..10% of word characters                   | Gopher |
| c4_terminal_punct       | fewer than half of the lines end in terminal punctuation (. ! ? " ')      | C4     |
| c4_lorem_ipsum          | contains "lorem ipsum"                                                    | C4     |
| c4_curly_bracket        | contains '{'  (C4 drops such pages as code)                               | C4     |

Words are whitespace-separated tokens for the Gopher length/symbol rules, and the normalised word
sequence (lower case, punctuation dropped) for the repetition rules; character fractions are over the
characters of those words, each character counted once.
"""
from __future__ import annotations

import numpy as np

import re

from .text import ngram_hashes

_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")  # a whitespace word without a letter

RULES = (
    "gopher_word_count", "gopher_mean_word_length", "gopher_symbol_ratio", "gopher_bullet_lines",
    "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words", "gopher_dup_lines",
    "gopher_dup_paragraphs", "gopher_top_ngram", "gopher_dup_ngram", "c4_terminal_punct",
    "c4_lorem_ipsum", "c4_curly_bracket",
)
BIT = {name: 1 << i for i, name in enumerate(RULES)}
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
TOP_NGRAM = ((2, 0.20), (3, 0.18), (4, 0.16))
DUP_NGRAM = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019")


def names(mask: int) -> list[str]:
    return [r for r in RULES if mask & BIT[r]]


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup / len(items), (dup_chars / total_chars if total_chars else 0.0)


def quality_flags(text: str, words: list[str], wh: np.ndarray, min_words: int = 50,
                  max_words: int = 100_000, raw: list[str] | None = None) -> int:
    """Bit mask of the rules (see `RULES`) this document trips. `words`/`wh`: its normalised words
    and their hashes (shared with the dedup stage, so they are computed once)."""
    mask = 0
    raw = text.split() if raw is None else raw
    n_raw = len(raw)
    n_chars = sum(map(len, raw))
    if not min_words <= n_raw <= max_words:
        mask |= BIT["gopher_word_count"]
    if n_raw:
        mean_len = n_chars / n_raw
        if not 3 <= mean_len <= 10:
            mask |= BIT["gopher_mean_word_length"]
        if max(text.count("#"), text.count("...") + text.count("\u2026")) / n_raw > 0.1:
            mask |= BIT["gopher_symbol_ratio"]
        if 1.0 - len(_NO_LETTER_WORD.findall(text)) / n_raw < 0.8:
            mask |= BIT["gopher_alpha_words"]
    stop = 0
    for w in words:
        if w in STOP_WORDS:
            stop += 1
            if stop == 2:
                break
    else:
        mask |= BIT["gopher_stop_words"]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        n = len(lines)
        if sum(1 for ln in lines if ln[0] in "•-*") / n > 0.9:
            mask |= BIT["gopher_bullet_lines"]
        if sum(1 for ln in lines if ln.endswith(("...", "\u2026"))) / n > 0.3:
            mask |= BIT["gopher_ellipsis_lines"]
        frac, chars = _dup_fraction(lines)
        if frac > 0.3 or chars > 0.2:
            mask |= BIT["gopher_dup_lines"]
        if sum(1 for ln in lines if ln.endswith(TERMINAL)) / n < 0.5:
            mask |= BIT["c4_terminal_punct"]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    frac, chars = _dup_fraction(paragraphs)
    if frac > 0.3 or chars > 0.2:
        mask |= BIT["gopher_dup_paragraphs"]
    if len(words) >= 2:
        wlen = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        total = int(wlen.sum())
        csum = np.concatenate(([0], np.cumsum(wlen)))
        for n, limit in TOP_NGRAM:
            h = ngram_hashes(wh, n)
            if len(h) < 2:
                break
            uniq, counts = np.unique(h, return_counts=True)
            top = int(np.argmax(counts))
            if counts[top] > 1:
                start = int(np.flatnonzero(h == uniq[top])[0])
                if (csum[start + n] - csum[start]) * int(counts[top]) / total > limit:
                    mask |= BIT["gopher_top_ngram"]
                    break
        for n, limit in DUP_NGRAM:
            h = ngram_hashes(wh, n)
            if len(h) < 2:
                break
            _, first, inv = np.unique(h, return_index=True, return_inverse=True)
            repeat = np.nonzero(first[inv] != np.arange(len(h)))[0]  # occurrences after the first
            if len(repeat) == 0:
                break  # no repeated n-gram: no repeated longer one either
            cover = np.zeros(len(words) + 1, dtype=np.int64)
            np.add.at(cover, repeat, 1)
            np.add.at(cover, repeat + n, -1)
            frac = int(wlen[np.cumsum(cover[:-1]) > 0].sum()) / total
            if frac > limit:
                mask |= BIT["gopher_dup_ngram"]
                break
            if frac <= DUP_NGRAM[-1][1]:
                break  # longer repeats cover no more than these: none can pass its (lower) limit
    low = text.lower()
    if "lorem ipsum" in low:
        mask |= BIT["c4_lorem_ipsum"]
    if "{" in text:
        mask |= BIT["c4_curly_bracket"]
    return mask
