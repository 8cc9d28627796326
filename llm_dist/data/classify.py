"""The classification data path: files or a built-in source → train/validation/test (given, or a seeded
stratified split written to `output_dir/splits/`) → labels checked and numbered → tokenized once (no
padding) → global batches that are the same for any world size → this rank's share, padded per batch.

Every example keeps its stable `id` from the source to predictions.jsonl, so later analysis (leakage,
training dynamics) can key on it."""
from __future__ import annotations

import math
from pathlib import Path

import datasets
import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..config import RunConfig, SourceConfig, write_text_atomic
from .interventions import active, apply as apply_interventions
from .sources import DataError, load_table, source_table

SPLITS = ("train", "validation", "test")


def _split_names(cfg: RunConfig) -> dict[str, str]:
    return {s: getattr(cfg.data, s) for s in SPLITS if getattr(cfg.data, s)}


def _stratified(ds: datasets.Dataset, fractions: dict[str, float], seed: int,
                where: str) -> dict[str, datasets.Dataset]:
    """Cut `ds` into splits of the given fractions (summing to 1), stratified by label, seeded."""
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    labels = np.array(list(ds["label"]))
    rest, left, out = np.arange(len(ds)), 1.0, {}
    for s in names[:-1]:
        try:
            take, rest = train_test_split(rest, train_size=fractions[s] / left, random_state=seed,
                                          stratify=labels[rest])
        except ValueError as e:  # too few examples (of some class) for the fractions asked
            why = str(e).splitlines()[0]
            raise DataError(f"{where}: cannot cut a stratified {'/'.join(names)} split (config key 'data.split') "
                            f"from {len(ds)} examples with {len(set(labels))} labels: {why}") from None
        out[s], left = take, left - fractions[s]
    out[names[-1]] = rest
    return {s: ds.select(sorted(v.tolist())) for s, v in out.items()}


def load_splits(cfg: RunConfig, write_to: str | Path | None = None, *, pinned: str | Path | None = None,
                min_train: int = 0, for_training: bool = False) -> dict[str, datasets.Dataset]:
    """train / validation / test as Datasets with columns id, text, [text_pair], label (label names).

    Files named in `data.train|validation|test` are used as given; a split that is missing is cut from
    train (or from the first of `data.sources`) by a seeded stratified split. Everything is checked
    before anything is written: validation/test labels are seen in train, train holds at least
    `min_train` examples (one global batch) and, `for_training`, at least two classes and a validation or
    test split exists (an audit reads any split). Split ids already written in `pinned` (default:
    `write_to`; a resumed run) are reused; when `write_to` is given the ids of each split are then written
    there (`splits/train.txt` …, atomically)."""
    d = cfg.data
    files = _split_names(cfg)
    if "train" in files:
        given = {s: _named(f"data.{s}", load_table, p, d.text_column, d.label_column, d.id_column,
                           d.text_pair_column, with_where=True)
                 for s, p in files.items()}
        train_where = files["train"]
    else:
        if not d.sources:
            raise DataError("config key 'data.train': no training data (set data.train or data.sources)")
        src: SourceConfig = d.sources[0]
        table = _named("data.sources.0.path", source_table, src, d.label_column, d.text_pair_column)
        given = {"train": table}
        train_where = src.path or f"data source '{src.name}'"
    classes = sorted(set(given["train"]["label"]))
    if for_training and len(classes) < 2:
        raise DataError(f"{train_where}: column '{d.label_column}' has a single class ({classes[0]!r}): "
                        "classification needs at least 2")
    missing = [s for s in SPLITS if s not in given]
    if missing:  # cut the missing splits from train, in the proportions of data.split
        frac = dict(zip(SPLITS, list(d.split) + [0.0] * (3 - len(d.split))))
        want = {s: frac[s] for s in ["train", *missing] if frac[s] > 0}
        total = sum(want.values())
        seed = cfg.seed if d.split_seed is None else d.split_seed
        given.update(_stratified(given.pop("train"), {s: f / total for s, f in want.items()}, seed, train_where))
    splits = {s: given[s] for s in SPLITS if s in given}
    if for_training and "validation" not in splits and "test" not in splits:
        raise DataError(f"config key 'data.split': {d.split} leaves no validation or test split to evaluate on "
                        "(give data.validation / data.test, or a split such as [0.8, 0.1, 0.1])")
    pinned = write_to if pinned is None else pinned
    if pinned is not None:
        splits = _reuse_pinned(splits, Path(pinned))
    _check_labels(splits, files)
    if d.label_noise.rate > 0 or active(d):  # training split only: subset … noise … audit filter
        splits = apply_interventions(cfg, splits, _with_noise)
    if len(splits["train"]) < min_train:
        raise DataError(f"{train_where}: the train split has {len(splits['train'])} examples, fewer than one global "
                        f"batch ({min_train} = batch_size × grad_accum × processes)")
    splits = {s: ds.remove_columns("where") if "where" in ds.column_names else ds for s, ds in splits.items()}
    if write_to is not None:
        write_splits(splits, Path(write_to))
    return splits


