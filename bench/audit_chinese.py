"""Audit recall on planted duplicates, Chinese vs English, the same procedure for both.

Chinese: the fixture corpus (`llm_dist.analysis.audit.zh_corpus`: the project's article, ~60 documents of
~120 characters, 20% test) with 4 exact + 4 edited copies test->train, the same inside train, and 2 test
documents carrying a 30-character train passage. English: the same plan on BBC News articles cut to their
first 80 words (about a Chinese document's length in words), 80 articles with distinct texts, edits replacing
words by words of other articles, a 25-word passage. Edit rates: the share of characters (Chinese) or words
(English) replaced. Each cell is the recall over `--seeds` corpora (each a fresh shuffle and fresh edits).

    .venv/bin/python bench/audit_chinese.py                 # seeds 0-4, edit rates 0.02 0.03 0.05

Prints one line per language x edit rate, then `unplanted reports` (leaks / clusters that nobody planted).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_dist.analysis.audit import file_spec, run_audit  # noqa: E402
from llm_dist.analysis.audit.text import exact_hash  # noqa: E402
from llm_dist.analysis.audit.zh_corpus import build  # noqa: E402

KINDS = ("leak_exact", "leak_edit", "leak_passage", "dup_exact", "dup_edit")


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def english(out: Path, seed: int, edit_rate: float, copies: int = 4) -> dict:
    from llm_dist.data.sources import bbc_news_records

    rng = random.Random(seed)
    seen, pool = set(), []
    for r in bbc_news_records():
        text = " ".join(r["text"].split()[:80])
        h = exact_hash(text)
        if h not in seen:
            seen.add(h)
            pool.append({"text": text, "label": r["label"]})
    docs = rng.sample(pool, 80)
    vocab = [w for d in rng.sample(pool, 200) for w in d["text"].split()]
    rows = [{"id": f"en{i:03d}", **d} for i, d in enumerate(docs)]
    train, test = rows[16:], rows[:16]
    srcs = rng.sample(range(len(train)), 4 * copies + 2)
    facts: dict = {k: {} for k in KINDS}
    k = 0

    def edit(text):
        w = text.split()
        for i in rng.sample(range(len(w)), max(2, round(edit_rate * len(w)))):
            w[i] = rng.choice(vocab)
        return " ".join(w)

    for kind in ("leak_exact", "leak_edit", "dup_exact", "dup_edit"):
        for j in range(copies):
            src = train[srcs[k]]
            k += 1
            row = {"id": f"{kind}_{j}", "text": src["text"] if kind.endswith("exact") else edit(src["text"]),
                   "label": src["label"]}
            (test if kind.startswith("leak") else train).append(row)
            facts[kind][row["id"]] = src["id"]
    for j in range(2):
        src, host = train[srcs[k]], test[j]
        k += 1
        w = src["text"].split()
        start = rng.randrange(0, len(w) - 25)
        test[j] = {"id": f"leak_passage_{j}", "text": host["text"] + " " + " ".join(w[start:start + 25]),
                   "label": host["label"]}
        facts["leak_passage"][test[j]["id"]] = src["id"]
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train.jsonl", train)
    _write(out / "test.jsonl", test)
    return facts


def recall(res: dict, facts: dict) -> tuple[dict, int]:
    leaks: dict = {}
    for e in res["leakage"]:
        leaks.setdefault(e["id"], {})[e["kind"]] = set(e["train_ids"])
    found = {k: 0 for k in KINDS}
    for kind, how in (("leak_exact", "exact"), ("leak_edit", "near"), ("leak_passage", "ngram")):
        found[kind] = sum(src in leaks.get(t, {}).get(how, ()) for t, src in facts[kind].items())
    d = res["duplicates"]["train"]
    for kind, how in (("dup_exact", "exact"), ("dup_edit", "near")):
        found[kind] = sum(any({c, s} <= set(cl) for cl in d[how]) for c, s in facts[kind].items())
    planted_test = {t for k in ("leak_exact", "leak_edit", "leak_passage") for t in facts[k]}
    planted_train = {c for k in ("dup_exact", "dup_edit") for c in facts[k]}
    unplanted = len(set(leaks) - planted_test) + sum(1 for how in ("exact", "near") for cl in d[how]
                                                      if not set(cl) & planted_train)
    return found, unplanted


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.02, 0.03, 0.05])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="audit-zh-bench-"))
    unplanted = {"zh": 0, "en": 0}
    for lang in ("zh", "en"):
        for rate in args.rates:
            tot = {k: [0, 0] for k in KINDS}
            for seed in args.seeds:
                d = tmp / f"{lang}-{rate}-{seed}"
                facts = build(d, seed=seed, edit_rate=rate) if lang == "zh" else english(d, seed, rate)
                res = run_audit(file_spec([f"train={d / 'train.jsonl'}", f"test={d / 'test.jsonl'}"], "text",
                                          "label", "id", True), d / "audit", progress=False)
                found, extra = recall(res, facts)
                unplanted[lang] += extra
                for k in KINDS:
                    tot[k][0] += found[k]
                    tot[k][1] += len(facts[k])
            cells = "  ".join(f"{k} {a}/{b}" for k, (a, b) in tot.items())
            print(f"{lang} edit {rate:.0%}: {cells}", flush=True)
    print(f"unplanted reports: zh {unplanted['zh']}, en {unplanted['en']} "
          f"(over {len(args.seeds) * len(args.rates)} corpora each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
