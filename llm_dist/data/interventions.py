"""Interventions on the training split: the knobs of the article's claims about data, each a config key, so
any run (and every variant of `llm-dist experiment`) can turn them, and each recorded in the run's
`interventions.json` and `run.json`.

Applied by `load_splits` to the training split, in this order (validation / test are never changed):

1. `data.subset`       nested, stratified subset (fraction, count, or k per class)
2. `data.imbalance`    subsample classes to a target imbalance ratio (step or exponential profile)
3. `data.label_noise`  planted label noise (data/noise.py)
4. `data.filter`       remove by an ids file (counterfactual removal) or a seeded random fraction (its control)
5. `data.duplicates`   copy a fraction of train (exact or lightly edited), ids `ID#dupK`
6. `data.contamination` copy a fraction of test (or validation) into train, ids `ID#leak`
7. `data.filter`       decontaminate / dedup / quality: an in-process audit of the splits as they now are

Every choice is a function of (seed, id) — not of row order, world size or fold — so a rank, a resumed run,
and another variant with the same seed make exactly the same choice: variants of an experiment pair by
seed. Subsets are nested: examples are ranked once (per class, by a hash of (seed, id)) and interleaved
across classes by their within-class quantile, so the 10% subset is the first 10% of the order that also
gives the 25% subset, and every prefix keeps the class proportions (to within one example per class).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import datasets

from .noise import _unit
from .sources import DataError


# ----------------------------------------------------------------------------- orders
def class_orders(ids: list[str], labels: list[str], seed: int, salt: str) -> dict[str, list[int]]:
    """Per class, its row indices ranked by a hash of (seed, id)."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by[lab].append(i)
    return {lab: sorted(rows, key=lambda i: (_unit(seed, ids[i], salt), ids[i])) for lab, rows in sorted(by.items())}


def nested_order(ids: list[str], labels: list[str], seed: int) -> list[int]:
    """All row indices in the nested, stratified order: the member of rank r in a class of n gets the key
    (r + 0.5) / n, and rows are sorted by key (ties by class name), so any prefix holds each class in
    proportion to its size."""
    keyed = []
    for lab, rows in class_orders(ids, labels, seed, "subset").items():
        n = len(rows)
        keyed.extend(((r + 0.5) / n, lab, i) for r, i in enumerate(rows))
    keyed.sort()
    return [i for _, _, i in keyed]


def _select(ds: datasets.Dataset, rows) -> datasets.Dataset:
    """`ds` restricted to `rows`, in the split's own order (the choice must not reorder the data)."""
    return ds.select(sorted(int(i) for i in rows))


def _counts(labels) -> dict:
    out: dict[str, int] = defaultdict(int)
    for lab in labels:
        out[lab] += 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- 1. subset
def subset(ds: datasets.Dataset, cfg, seed: int) -> tuple[datasets.Dataset, dict | None]:
    ids, labels = list(ds["id"]), list(ds["label"])
    n = len(ids)
    if cfg.per_class > 0:
        orders = class_orders(ids, labels, seed, "subset")
        rows = [i for lab, r in orders.items() for i in r[:cfg.per_class]]
        how = {"per_class": cfg.per_class}
    elif cfg.count > 0:
        if cfg.count > n:
            raise DataError(f"config key 'data.subset.count': {cfg.count} is more than the {n} training examples")
        rows = nested_order(ids, labels, seed)[:cfg.count]
        how = {"count": cfg.count}
    elif cfg.fraction < 1.0:
        rows = nested_order(ids, labels, seed)[:max(1, round(cfg.fraction * n))]
        how = {"fraction": cfg.fraction}
    else:
        return ds, None
    out = _select(ds, rows)
    return out, {**how, "seed": seed, "kept": len(out), "of": n, "per_class": _counts(out["label"])}


