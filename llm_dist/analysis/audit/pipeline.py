"""The audit's two stages.

1. `scan` (per shard): stream each split once, computing per-document features in `num_proc` worker
   processes. Eval splits (validation/test) come first: every shard reads them whole to build the eval
   13-gram index (they are small), then its train rows are matched against it. Output: a `Partial`.
2. `merge` (once): concatenate partials, then exact clusters (hash groups), near clusters (MinHash LSH
   over one representative per exact group), leakage (exact / near / n-gram) and the aggregates.

A plain run is `scan(shard 0 of 1)` then `merge` in one process; the sharded path writes partials to
disk (`save_partial`) and merges them later, with the same result.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import AuditConfig, AuditError
from .features import COLUMNS, PROFILE_FLAGS, PBIT, init_worker, permutations, process_batch
from .pii import KINDS as PII_KINDS
from .quality import BIT as QBIT, RULES
from .reader import SplitSource
from .text import SCRIPTS

BATCH = 64  # documents per worker task
PARTIAL_VERSION = 1


@dataclass
class Partial:
    meta: dict
    splits: dict[str, dict[str, np.ndarray | list]] = field(default_factory=dict)
    # eval (split, id) -> (matched n-gram hashes, {train_id: shared n-grams})
    ngram: dict[tuple[str, str], tuple[np.ndarray, dict[str, int]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- stage 1: scan
def _batches(rows, size: int):
    batch = []
    for r in rows:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run(tasks, num_proc: int, init_args: tuple):
    """Map `process_batch` over `tasks` (an iterator), keeping at most a few batches per worker in flight
    so memory stays bounded however long the stream is."""
    if num_proc <= 1:
        init_worker(*init_args)
        for t in tasks:
            yield process_batch(t)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across the fork
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(num_proc, initializer=init_worker, initargs=init_args) as pool:
        window = []
        for t in tasks:
            window.append(pool.apply_async(process_batch, (t,)))
            if len(window) >= 4 * num_proc:
                yield window.pop(0).get()
        for w in window:
            yield w.get()


def _new_columns() -> dict[str, list]:
    return {c: [] for c in COLUMNS}


def _finish_columns(cols: dict[str, list], num_perm: int) -> dict:
    out = {}
    for k, v in cols.items():
        if k == "sig":
            out[k] = np.array(v, dtype=np.uint32).reshape(len(v), num_perm)
        elif k in ("id", "label"):
            out[k] = list(v)
        elif k == "hash":
            out[k] = np.array(v, dtype=np.uint64)
        elif k == "nonletter":
            out[k] = np.array(v, dtype=np.float32)
        else:
            out[k] = np.array(v, dtype=np.int64)
    return out


def scan(sources: dict[str, SplitSource], cfg: AuditConfig, tokenizer: str | None = None, shard: int = 0,
         num_shards: int = 1, num_proc: int = 1, progress: bool = True, meta: dict | None = None) -> Partial:
    part = Partial(meta={**(meta or {}), "version": PARTIAL_VERSION, "config": cfg.to_dict(),
                         "tokenizer": tokenizer, "shard": shard, "num_shards": num_shards,
                         "splits": {n: s.where for n, s in sources.items()}})
    init_args = (cfg.to_dict(), tokenizer, None)
    # eval splits first: their features (owned rows) and the n-gram index (all rows)
    eval_keys: list[tuple[str, str]] = []
    grams: list[np.ndarray] = []
    for name, src in sources.items():
        if name == "train":
            continue
        cols = _new_columns()
        keys = []
        tasks = ((False, b) for b in _batches(_track(src.rows(shard, num_shards, all_rows=True), keys, name), BATCH))
        bar = tqdm(desc=f"audit scan {name}", unit="doc", disable=not progress, leave=False)
        for c, extra in _run(tasks, num_proc, init_args):
            for k in COLUMNS:
                cols[k].extend(c[k])
            grams.extend(extra)
            bar.update(len(extra))
        bar.close()
        eval_keys.extend(keys)
        part.splits[name] = _finish_columns(cols, cfg.num_perm)
    index = None
    if grams:
        owners = np.repeat(np.arange(len(grams), dtype=np.int64), [len(g) for g in grams])
        hashes = np.concatenate(grams) if grams else np.empty(0, dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")
        index = (hashes[order], owners[order])
        del grams, owners, hashes, order
    # train: features and matches against the eval index
    src = sources["train"]
    cols = _new_columns()
    matched: dict[int, set[int]] = defaultdict(set)  # eval doc -> its 13-grams seen in train (bounded by its size)
    shared: dict[int, Counter] = defaultdict(Counter)
    tasks = ((True, b) for b in _batches(src.rows(shard, num_shards), BATCH))
    bar = tqdm(desc="audit scan train", unit="doc", disable=not progress, leave=False)
    for c, extra in _run(tasks, num_proc, (cfg.to_dict(), tokenizer, index)):
        for k in COLUMNS:
            cols[k].extend(c[k])
        for train_id, owners, hashes in extra:
            ow, counts = np.unique(owners, return_counts=True)
            for o, n in zip(ow.tolist(), counts.tolist()):
                shared[o][train_id] += n
            for o in ow.tolist():
                matched[o].update(hashes[owners == o].tolist())
        bar.update(len(c["id"]))
    bar.close()
    part.splits = {"train": _finish_columns(cols, cfg.num_perm), **part.splits}
    for o, hs in matched.items():
        part.ngram[eval_keys[o]] = (np.array(sorted(hs), dtype=np.uint64), dict(shared[o]))
    return part


def _track(rows, keys: list, split: str):
    for r in rows:
        keys.append((split, r[1]))
        yield r


# ----------------------------------------------------------------------------- partial files
def save_partial(part: Partial, directory: str | os.PathLike) -> Path:
    """Write one shard's partial as `DIR/shard-IIIII-of-NNNNN/` (parquet per split + ngram.jsonl +
    meta.json, which is written last: a shard dir without it is incomplete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard, n = part.meta["shard"], part.meta["num_shards"]
    final = Path(directory) / f"shard-{shard:05d}-of-{n:05d}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, cols in part.splits.items():
        arrays = {}
        for k, v in cols.items():
            if k == "sig":
                arrays[k] = pa.array([row.tobytes() for row in v], type=pa.binary())
            elif k in ("id", "label"):
                arrays[k] = pa.array(v, type=pa.string())
            else:
                arrays[k] = pa.array(v)
        pq.write_table(pa.table(arrays), tmp / f"{name}.parquet")
    with open(tmp / "ngram.jsonl", "w") as fh:
        for (split, doc_id), (hashes, trains) in part.ngram.items():
            fh.write(json.dumps({"split": split, "id": doc_id, "hashes": hashes.tolist(), "train": trains}) + "\n")
    (tmp / "meta.json").write_text(json.dumps(part.meta, indent=1))
    if final.exists():
        _rmtree(final)
    os.replace(tmp, final)
    return final