def _named(key: str, fn, *args, **kwargs):
    """`fn(...)`, with a missing data file reported under the config key that names it."""
    try:
        return fn(*args, **kwargs)
    except DataError as e:
        if str(e).endswith(": no data files found"):
            raise DataError(f"config key '{key}': {e}") from None
        raise


def _reuse_pinned(splits: dict, root: Path) -> dict:
    """Reuse the ids an earlier start of this run wrote (so a resumed run sees the same split); reads only."""
    out = dict(splits)
    for s, ds in splits.items():
        f = root / f"{s}.txt"
        if f.is_file():
            want = f.read_text().split("\n")[:-1]
            pos = {i: k for k, i in enumerate(list(ds["id"]))}
            if all(w in pos for w in want) and len(want) == len(ds):
                out[s] = ds.select([pos[w] for w in want])
    return out


def write_splits(splits: dict, root: Path) -> None:
    """Each split's ids, one a line, written atomically (a file that already holds them is left alone)."""
    root.mkdir(parents=True, exist_ok=True)
    for s, ds in splits.items():
        f = root / f"{s}.txt"
        text = "".join(f"{i}\n" for i in ds["id"])
        if f.is_file() and f.read_text() == text:
            continue
        write_text_atomic(f, text)


def _check_labels(splits: dict, files: dict) -> None:
    seen = set(splits["train"]["label"])
    for s in ("validation", "test"):
        if s not in splits:
            continue
        ds = splits[s]
        wheres = ds["where"] if "where" in ds.column_names else None
        for i, lab in enumerate(ds["label"]):
            if lab not in seen:
                where = wheres[i] if wheres is not None else f"{files.get(s, s)}: row {i + 1}"
                raise DataError(f"{where}: label '{lab}' never seen in train")


def label_maps(train: datasets.Dataset) -> tuple[dict, dict]:
    names = sorted(set(train["label"]))
    label2id = {n: i for i, n in enumerate(names)}
    return label2id, {i: n for n, i in label2id.items()}