# ----------------------------------------------------------------------------- 2. imbalance
def imbalance(ds: datasets.Dataset, cfg) -> tuple[datasets.Dataset, dict | None]:
    if cfg.ratio <= 1.0:
        return ds, None
    ids, labels = list(ds["id"]), list(ds["label"])
    counts = _counts(labels)
    names = list(counts)
    if cfg.profile == "step":
        minority = list(cfg.minority) if cfg.minority else names[len(names) // 2:]
        unknown = [m for m in minority if m not in counts]
        if unknown:
            raise DataError(f"config key 'data.imbalance.minority': class {unknown[0]!r} is not a training label "
                            f"(labels: {', '.join(names)})")
        if len(minority) == len(names):
            raise DataError("config key 'data.imbalance.minority': every class is a minority class; leave at least one")
        top = max(counts[c] for c in names if c not in minority)
        target = {c: min(counts[c], max(1, round(top / cfg.ratio))) if c in minority else counts[c] for c in names}
    else:  # exponential: class i of the sorted names keeps n_max · ratio^(-i / (K - 1))
        top, k = max(counts.values()), len(names)
        target = {c: min(counts[c], max(1, round(top * cfg.ratio ** (-i / max(k - 1, 1))))) for i, c in enumerate(names)}
    orders = class_orders(ids, labels, cfg.seed, "imbalance")
    out = _select(ds, [i for c, r in orders.items() for i in r[:target[c]]])
    got = _counts(out["label"])
    return out, {"ratio": cfg.ratio, "profile": cfg.profile, "seed": cfg.seed, "before": counts, "after": got,
                 "achieved_ratio": round(max(got.values()) / min(got.values()), 3)}


# ----------------------------------------------------------------------------- 4. removal by ids / random
def read_ids(path: str) -> list[str]:
    """One id a line (blank lines and lines starting with '#' skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"config key 'data.filter.exclude_ids': {path}: {e.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def remove(ds: datasets.Dataset, cfg, seed: int) -> tuple[datasets.Dataset, dict | None]:
    if not cfg.exclude_ids and cfg.random_fraction <= 0:
        return ds, None
    ids = list(ds["id"])
    drop: set[int] = set()
    info: dict = {}
    if cfg.exclude_ids:
        want = read_ids(cfg.exclude_ids)
        pos = {i: k for k, i in enumerate(ids)}
        hit = [pos[w] for w in want if w in pos]
        if want and not hit:
            raise DataError(f"config key 'data.filter.exclude_ids': none of the {len(want)} ids in {cfg.exclude_ids} "
                            f"is a training id of this run (e.g. {want[0]!r}; training ids look like {ids[0]!r})")
        drop.update(hit)
        info["exclude_ids"] = {"file": str(cfg.exclude_ids), "ids": len(want), "removed": len(set(hit))}
    if cfg.random_fraction > 0:
        s = seed if cfg.seed is None else cfg.seed
        rest = [k for k in range(len(ids)) if k not in drop]
        rest.sort(key=lambda k: (_unit(s, ids[k], "drop"), ids[k]))
        m = round(cfg.random_fraction * len(ids))
        drop.update(rest[:m])
        info["random"] = {"fraction": cfg.random_fraction, "seed": s, "removed": min(m, len(rest))}
    out = _select(ds, [k for k in range(len(ids)) if k not in drop])
    if len(set(out["label"])) < 2:
        raise DataError("config key 'data.filter': the removal leaves fewer than 2 classes in train")
    return out, {**info, "removed": len(drop), "kept": len(out)}


# ----------------------------------------------------------------------------- 5./6. copies
def edit_text(text: str, rate: float, seed: int, key: str) -> str:
    """A light, seeded edit: each word (each character for unspaced text such as Chinese) is, with
    probability `rate`, deleted, swapped with the next one or repeated; at least one edit when rate > 0."""
    units = text.split()
    sep = " "
    if len(units) < 3:
        units, sep = list(text), ""
    if rate <= 0 or len(units) < 2:
        return text
    out, i, edits = [], 0, 0
    while i < len(units):
        u = _unit(seed, key, f"e{i}")
        if u < rate:
            op = int(_unit(seed, key, f"op{i}") * 3)
            edits += 1
            if op == 0:  # delete
                i += 1
                continue
            if op == 1 and i + 1 < len(units):  # swap with the next
                out += [units[i + 1], units[i]]
                i += 2
                continue
            out += [units[i], units[i]]  # repeat
            i += 1
            continue
        out.append(units[i])
        i += 1
    if edits == 0:  # short texts at a small rate: still one edit (an edited copy must differ)
        j = int(_unit(seed, key, "force") * len(units))
        out = units[:j] + units[j + 1:]
    return sep.join(out)


def _copies(src: datasets.Dataset, rows: list[int], suffix, kind: str, edit_rate: float, seed: int,
            columns: list[str]) -> dict:
    data = {c: [] for c in columns}
    for k, i in enumerate(rows):
        rec = src[int(i)]
        new_id = f"{rec['id']}#{suffix(k)}"
        for c in columns:
            data[c].append(rec.get(c))
        data["id"][-1] = new_id
        if kind == "edited":
            data["text"][-1] = edit_text(rec["text"], edit_rate, seed, new_id)
    return data


def _append(ds: datasets.Dataset, data: dict) -> datasets.Dataset:
    if not data["id"]:
        return ds
    extra = datasets.Dataset.from_dict(data, features=ds.features)
    return datasets.concatenate_datasets([ds, extra])


def duplicates(ds: datasets.Dataset, cfg, flipped: list | None) -> tuple[datasets.Dataset, dict | None]:
    if cfg.rate <= 0:
        return ds, None
    ids, n = list(ds["id"]), len(ds)
    m = round(cfg.rate * n)
    order = sorted(range(n), key=lambda i: (_unit(cfg.seed, ids[i], "dup"), ids[i]))
    rows = [order[k % n] for k in range(m)]  # rate > 1: every example copied, then again (dup1, dup2 …)
    data = _copies(ds, rows, lambda k: f"dup{k // n}", cfg.kind, cfg.edit_rate, cfg.seed, list(ds.column_names))
    if flipped:  # a copy of a mislabeled example is mislabeled too
        noisy = {r["id"]: r for r in flipped}
        for new_id in data["id"]:
            base = new_id.rsplit("#", 1)[0]
            if base in noisy:
                flipped.append({**noisy[base], "id": new_id})
    return _append(ds, data), {"rate": cfg.rate, "kind": cfg.kind, "seed": cfg.seed, "copies": m,
                               "distinct_sources": len(set(rows))}


def contaminate(ds: datasets.Dataset, source: datasets.Dataset, cfg) -> tuple[datasets.Dataset, dict | None, list]:
    """`ds` + copies of round(rate × |source|) examples of the eval split `source` (labels: theirs)."""
    if cfg.rate <= 0:
        return ds, None, []
    ids, n = list(source["id"]), len(source)
    m = round(cfg.rate * n)
    rows = sorted(range(n), key=lambda i: (_unit(cfg.seed, ids[i], "leak"), ids[i]))[:m]
    cols = [c for c in ds.column_names if c in source.column_names]
    if cols != list(ds.column_names):
        raise DataError(f"config key 'data.contamination.split': the {cfg.split} split lacks columns "
                        f"{sorted(set(ds.column_names) - set(cols))} of train")
    data = _copies(source, rows, lambda k: "leak", cfg.kind, cfg.edit_rate, cfg.seed, cols)
    leaked = [ids[i] for i in rows]
    return _append(ds, data), {"rate": cfg.rate, "kind": cfg.kind, "split": cfg.split, "seed": cfg.seed,
                               "copies": m, "of": n}, leaked


# ----------------------------------------------------------------------------- 7. audit filter
def audit_filter(splits: dict, cfg, progress: bool = False) -> tuple[datasets.Dataset, dict | None]:
    """Drop training examples flagged by an in-process audit of the splits (the same scan and merge as
    `llm-dist audit`, words or characters as it chooses per document): decontaminate (train examples any
    validation/test example leaks from: exact, near or 13-gram), dedup (all but the first of each exact /
    near cluster within train), quality (any Gopher / C4 / profile flag)."""
    if not (cfg.decontaminate or cfg.dedup or cfg.quality):
        return splits["train"], None
    from ..analysis.audit.config import AuditConfig
    from ..analysis.audit.pipeline import merge, scan
    from ..analysis.audit.reader import SplitSource

    sources = {s: SplitSource(s, f"data ({s})", dataset=ds) for s, ds in splits.items()}
    acfg = AuditConfig().validate()
    part = scan(sources, acfg, None, progress=progress, meta={"data": {"mode": "in-process"}})
    res, flags = merge([part], progress=progress)
    drop: dict[str, set] = {"decontaminate": set(), "dedup": set(), "quality": set()}
    if cfg.decontaminate:
        for e in res["leakage"]:
            drop["decontaminate"].update(str(i) for i in e.get("_all_train_ids", []))
    if cfg.dedup:
        for kind in ("exact", "near"):
            for cluster in res["duplicates"]["train"][kind]:
                drop["dedup"].update(str(i) for i in cluster[1:])
    if cfg.quality:
        drop["quality"] = {str(r["id"]) for r in flags if r["split"] == "train" and r.get("flags")}
    gone = set().union(*drop.values())
    train = splits["train"]
    ids = list(train["id"])
    out = _select(train, [k for k, i in enumerate(ids) if i not in gone])
    if len(set(out["label"])) < 2:
        raise DataError("config key 'data.filter': the audit filter leaves fewer than 2 classes in train")
    return out, {k: len(v & set(ids)) for k, v in drop.items() if getattr(cfg, k)} | {"removed": len(ids) - len(out),
                                                                                     "kept": len(out)}


# ----------------------------------------------------------------------------- all of it
def apply(cfg, splits: dict, with_noise) -> dict:
    """The interventions of `cfg.data` on `splits["train"]` (see the module docstring); `with_noise` plants
    the label noise (data/classify.py). The record and the planted flips ride on `train.info.description`
    as JSON (`{"flipped": [...], "interventions": {...}}`), read back by `planted_noise` / `record_of`."""
    d = cfg.data
    train = splits["train"]
    record: dict = {}
    seed = cfg.seed if d.subset.seed is None else d.subset.seed
    train, r = subset(train, d.subset, seed)
    if r:
        record["subset"] = r
    train, r = imbalance(train, d.imbalance)
    if r:
        record["imbalance"] = r
    flipped = None
    if d.label_noise.rate > 0:
        train = with_noise(train, d.label_noise)
        flipped = json.loads(train.info.description)["flipped"]
        record["label_noise"] = {"rate": d.label_noise.rate, "kind": d.label_noise.kind, "seed": d.label_noise.seed,
                                 "flipped": len(flipped)}
    train, r = remove(train, d.filter, cfg.seed)
    if r:
        record["removal"] = r
        if flipped is not None:
            kept = set(train["id"])
            flipped[:] = [f for f in flipped if f["id"] in kept]
    train, r = duplicates(train, d.duplicates, flipped)
    if r:
        record["duplicates"] = r
    leaked: list = []
    if d.contamination.rate > 0:
        src = splits.get(d.contamination.split)
        if src is None:
            raise DataError(f"config key 'data.contamination.split': the run has no {d.contamination.split} split")
        train, r, leaked = contaminate(train, src, d.contamination)
        record["contamination"] = {**r, "ids": leaked}  # the copied eval ids: metrics on them vs the rest
    out = dict(splits, train=train)
    train, r = audit_filter(out, d.filter)
    if r:
        record["audit_filter"] = r
        if flipped is not None:
            kept = set(train["id"])
            flipped[:] = [f for f in flipped if f["id"] in kept]
        if leaked:
            kept = set(train["id"])
            record["contamination"]["copies_left_after_filter"] = sum(f"{i}#leak" in kept for i in leaked)
    if record:
        record["train_examples"] = len(train)
        record["train_per_class"] = _counts(train["label"])
    desc = {"interventions": record}
    if flipped is not None:
        desc["flipped"] = flipped
    train.info.description = json.dumps(desc)
    out["train"] = train
    return out


def record_of(train: datasets.Dataset) -> dict:
    """The interventions applied to a training split (empty when none)."""
    try:
        return json.loads(train.info.description or "").get("interventions", {})
    except (ValueError, AttributeError):
        return {}


def active(data_cfg) -> bool:
    """Whether any training-data intervention (other than label noise) is on."""
    d = data_cfg
    return bool(d.subset.fraction < 1 or d.subset.count or d.subset.per_class or d.imbalance.ratio > 1
                or d.filter.exclude_ids or d.filter.random_fraction > 0 or d.duplicates.rate > 0
                or d.contamination.rate > 0 or d.filter.decontaminate or d.filter.dedup or d.filter.quality)


def reset(data_cfg) -> None:
    """Turn every intervention off (label-issues folds: their files hold the intervened data already)."""
    from ..config import FilterConfig, ImbalanceConfig, InjectConfig, SubsetConfig

    data_cfg.subset, data_cfg.imbalance, data_cfg.filter = SubsetConfig(), ImbalanceConfig(), FilterConfig()
    data_cfg.duplicates, data_cfg.contamination = InjectConfig(), InjectConfig()
    data_cfg.label_noise.rate = 0.0


__all__ = ["apply", "record_of", "active", "reset", "nested_order", "class_orders", "edit_text"]
