"""Where an audit's documents come from: local files per split (`--data NAME=PATH`) or a run config.

Each split is streamed as `(pos, id, text, label, owned)` rows; `owned` says whether this shard
(`shard` of `num_shards`) computes the row's features. A split of several files is sharded by file (a
shard reads only its files); a single file or an in-memory split is sharded by row number.
Ids: the `id_column` when given; otherwise `<file>:<row>`, the same ids training gives the same files
(`llm_dist.data.sources.file_ids`: the file's path under the split's folder without extension, the
0-based record number), so an audit's leakage ids join with the run's splits.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ...data.sources import DataError, file_ids, iter_rows, resolve_files
from .config import AuditError

SPLIT_ORDER = ("train", "validation", "test")


@dataclass
class SplitSource:
    name: str
    where: str  # shown in messages: a path, or "CONFIG: data"
    files: list[Path] = field(default_factory=list)
    dataset: object = None  # a datasets.Dataset / IterableDataset (config mode)
    text_column: str = "text"
    label_column: str | None = "label"
    id_column: str | None = None
    label_explicit: bool = False

    def rows(self, shard: int = 0, num_shards: int = 1, all_rows: bool = False) -> Iterator[tuple]:
        """`(pos, id, text, label, owned)`; with `all_rows`, rows of other shards come too (owned=False)."""
        if self.dataset is not None:
            yield from self._dataset_rows(shard, num_shards, all_rows)
            return
        by_file = num_shards > 1 and len(self.files) >= num_shards
        prefixes = file_ids(self.files)
        extra = tuple(c for c in (self.label_column, self.id_column) if c)
        seen_label = None
        n = 0
        for fno, file in enumerate(self.files):
            file_owned = (fno % num_shards == shard) if by_file else True
            if by_file and not file_owned and not all_rows:
                continue
            rows = iter_rows(file, None, self.text_column, None, extra, id_prefix=prefixes[fno])
            for row, (where, rec) in enumerate(rows):
                if self.id_column:
                    if self.id_column not in rec:
                        raise DataError(f"{where}: no column '{self.id_column}'")
                    doc_id = str(rec[self.id_column])
                else:
                    doc_id = rec["id"]
                label = None
                if self.label_column:
                    if seen_label is None:
                        seen_label = self.label_column in rec
                        if not seen_label and self.label_explicit:
                            raise DataError(f"{where}: no column '{self.label_column}'")
                    if seen_label and rec.get(self.label_column) not in (None, ""):
                        label = str(rec[self.label_column])
                owned = file_owned if by_file else (n % num_shards == shard)
                if owned or all_rows:
                    yield ((fno << 40) | row, doc_id, rec["text"], label, owned)
                n += 1

    def _dataset_rows(self, shard: int, num_shards: int, all_rows: bool) -> Iterator[tuple]:
        n = 0
        for batch in self.dataset.iter(batch_size=1000):
            ids, texts = batch["id"], batch["text"]
            if batch.get("text_pair") is not None:  # a pair task: the pair is the example
                texts = [f"{a}\n{b}" for a, b in zip(texts, batch["text_pair"])]
            labels = batch.get("label") or [None] * len(ids)
            for doc_id, text, label in zip(ids, texts, labels):
                owned = n % num_shards == shard
                if owned or all_rows:
                    if not isinstance(text, str):
                        raise DataError(f"{self.where}: row {n + 1}: text is not a string ({type(text).__name__})")
                    yield (n, str(doc_id), text, None if label is None else str(label), owned)
                n += 1


# ----------------------------------------------------------------------------- specs
def file_spec(data: list[str], text_column: str, label_column: str | None, id_column: str | None,
              label_explicit: bool) -> dict:
    """`--data NAME=PATH …` → a serialisable spec (so shards and the merge open the same data)."""
    splits: dict[str, str] = {}
    for item in data:
        if "=" not in item:
            raise AuditError(f"--data {item}: expected NAME=PATH (e.g. train=data/train.jsonl)")
        name, path = item.split("=", 1)
        if name not in SPLIT_ORDER:
            raise AuditError(f"--data {item}: unknown split '{name}' (one of {', '.join(SPLIT_ORDER)})")
        if name in splits:
            raise AuditError(f"--data {item}: split '{name}' given twice")
        if not path:
            raise AuditError(f"--data {item}: empty path")
        splits[name] = str(Path(path).resolve()) if not any(c in path for c in "*?[") else os.path.abspath(path)
    if "train" not in splits:
        raise AuditError("--data: no train split (give --data train=PATH)")
    return {"mode": "files", "splits": splits, "text_column": text_column, "label_column": label_column,
            "id_column": id_column, "label_explicit": label_explicit}


def config_spec(path: str, overrides: list[str]) -> dict:
    return {"mode": "config", "config": str(Path(path).resolve()), "overrides": list(overrides)}


def open_sources(spec: dict) -> tuple[dict[str, SplitSource], dict]:
    """The splits of a spec (train first) and facts from a run config (tokenizer, max_length)."""
    if spec["mode"] == "files":
        out = {}
        for name in SPLIT_ORDER:
            if name in spec["splits"]:
                path = spec["splits"][name]
                out[name] = SplitSource(name, path, files=resolve_files(path), text_column=spec["text_column"],
                                        label_column=spec["label_column"], id_column=spec["id_column"],
                                        label_explicit=spec["label_explicit"])
        return out, {}
    return _config_sources(spec["config"], spec["overrides"])


def _config_sources(path: str, overrides: list[str]) -> tuple[dict[str, SplitSource], dict]:
    from ...config import load_config

    cfg = load_config(path, overrides)
    facts = {"max_length": cfg.data.max_length if cfg.task == "classify" else cfg.data.seq_len,
             "output_dir": cfg.output_dir, "task": cfg.task}
    where = f"{path}: data"
    if cfg.task == "classify":
        from ...data.classify import load_splits

        splits = load_splits(cfg)  # the run's seeded stratified split (nothing written)
        out = {}
        for name in SPLIT_ORDER:
            ds = splits.get(name)
            if ds is not None:
                out[name] = SplitSource(name, f"{where} ({name})", dataset=ds)
        if "train" not in out:
            raise AuditError(f"{path}: data: the config gives no train split")
        texts = lambda n: iter(splits["train"]["text"][:n] if n else splits["train"]["text"])  # noqa: E731
    else:
        # MLM: the sources as one corpus (no labels, no held-out split to check against)
        from ...data.sources import iter_texts

        out = {"train": SplitSource("train", f"{where}.sources", dataset=_Stream(cfg.data.sources))}
        texts = lambda n: iter_texts(cfg.data.sources, n)  # noqa: E731
    facts["tokenizer"], facts["tokenizer_name"] = _run_tokenizer(cfg, texts)
    return out, facts


class _Stream:
    """The MLM sources, batched like `datasets.Dataset.iter` (id, text)."""

    def __init__(self, sources):
        self.sources = sources

    def iter(self, batch_size: int):
        from ...data.sources import stream_source

        for src in self.sources:
            ids, texts = [], []
            for ex in stream_source(src):
                ids.append(ex["id"])
                texts.append(ex["text"])
                if len(ids) == batch_size:
                    yield {"id": ids, "text": texts}
                    ids, texts = [], []
            if ids:
                yield {"id": ids, "text": texts}


_TRAINED: dict[tuple, str] = {}


def _run_tokenizer(cfg, texts) -> tuple[str, str]:
    """(path, name) of the tokenizer a run uses: tokenizer.path, else the model dir, else the one the run
    trained (`output_dir/tokenizer`), else one trained here exactly as the run would (kept in a temp dir,
    not written into the run)."""
    from ...models.build import tokenizer_source

    cand, key = tokenizer_source(cfg)
    if cand:
        if not Path(cand).is_dir():
            what = "tokenizer" if key == "tokenizer.path" else "model"
            raise AuditError(f"config key '{key}': {cand}: {what} dir not found")
        return cand, cand
    trained = Path(cfg.output_dir) / "tokenizer"
    if (trained / "tokenizer.json").exists():
        return str(trained), str(trained)
    t = cfg.tokenizer
    name = f"WordPiece (vocab {t.vocab_size}) trained as the run would train it (not saved)"
    key = (cfg.task, str(cfg.data.sources), cfg.data.train, t.vocab_size, t.lowercase, t.train_documents, cfg.seed)
    if key not in _TRAINED:
        import atexit
        import shutil
        import tempfile

        from ...models.build import train_wordpiece

        tmp = tempfile.mkdtemp(prefix="audit-tokenizer-")
        atexit.register(shutil.rmtree, tmp, True)
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)  # the tokenizers trainer draws its progress on stdout: keep stdout for results
        try:
            tok = train_wordpiece(texts(t.train_documents), t.vocab_size, t.lowercase)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tok.save_pretrained(tmp)
        _TRAINED[key] = tmp
    return _TRAINED[key], name
