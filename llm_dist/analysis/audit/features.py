"""Per-document features: everything later stages need, computed in one pass over the text.

A worker turns a batch of documents into columns (hash, MinHash signature, token count, profile / quality
/ PII flags) plus, for train documents, the eval examples whose n-grams they contain. Only these columns
are kept; texts are dropped as soon as a batch is done, so memory grows with the number of documents
(~`num_perm`·4 bytes each), not with the corpus size.
"""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import numpy as np
from datasketch import MinHash

from .config import AuditConfig, AuditError
from .pii import KINDS as PII_KINDS, pii_counts
from .quality import quality_flags
from .text import (SCRIPTS, coverage_counts, exact_hash, has_cjk, is_cjk, ngram_hashes, norm_units,
                   shingle_hashes32, word_hashes)

PROFILE_FLAGS = ("empty", "near_empty", "high_nonletter", "replacement_char", "mojibake", "control_chars")
PBIT = {name: 1 << i for i, name in enumerate(PROFILE_FLAGS)}
_DIGIT = re.compile(r"\d")
# datasketch >= 2.0: the bijective 32-bit permutation scheme; 1.x only has the legacy one (same API else)
MINHASH_KW = {"scheme": "affine32"} if "scheme" in inspect.signature(MinHash.__init__).parameters else {}
# UTF-8 read as Latin-1/cp1252: 'Ã©', 'â€™', 'Â ' …
_MOJIBAKE = re.compile("(?:\u00c3[\u0080-\u00bf\u0152-\u0178\u2018-\u203a]|\u00e2\u20ac[\u0080-\u00bf\u2018-\u203a\u2122\u0153\u017e\u02dc\u0161\u0153\u201c\u009d]|\u00c2[\u00a0-\u00bf])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# cjk: 1 when the document is shingled by characters (text.is_cjk); tok_/unk_<script>: tokens and unknown
# tokens of each script (tokenizer coverage; zero without a tokenizer that gives offsets)
COLUMNS = ("pos", "id", "label", "n_chars", "n_words", "n_tokens", "hash", "sig", "qflags", "pflags",
           "nonletter", "ngram_total", "cjk") + tuple(f"pii_{k}" for k in PII_KINDS) \
    + tuple(f"{p}_{s}" for s in SCRIPTS for p in ("tok", "unk"))


def profile_flags(text: str, raw: list[str], words: list[str], nonletter_threshold: float,
                  cjk: bool = False) -> tuple[int, float]:
    """Profile flags and the non-letter share of the non-space characters. `raw`: whitespace words;
    `words`: the normalised units (`text.norm_units`: `\\w+` words, CJK characters one by one; letters =
    their characters less digits and underscores). A CJK document is near-empty below 3 units (characters),
    not 3 whitespace words (it has none)."""
    if not raw:
        return PBIT["empty"], 0.0
    mask = 0
    nonspace = sum(map(len, raw))
    if (len(words) if cjk else len(raw)) < 3 or nonspace < 10:
        mask |= PBIT["near_empty"]
    letters = sum(map(len, words)) - len(_DIGIT.findall(text)) - text.count("_")
    ratio = max(0.0, 1.0 - letters / nonspace)
    if ratio > nonletter_threshold:
        mask |= PBIT["high_nonletter"]
    if "\ufffd" in text:
        mask |= PBIT["replacement_char"]
    if _MOJIBAKE.search(text):
        mask |= PBIT["mojibake"]
    if _CONTROL.search(text):
        mask |= PBIT["control_chars"]
    return mask, ratio


# ----------------------------------------------------------------------------- tokenizer
class TokenCounter:
    """Counts tokens with the run's tokenizer (a `tokenizer.json` dir or any `AutoTokenizer` dir),
    or whitespace words when there is none (a text with CJK characters: its units, `text.norm_units`, since
    it has no spaces). `encode` also gives each text's tokens and unknown tokens per script (coverage)."""

    def __init__(self, path: str | None):
        self.path = path
        self.name = "whitespace words (no tokenizer given)" if path is None else str(path)
        self._fast = self._hf = None
        self.unk_id, self.special = None, set()
        if path is None:
            return
        p = Path(path)
        try:
            if (p / "tokenizer.json").is_file() or p.suffix == ".json":
                from tokenizers import Tokenizer

                self._fast = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
                self._fast.no_truncation()
                self._fast.no_padding()
                model = self._fast.model
                unk = getattr(model, "unk_token", None)
                self.unk_id = self._fast.token_to_id(unk) if isinstance(unk, str) else None
                self.special = {self._fast.token_to_id(t.content) for t in self._fast.get_added_tokens_decoder().values()
                                if t.special} - {self.unk_id, None}
            else:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(str(p))
                self.unk_id = self._hf.unk_token_id
                self.special = set(self._hf.all_special_ids) - {self.unk_id}
        except Exception as e:  # noqa: BLE001 - any load failure is a bad path for the user
            raise AuditError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None

    def __call__(self, texts: list[str]) -> list[int]:
        return [n for n, _ in self.encode(texts)]

    def encode(self, texts: list[str]) -> list[tuple[int, dict | None]]:
        """(token count, {script: [tokens, unknown]} or None without offsets) per text."""
        if self._fast is not None:
            return [(len(e.ids), coverage_counts(t, e.ids, e.offsets, self.unk_id, self.special))
                    for t, e in zip(texts, self._fast.encode_batch(texts))]
        if self._hf is not None:
            fast = getattr(self._hf, "is_fast", False)
            enc = self._hf(texts, add_special_tokens=True, truncation=False, return_offsets_mapping=fast)
            if not fast:
                return [(len(ids), None) for ids in enc["input_ids"]]
            return [(len(ids), coverage_counts(t, ids, offs, self.unk_id, self.special))
                    for t, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"])]
        return [(len(norm_units(t)) if has_cjk(t) else len(t.split()), None) for t in texts]


# ----------------------------------------------------------------------------- worker state
_STATE: dict = {}


def permutations(cfg: AuditConfig) -> np.ndarray:
    return MinHash(num_perm=cfg.num_perm, seed=cfg.seed, **MINHASH_KW).permutations


def init_worker(cfg_dict: dict, tokenizer_path: str | None, index: tuple | None) -> None:
    """Set up a worker (or the main process): config, tokenizer, MinHash permutations, eval n-gram index."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = AuditConfig.from_dict(cfg_dict)
    _STATE.update(cfg=cfg, tok=TokenCounter(tokenizer_path), perms=permutations(cfg), index=index)


def _ident(x):
    return x


def sizes(cfg: AuditConfig, cjk: bool) -> tuple[int, int]:
    """(shingle size, n-gram size) of a document: in words for spaced scripts, characters for CJK ones."""
    return (cfg.cjk_shingle_size, cfg.cjk_ngram_size) if cjk else (cfg.shingle_size, cfg.ngram_size)


def doc_units(text: str, cfg: AuditConfig) -> tuple[list[str], np.ndarray, bool]:
    units = norm_units(text)
    return units, word_hashes(units), is_cjk(units)


def eval_grams(text: str, cfg: AuditConfig) -> np.ndarray:
    """An evaluation document's distinct n-gram hashes (at its own script's n-gram size)."""
    _, wh, cjk = doc_units(text, cfg)
    return np.unique(ngram_hashes(wh, sizes(cfg, cjk)[1]))


def doc_features(text: str, cfg: AuditConfig, perms) -> tuple[dict, np.ndarray, np.ndarray]:
    """One document's features, its distinct n-gram hashes at its own n-gram size (the denominator of its
    leakage score) and the hashes to match against the evaluation index: a document holding CJK characters
    also brings its n-grams at the other script's size, so a mixed train document meets a test document of
    either script."""
    words, wh, cjk = doc_units(text, cfg)
    shingle, n = sizes(cfg, cjk)
    m = MinHash(num_perm=cfg.num_perm, hashfunc=_ident, permutations=perms, **MINHASH_KW)
    sh = shingle_hashes32(wh, shingle)
    if len(sh):
        m.update_batch(sh)
    raw = text.split()
    n_words = len(words) if cjk else len(raw)
    pflags, nonletter = profile_flags(text, raw, words, cfg.nonletter_threshold, cjk)
    pii = pii_counts(text)
    feats = {
        "n_chars": len(text), "n_words": n_words, "hash": exact_hash(text), "sig": m.hashvalues,
        "qflags": quality_flags(text, words, wh, cfg.min_words, cfg.max_words, raw, cjk=cjk), "pflags": pflags,
        "nonletter": nonletter, "cjk": int(cjk), **{f"pii_{k}": v for k, v in pii.items()},
    }
    grams = np.unique(ngram_hashes(wh, n))
    match = grams
    other = sizes(cfg, not cjk)[1]
    if other != n and has_cjk(text):
        match = np.union1d(grams, ngram_hashes(wh, other))
    return feats, grams, match


def process_batch(args: tuple) -> tuple[dict, list]:
    """Worker task. `args` = (is_train, batch of (pos, id, text, label, owned)).

    Returns (columns of the owned documents, extra) where extra is, for eval splits, the distinct
    n-gram hashes of every document in the batch (owned or not: each shard needs the whole eval index),
    and for train, `(train_id, eval_owner_ids, matched_hashes)` for documents sharing n-grams with eval."""
    is_train, batch = args
    cfg, perms, index = _STATE["cfg"], _STATE["perms"], _STATE["index"]
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    extra: list = []
    owned = [r for r in batch if r[4]]
    tokens = _STATE["tok"].encode([r[2] for r in owned]) if owned else []
    t_iter = iter(tokens)
    for pos, doc_id, text, label, is_owned in batch:
        if not is_owned:
            if not is_train:
                extra.append(eval_grams(text, cfg))
            continue
        feats, grams, match = doc_features(text, cfg, perms)
        cols["pos"].append(pos)
        cols["id"].append(doc_id)
        cols["label"].append(label)
        n_tok, cov = next(t_iter)
        cols["n_tokens"].append(n_tok)
        for sc in SCRIPTS:
            cols[f"tok_{sc}"].append(cov[sc][0] if cov else 0)
            cols[f"unk_{sc}"].append(cov[sc][1] if cov else 0)
        cols["ngram_total"].append(len(grams))
        for k, v in feats.items():
            cols[k].append(v)
        if not is_train:
            extra.append(grams)
        elif index is not None and len(match):
            ng_hash, ng_owner = index
            lo = np.searchsorted(ng_hash, match, "left")
            hi = np.searchsorted(ng_hash, match, "right")
            hit = hi > lo
            if hit.any():
                owners = np.concatenate([ng_owner[a:b] for a, b in zip(lo[hit], hi[hit])])
                hashes = np.repeat(match[hit], (hi - lo)[hit])
                extra.append((doc_id, owners, hashes))
    return cols, extra