def load_partial(path: Path) -> Partial:
    import pyarrow.parquet as pq

    meta = json.loads((path / "meta.json").read_text())
    num_perm = meta["config"]["num_perm"]
    part = Partial(meta=meta)
    for name in meta["splits"]:
        t = pq.read_table(path / f"{name}.parquet")
        cols = {}
        for k in COLUMNS:
            col = t.column(k)
            if k == "sig":
                cols[k] = np.frombuffer(b"".join(col.to_pylist()), dtype=np.uint32).reshape(len(t), num_perm)
            elif k in ("id", "label"):
                cols[k] = col.to_pylist()
            else:
                cols[k] = col.to_numpy()
        part.splits[name] = cols
    with open(path / "ngram.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            part.ngram[(rec["split"], rec["id"])] = (np.array(rec["hashes"], dtype=np.uint64), rec["train"])
    return part


def load_partials(directory: str | os.PathLike) -> list[Partial]:
    d = Path(directory)
    if not d.is_dir():
        raise AuditError(f"{d}: no such partials directory")
    done = sorted(p for p in d.glob("shard-*-of-*") if (p / "meta.json").exists())
    if not done:
        raise AuditError(f"{d}: no finished shards (shard-*-of-*/meta.json)")
    parts = [load_partial(p) for p in done]
    n = parts[0].meta["num_shards"]
    have = {p.meta["shard"] for p in parts}
    missing = sorted(set(range(n)) - have)
    if missing:
        raise AuditError(f"{d}: missing shard(s) {', '.join(map(str, missing[:10]))} of {n}")
    for p in parts:
        if p.meta["num_shards"] != n or p.meta["config"] != parts[0].meta["config"] \
                or p.meta.get("data") != parts[0].meta.get("data"):
            raise AuditError(f"{d}: shard {p.meta['shard']} was made with different data or settings")
    return sorted(parts, key=lambda p: p.meta["shard"])


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- stage 2: merge
class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.parent[ra] = rb


def _concat(parts: list[Partial], name: str) -> dict:
    pieces = [p.splits[name] for p in parts if name in p.splits]
    out = {}
    for k in COLUMNS:
        vals = [pc[k] for pc in pieces]
        out[k] = [x for v in vals for x in v] if k in ("id", "label") else np.concatenate(vals)
    order = np.argsort(out["pos"], kind="stable")
    for k in COLUMNS:
        out[k] = [out[k][i] for i in order] if k in ("id", "label") else out[k][order]
    return out


def _lsh(num_perm: int, threshold: float, weights: tuple[float, float] = (0.5, 0.5)):
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)


