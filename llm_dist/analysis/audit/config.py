"""Audit settings: one small dataclass, serialised into every partial and into `audit.json`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...data.sources import DataError


class AuditError(DataError):
    """Bad audit input: the message names the file / key and what is wrong (a DataError, so callers that
    report data errors on one line, like the trainer, report these too)."""


@dataclass
class AuditConfig:
    near_threshold: float = 0.8  # MinHash-estimated Jaccard of word 5-gram shingles
    num_perm: int = 128  # MinHash permutations
    shingle_size: int = 5  # words per shingle (near duplicates)
    ngram_size: int = 13  # words per n-gram (leakage, as GPT-3 / lm-eval decontamination)
    ngram_threshold: float = 0.0  # a test example leaks when more than this fraction of its n-grams is in train
    min_words: int = 50  # Gopher word-count bounds
    max_words: int = 100_000
    nonletter_threshold: float = 0.3  # flag texts whose non-space characters are more than this share non-letters
    max_length: int | None = None  # the run's max sequence length (tokens): count texts that get truncated
    max_examples: int = 10  # example ids kept per flag in audit.json (flags.jsonl has them all)
    max_train_ids: int = 50  # train ids listed per leakage entry (best matches first)
    seed: int = 1  # MinHash permutation seed
    # CJK documents (text.is_cjk: at least half their units are Han/kana characters) are cut into characters,
    # so their sizes are in characters: 20 characters ~ 13 Chinese words (~1.5 characters a word); a 3-character
    # shingle ~ 2 words. On the Chinese fixture (the project's article, 79 paragraphs of 44-251 characters) an
    # edit of 3% of the characters keeps the 3-shingle Jaccard >= 0.72 while the closest two distinct
    # paragraphs are at 0.46: hence 0.7 (CJK and spaced documents sit in separate LSH indexes).
    cjk_shingle_size: int = 3
    cjk_ngram_size: int = 20
    cjk_near_threshold: float = 0.7

    def validate(self) -> "AuditConfig":
        if not 0.0 < self.near_threshold <= 1.0:
            raise AuditError(f"--near_threshold: must be in (0, 1], got {self.near_threshold}")
        if not 0.0 < self.cjk_near_threshold <= 1.0:
            raise AuditError(f"--cjk_near_threshold: must be in (0, 1], got {self.cjk_near_threshold}")
        if not 0.0 <= self.ngram_threshold < 1.0:
            raise AuditError(f"--ngram_threshold: must be in [0, 1), got {self.ngram_threshold}")
        for key in ("num_perm", "shingle_size", "ngram_size", "max_train_ids", "cjk_shingle_size", "cjk_ngram_size"):
            if getattr(self, key) < 1:
                raise AuditError(f"--{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_length is not None and self.max_length < 1:
            raise AuditError(f"--max_length: must be >= 1, got {self.max_length}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AuditConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