def tokenize_split(ds: datasets.Dataset, tokenizer, label2id: dict, max_length: int, truncation: str = "head",
                   head_fraction: float = 0.25) -> dict:
    """Token ids per example (truncated, unpadded), label ids and stable ids, as plain lists.

    `truncation` says which tokens of a long text survive (`data.truncation`): `head` the first (the
    tokenizer's own truncation), `tail` the last, `head_tail` the first `head_fraction` of the budget and
    the last of the rest (Sun et al. 2019, "How to fine-tune BERT for text classification": head+tail
    beat both on long IMDb reviews)."""
    pairs = list(ds["text_pair"]) if "text_pair" in ds.column_names else None
    if truncation == "head" or max_length < 3:
        enc = tokenizer(list(ds["text"]), pairs, truncation=True, max_length=max_length, return_token_type_ids=True)
        input_ids, types = enc["input_ids"], enc.get("token_type_ids")
    else:
        if pairs is not None:
            raise DataError(f"config key 'data.truncation': {truncation!r} needs single texts (this data has "
                            "text pairs; use head)")
        first = [t for t in (tokenizer.cls_token_id,) if t is not None]  # a BERT encoder: [CLS] … [SEP]
        last = [t for t in (tokenizer.sep_token_id,) if t is not None]
        budget = max_length - len(first) - len(last)
        head = round(budget * head_fraction) if truncation == "head_tail" else 0
        raw = tokenizer(list(ds["text"]), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        input_ids = []
        for ids in raw:
            if len(ids) > budget:
                ids = ids[:head] + ids[len(ids) - (budget - head):]
            input_ids.append(first + ids + last)
        types = [[0] * len(x) for x in input_ids]
    return {"input_ids": input_ids, "token_type_ids": types,
            "labels": [label2id[x] for x in ds["label"]], "ids": list(ds["id"]),
            "lengths": [len(x) for x in input_ids]}


class GlobalBatches:
    """The order of training examples, independent of the world size and of gradient accumulation.

    Each epoch has one *global order* of the training examples: a seeded permutation (or class-balanced
    resampling with replacement), optionally grouped by length — sorted inside mega-chunks of 16
    micro-batches, cut into micro-batches, those shuffled (as HF's LengthGroupedSampler does; small chunks,
    since length correlates with the label). None of it depends on the world size or `grad_accum`, only on
    the seed, the epoch, `batch_size` and the switches. Each optimizer step consumes the next
    `batch_size × grad_accum × world_size` examples of that order (its *global batch*); rank r's
    micro-batch i is slice `(i × world + r)`, each micro-batch one length group. (Ranks then hold
    different lengths in a step; but a DDP step waits for its longest micro-batch either way, and mixing
    lengths across micro-batches would pad every one of them to it.) The position is
    (epoch, examples consumed in the epoch), so a run resumed on another world size continues right after
    the last consumed example: over an epoch every example is seen exactly once, none twice.

    The last global batch of an epoch may be partial (`drop_last: false`, the default, as the article's
    loop): its examples are spread over the micro-batches in order, and a micro-batch left with none is
    an empty index array (`Collate` turns it into one zero-weight padding example, so every rank still
    runs its forward/backward)."""

    MEGA = 16  # micro-batches per length-sorted mega-chunk (small: length correlates with the label)

    def __init__(self, lengths: list[int], labels: list[int], global_batch: int, micro: int, rank: int,
                 world: int, seed: int, group_by_length: bool, resample: bool, drop_last: bool = False):
        self.lengths, self.labels = np.asarray(lengths), np.asarray(labels)
        self.G, self.micro, self.rank, self.world, self.seed = global_batch, micro, rank, world, seed
        self.group, self.resample, self.drop_last = group_by_length, resample, drop_last
        if len(lengths) < global_batch:
            raise DataError(f"the train split has {len(lengths)} examples, fewer than one global batch ({global_batch})")
        n = len(lengths)
        self.epoch_len = (n // global_batch) * global_batch if drop_last else n
        self.steps_per_epoch = math.ceil(self.epoch_len / global_batch)
        self.epoch, self.consumed = 0, 0
        self._order = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        if self.resample:  # each class equally likely: weight 1 / class count
            counts = np.bincount(self.labels)
            w = 1.0 / counts[self.labels]
            order = rng.choice(n, size=n, replace=True, p=w / w.sum())
        else:
            order = rng.permutation(n)
        if self.group:
            mega = self.micro * self.MEGA
            chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
            groups = [order[i:i + self.micro] for i in range(0, len(order), self.micro)]
            order = np.concatenate([groups[i] for i in rng.permutation(len(groups))])
        return order[: self.epoch_len]

    def step_indices(self) -> list[np.ndarray]:
        """This rank's micro-batches for the next optimizer step (some possibly empty at the end of an
        epoch); advances the position."""
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        g = self._order[self.consumed:self.consumed + self.G]
        accum = self.G // (self.micro * self.world)
        out = [g[(i * self.world + self.rank) * self.micro:(i * self.world + self.rank + 1) * self.micro]
               for i in range(accum)]
        self.consumed += len(g)
        if self.consumed >= self.epoch_len:
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.consumed, self._order = st["epoch"], st["consumed"], None


class Collate:
    """Pad a list of example indices to the longest in the batch (or to max_length, the seed recipe)."""

    def __init__(self, split: dict, pad_id: int, pad_to: int | None = None):
        self.split, self.pad_id, self.pad_to = split, pad_id, pad_to

    def __call__(self, indices) -> dict:
        """A batch of `indices` with `weight` 1 each; an empty list gives one padding example of weight 0
        (a rank whose micro-batch the end of an epoch left empty still runs forward/backward with it)."""
        indices = [int(i) for i in indices]
        weight = [1.0] * len(indices)
        if not indices:
            indices, weight = [0], [0.0]
        seqs = [self.split["input_ids"][i] for i in indices]
        L = self.pad_to or max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        types = torch.zeros((len(seqs), L), dtype=torch.long)
        tt = self.split.get("token_type_ids")
        for r, (i, s) in enumerate(zip(indices, seqs)):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            if tt is not None:
                types[r, :len(s)] = torch.tensor(tt[i])
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                "labels": torch.tensor([self.split["labels"][i] for i in indices]),
                "idx": torch.tensor(indices), "weight": torch.tensor(weight)}


def eval_order(lengths: list[int]) -> list[int]:
    """Evaluation in length order: less padding, and the order does not change any metric."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def steps_for(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps for `epochs` (0 epochs: evaluate only)."""
    return max(0, math.ceil(epochs * steps_per_epoch))


def _with_noise(train: datasets.Dataset, noise) -> datasets.Dataset:
    """`train` with labels flipped by `data.label_noise`; the flips ride along in `train.info.description`
    as JSON (read back by `planted_noise`) so the task can write `noise.json` with the splits."""
    import json

    from .noise import flip_labels

    names = sorted(set(train["label"]))
    noisy, flipped = flip_labels(list(train["id"]), list(train["label"]), names, noise.rate, noise.kind, noise.seed)
    out = train.remove_columns("label").add_column("label", noisy)
    out.info.description = json.dumps({"flipped": flipped})
    return out


def planted_noise(train: datasets.Dataset) -> list[dict] | None:
    import json

    try:
        return json.loads(train.info.description or "")["flipped"]
    except (ValueError, KeyError, TypeError):
        return None