# The CJK index weighs missed pairs 9x false candidates when datasketch picks its bands (20 bands of 6 rows at
# 0.7 instead of 14 of 9): a pair at Jaccard 0.75 becomes a candidate with probability 0.98 instead of 0.67.
# Candidates are then kept only when their signatures agree on >= the threshold, so precision is unchanged.
CJK_LSH_WEIGHTS = (0.1, 0.9)


def _minhash(sig: np.ndarray, perms):
    from datasketch import MinHash

    from .features import MINHASH_KW

    return MinHash(hashvalues=sig, permutations=perms, **MINHASH_KW)


def merge(parts: list[Partial], progress: bool = True) -> tuple[dict, list[dict]]:
    """(audit result, per-document flag rows) from the partials of all shards."""
    meta = parts[0].meta
    cfg = AuditConfig.from_dict(meta["config"])
    perms = permutations(cfg)
    where = meta["splits"]
    names = list(where)
    data = {n: _concat(parts, n) for n in names}
    for n in names:
        d = data[n]
        if len(d["id"]) == 0:
            raise AuditError(f"{where[n]}: empty dataset")
        dup = [i for i, c in Counter(d["id"]).items() if c > 1]
        if dup:
            raise AuditError(f"{where[n]}: id {dup[0]!r} is not unique ({len(dup)} repeated ids)")
    result: dict = {"splits": {}, "duplicates": {}, "leakage": [], "leakage_summary": {}, "quality": {},
                    "pii": {},
                    # every id of the evaluation splits: a run joining leakage ids with its own split checks
                    # the audit saw that split (llm_dist.analysis.audit.leaked_ids)
                    "split_ids": {n: list(data[n]["id"]) for n in names if n != "train"}}
    flag_rows: list[dict] = []
    lsh_train = rep_train = groups_train = None
    # one set of histogram bins for all splits (comparable): up to the 99th percentile of all lengths
    hi = max(float(np.percentile(np.concatenate([data[n]["n_tokens"] for n in names]), 99)), 1.0)
    for n in names:
        d = data[n]
        result["splits"][n] = _profile(d, cfg, hi)
        result["quality"][n] = _quality(d, cfg)
        result["pii"][n] = _pii(d, cfg)
        dups, lsh, reps, groups = _duplicates(d, cfg, perms, progress, n)
        result["duplicates"][n] = dups
        if n == "train":
            lsh_train, rep_train, groups_train = lsh, reps, groups
        flag_rows.extend(_flag_rows(n, d))
    ngram = {}
    for p in parts:
        for key, (hashes, trains) in p.ngram.items():
            if key in ngram:
                h0, t0 = ngram[key]
                ngram[key] = (np.union1d(h0, hashes), Counter(t0) + Counter(trains))
            else:
                ngram[key] = (hashes, Counter(trains))
    for n in names:
        if n == "train":
            continue
        entries, summary = _leakage(n, data[n], data["train"], lsh_train, rep_train, groups_train, ngram, cfg, perms)
        result["leakage"].extend(entries)
        result["leakage_summary"][n] = summary
    return result, flag_rows


def _examples(ids: list[str], mask: np.ndarray, k: int) -> dict:
    idx = np.nonzero(mask)[0]
    return {"count": int(len(idx)), "examples": [ids[i] for i in idx[:k]]}


