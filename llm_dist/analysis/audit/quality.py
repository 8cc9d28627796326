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

CJK documents (`text.is_cjk`: Chinese / Japanese, no spaces between words) get per-script definitions,
since a Chinese paragraph is one whitespace "word":

| rule                    | for a CJK document                                                          |
|-------------------------|-----------------------------------------------------------------------------|
| gopher_word_count       | units (each CJK character one, other words one each) outside [min_words, max_words] |
| gopher_mean_word_length | not applied (a unit is one character by construction)                     |
| gopher_symbol_ratio     | '#' or ellipses ('...', '…') per unit above 0.1                             |
| gopher_bullet_lines     | as above, bullets also '·', '●', '○', '■', '□', '◆', '◇', '▪', '※'          |
| gopher_alpha_words      | fewer than 80% of the tokens (units and runs of punctuation/symbols) hold a letter (a CJK character is one) |
| gopher_stop_words       | fewer than 2 of the Chinese function characters in `CJK_STOP_WORDS` (的, 了, 是, 在, 和, …) |
| gopher_top_ngram        | on characters, n doubled (~1.5-2 characters a Chinese word): 4/6/8-grams above 20/18/16% |
| gopher_dup_ngram        | on characters, n doubled: repeated 10..20-grams cover > 15..10% of the characters |
| c4_terminal_punct       | terminal punctuation also '。', '！', '？', '」', '』', '…'                      |

The line/paragraph duplication rules, lorem ipsum and '{' are the same for every script.
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
# Chinese function characters (the most frequent of a stop-word list such as HIT's / Baidu's, one character
# each since a CJK document's units are characters): like Gopher's 8 English ones, any real sentence has some
CJK_STOP_WORDS = frozenset("的了是在和与及也就都而这有对为不以中上把被从到将")
CJK_TOP_NGRAM = ((4, 0.20), (6, 0.18), (8, 0.16))
CJK_DUP_NGRAM = ((10, 0.15), (12, 0.14), (14, 0.13), (16, 0.12), (18, 0.11), (20, 0.10))
CJK_TERMINAL = TERMINAL + ("\u3002", "\uff01", "\uff1f", "\u300d", "\u300f", "\u2026", "\uff0e")
CJK_BULLETS = "•-*·●○■□◆◇▪※"
_PUNCT_RUN = re.compile(r"[^\w\s]+")


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
                  max_words: int = 100_000, raw: list[str] | None = None, cjk: bool = False) -> int:
    """Bit mask of the rules (see `RULES`) this document trips. `words`/`wh`: its normalised units
    (`text.norm_units`) and their hashes (shared with the dedup stage, so they are computed once); `cjk`:
    the document is CJK (`text.is_cjk`), whose rules are defined on characters (module docstring)."""
    mask = 0
    raw = text.split() if raw is None else raw
    if cjk:
        n_units = len(words)
        if not min_words <= n_units <= max_words:
            mask |= BIT["gopher_word_count"]
        if n_units:
            if max(text.count("#"), text.count("...") + text.count("\u2026")) / n_units > 0.1:
                mask |= BIT["gopher_symbol_ratio"]
            alpha = sum(1 for w in words if any(c.isalpha() for c in w))
            if alpha / (n_units + len(_PUNCT_RUN.findall(text))) < 0.8:
                mask |= BIT["gopher_alpha_words"]
        stop_words, top_ngram, dup_ngram, terminal, bullets = (CJK_STOP_WORDS, CJK_TOP_NGRAM, CJK_DUP_NGRAM,
                                                               CJK_TERMINAL, CJK_BULLETS)
    else:
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
        stop_words, top_ngram, dup_ngram, terminal, bullets = STOP_WORDS, TOP_NGRAM, DUP_NGRAM, TERMINAL, "•-*"
    stop = 0
    for w in words:
        if w in stop_words:
            stop += 1
            if stop == 2:
                break
    else:
        mask |= BIT["gopher_stop_words"]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        n = len(lines)
        if sum(1 for ln in lines if ln[0] in bullets) / n > 0.9:
            mask |= BIT["gopher_bullet_lines"]
        if sum(1 for ln in lines if ln.endswith(("...", "\u2026"))) / n > 0.3:
            mask |= BIT["gopher_ellipsis_lines"]
        frac, chars = _dup_fraction(lines)
        if frac > 0.3 or chars > 0.2:
            mask |= BIT["gopher_dup_lines"]
        if sum(1 for ln in lines if ln.endswith(terminal)) / n < 0.5:
            mask |= BIT["c4_terminal_punct"]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    frac, chars = _dup_fraction(paragraphs)
    if frac > 0.3 or chars > 0.2:
        mask |= BIT["gopher_dup_paragraphs"]
    if len(words) >= 2:
        wlen = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        total = int(wlen.sum())
        csum = np.concatenate(([0], np.cumsum(wlen)))
        for n, limit in top_ngram:
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
        for n, limit in dup_ngram:
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
            if frac <= dup_ngram[-1][1]:
                break  # longer repeats cover no more than these: none can pass its (lower) limit
    low = text.lower()
    if "lorem ipsum" in low:
        mask |= BIT["c4_lorem_ipsum"]
    if "{" in text:
        mask |= BIT["c4_curly_bracket"]
    return mask