def _profile(d: dict, cfg: AuditConfig, hi: float) -> dict:
    ids, ntok = d["id"], d["n_tokens"]
    labels = [x for x in d["label"] if x is not None]
    counts = dict(sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0])))
    edges = np.linspace(0, hi, 31)
    hist, _ = np.histogram(np.minimum(ntok, hi), bins=edges)
    out = {
        "documents": len(ids),
        "tokens": int(ntok.sum()),
        "words": int(d["n_words"].sum()),
        "characters": int(d["n_chars"].sum()),
        "class_counts": counts,
        "classes": len(counts),
        "imbalance_ratio": (round(max(counts.values()) / min(counts.values()), 3) if counts else None),
        "missing_labels": len(ids) - len(labels),
        "length": {"unit": "tokens", "mean": round(float(ntok.mean()), 2), "min": int(ntok.min()),
                   "p50": round(float(np.percentile(ntok, 50)), 1), "p90": round(float(np.percentile(ntok, 90)), 1),
                   "p99": round(float(np.percentile(ntok, 99)), 1), "max": int(ntok.max()),
                   "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": hist.tolist(),
                                 "last_bin_includes_longer": True}},
        "nonletter_ratio_mean": round(float(d["nonletter"].mean()), 4),
        # documents shingled by words (spaced scripts) and by characters (CJK: Han, kana)
        "scripts": {"spaced": int((d["cjk"] == 0).sum()), "cjk": int((d["cjk"] == 1).sum())},
        "coverage": _coverage(d),
    }
    if cfg.max_length:
        out["over_max_length"] = {"max_length": cfg.max_length, **_examples(ids, ntok > cfg.max_length, cfg.max_examples)}
    for flag in PROFILE_FLAGS:
        out[flag] = _examples(ids, (d["pflags"] & PBIT[flag]) > 0, cfg.max_examples)
    return out


def _coverage(d: dict) -> dict | None:
    """Tokenizer coverage per script of the token's first character: tokens, unknown tokens and their rate
    (None when the tokenizer gave no offsets, or there was no tokenizer)."""
    out = {}
    for sc in SCRIPTS:
        tok, unk = int(d[f"tok_{sc}"].sum()), int(d[f"unk_{sc}"].sum())
        out[sc] = {"tokens": tok, "unknown": unk, "unknown_rate": round(unk / tok, 6) if tok else None}
    return out if any(v["tokens"] for v in out.values()) else None


def _quality(d: dict, cfg: AuditConfig) -> dict:
    q = d["qflags"]
    return {"rules": {r: _examples(d["id"], (q & QBIT[r]) > 0, cfg.max_examples) for r in RULES},
            "flagged_any": int((q > 0).sum()),
            "flagged_excluding_word_count": int((q & ~QBIT["gopher_word_count"] > 0).sum())}


def _pii(d: dict, cfg: AuditConfig) -> dict:
    out = {}
    for k in PII_KINDS:
        col = d[f"pii_{k}"]
        out[k] = {"matches": int(col.sum()), "documents": int((col > 0).sum()),
                  "examples": _examples(d["id"], col > 0, cfg.max_examples)["examples"]}
    return out


def _flag_rows(split: str, d: dict) -> list[dict]:
    from .quality import names as qnames

    rows = []
    for i in np.nonzero((d["qflags"] > 0) | (d["pflags"] > 0) | sum(d[f"pii_{k}"] for k in PII_KINDS) > 0)[0]:
        row = {"split": split, "id": d["id"][i],
               "flags": [f for f in PROFILE_FLAGS if d["pflags"][i] & PBIT[f]] + qnames(int(d["qflags"][i]))}
        pii = {k: int(d[f"pii_{k}"][i]) for k in PII_KINDS if d[f"pii_{k}"][i]}
        if pii:
            row["pii"] = pii
        rows.append(row)
    return rows


def _duplicates(d: dict, cfg: AuditConfig, perms, progress: bool, split: str):
    ids, labels, hashes, sigs = d["id"], d["label"], d["hash"], d["sig"]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes.tolist()):
        groups[h].append(i)
    exact = [g for g in groups.values() if len(g) > 1]
    # near: one representative per exact group, in document order; query before insert
    reps = [g[0] for g in groups.values()]
    reps.sort()
    rep_of_doc = {}
    for g in groups.values():
        for i in g:
            rep_of_doc[i] = g[0]
    empty = np.all(sigs == np.uint32(0xFFFFFFFF), axis=1)
    # spaced (word shingles) and CJK (character shingles) documents: one LSH index and threshold each
    lsh = {0: _lsh(cfg.num_perm, cfg.near_threshold), 1: _lsh(cfg.num_perm, cfg.cjk_near_threshold, CJK_LSH_WEIGHTS)}
    thr = {0: cfg.near_threshold, 1: cfg.cjk_near_threshold}
    script = d["cjk"]
    uf = _UnionFind(len(ids))
    for r in tqdm(reps, desc=f"audit near-dup {split}", unit="doc", disable=not progress, leave=False):
        if empty[r]:
            continue
        m = _minhash(sigs[r], perms)
        sc = int(script[r])
        cands = lsh[sc].query(m)
        if cands:
            cands = np.array(cands)
            sim = (sigs[cands] == sigs[r]).mean(axis=1)
            for c in cands[sim >= thr[sc]].tolist():
                uf.union(r, c)
        lsh[sc].insert(r, m)
    comps: dict[int, list[int]] = defaultdict(list)
    for r in reps:
        comps[uf.find(r)].append(r)
    near = []
    for members in comps.values():
        if len(members) > 1:
            near.append(sorted(i for r in members for i in groups[hashes[r].item()]))
    near.sort()
    exact.sort()

    def conflicts(kind, clusters):
        out = []
        for c in clusters:
            labs = Counter(labels[i] for i in c if labels[i] is not None)
            if len(labs) > 1:
                out.append({"kind": kind, "ids": [ids[i] for i in c], "labels": dict(sorted(labs.items()))})
        return out

    dups = {
        "exact": [[ids[i] for i in c] for c in exact],
        "near": [[ids[i] for i in c] for c in near],
        "exact_extra_copies": sum(len(c) - 1 for c in exact),
        "near_extra_copies": sum(len({hashes[i].item() for i in c}) - 1 for c in near),
        "documents_in_near_clusters": sum(len(c) for c in near),
        "label_conflicts": conflicts("exact", exact) + conflicts("near", near),
    }
    return dups, lsh, set(reps), groups


def _leakage(split: str, d: dict, train: dict, lsh, train_reps, train_groups, ngram: dict, cfg: AuditConfig,
             perms) -> tuple[list[dict], dict]:
    entries = []
    tids, tlabels, tsigs, thashes = train["id"], train["label"], train["sig"], train["hash"]
    kinds = {"exact": set(), "near": set(), "ngram": set()}
    k = cfg.max_train_ids
    empty_sig = np.uint32(0xFFFFFFFF)
    for i, doc_id in enumerate(d["id"]):
        label = d["label"][i]
        h = d["hash"][i].item()
        if h in train_groups:
            g = train_groups[h]
            entries.append({"split": split, "id": doc_id, "kind": "exact", "score": 1.0,
                            "train_ids": [tids[j] for j in g[:k]], "n_train_ids": len(g),
                            "label": label, "train_labels": [tlabels[j] for j in g[:k]],
                            "_all_train_ids": [tids[j] for j in g]})
            kinds["exact"].add(doc_id)
        sig = d["sig"][i]
        if not np.all(sig == empty_sig):
            sc = int(d["cjk"][i])
            cands = lsh[sc].query(_minhash(sig, perms))
            if cands:
                cands = np.array(cands)
                sim = (tsigs[cands] == sig).mean(axis=1)
                keep = sim >= (cfg.cjk_near_threshold if sc else cfg.near_threshold)
                if keep.any():
                    hits = sorted(zip((-sim[keep]).tolist(), cands[keep].tolist()))
                    js = [j for _, r in hits for j in train_groups[thashes[r].item()]]
                    entries.append({"split": split, "id": doc_id, "kind": "near", "score": round(-hits[0][0], 4),
                                    "train_ids": [tids[j] for j in js[:k]], "n_train_ids": len(js),
                                    "label": label, "train_labels": [tlabels[j] for j in js[:k]],
                                    "_all_train_ids": [tids[j] for j in js]})
                    kinds["near"].add(doc_id)
        hit = ngram.get((split, doc_id))
        total = int(d["ngram_total"][i])
        if hit is not None and total:
            score = len(hit[0]) / total
            if score > cfg.ngram_threshold:
                best = sorted(hit[1].items(), key=lambda kv: (-kv[1], kv[0]))
                entries.append({"split": split, "id": doc_id, "kind": "ngram", "score": round(score, 4),
                                "train_ids": [t for t, _ in best[:k]], "n_train_ids": len(best),
                                "matched_ngrams": len(hit[0]), "ngrams": total,
                                "_all_train_ids": [t for t, _ in best]})
                kinds["ngram"].add(doc_id)
    any_ = set().union(*kinds.values())
    n = len(d["id"])
    summary = {"documents": n, **{kk: len(v) for kk, v in kinds.items()}, "any": len(any_),
               "clean": n - len(any_), "ngram_size": cfg.ngram_size, "near_threshold": cfg.near_threshold,
               "cjk_ngram_size": cfg.cjk_ngram_size, "cjk_near_threshold": cfg.cjk_near_threshold,
               "ngram_threshold": cfg.ngram_threshold,
               # examples whose exact / near train copies carry another label (label noise across splits)
               "label_mismatch": len({e["id"] for e in entries if e["kind"] in ("exact", "near")
                                      and e["label"] is not None and any(t != e["label"] for t in e["train_labels"])})}
    return entries, summary
