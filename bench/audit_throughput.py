"""Audit throughput: documents/s of `llm-dist audit` (scan + merge) on >= 100k documents.

The corpus: the 2,225 real BBC News articles plus synthetic articles whose words are drawn from the BBC
vocabulary with its word frequencies and whose lengths follow the BBC length distribution (so per-document
cost matches real news text), with planted exact copies, near copies (3 words edited) and test->train
copies. 95% train / 5% test, written as jsonl; the audit then runs as a user would run it.

    .venv/bin/python bench/audit_throughput.py                    # 100k documents, all CPU cores
    .venv/bin/python bench/audit_throughput.py --docs 20000 --num_proc 1

Prints one line per figure; the last is `documents/s: N`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_dist.analysis.audit import AuditConfig, file_spec, run_audit  # noqa: E402
from llm_dist.data.sources import bbc_news_records  # noqa: E402


def build_corpus(out: Path, n_docs: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    recs = bbc_news_records()
    counts = Counter(w for r in recs for w in r["text"].split())
    vocab, weights = zip(*counts.items())
    cum = list(itertools.accumulate(weights))
    lengths = [len(r["text"].split()) for r in recs]
    labels = sorted({r["label"] for r in recs})
    docs = [{"id": r["id"], "text": r["text"], "label": r["label"]} for r in recs]
    planted = Counter()
    while len(docs) < n_docs:
        u = rng.random()
        if u < 0.02 and len(docs) > 10:  # exact copy (case / spacing changed)
            src = docs[rng.randrange(len(docs))]
            docs.append({"id": f"syn/{len(docs)}", "text": "  " + src["text"].upper(), "label": src["label"]})
            planted["exact"] += 1
        elif u < 0.04 and len(docs) > 10:  # near copy
            src = docs[rng.randrange(len(docs))]["text"].split()
            for i in rng.sample(range(len(src)), min(3, len(src))):
                src[i] = rng.choice(vocab)
            docs.append({"id": f"syn/{len(docs)}", "text": " ".join(src), "label": rng.choice(labels)})
            planted["near"] += 1
        else:
            n = rng.choice(lengths)
            words = rng.choices(vocab, cum_weights=cum, k=n)
            for i in range(12, n, 18):
                words[i] += "."
            docs.append({"id": f"syn/{len(docs)}", "text": " ".join(words), "label": rng.choice(labels)})
    rng.shuffle(docs)
    n_test = len(docs) // 20
    splits = {"test": docs[:n_test], "train": docs[n_test:]}
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return {"documents": len(docs), "words": sum(len(d["text"].split()) for d in docs), **planted}


def _cpu() -> float:
    """User + system CPU seconds of this process and its (finished) worker processes."""
    import resource

    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--num_proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: whitespace words)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="audit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    facts = build_corpus(work, args.docs)
    print(f"corpus: {facts['documents']} documents ({facts['words']} words, planted {facts['exact']} exact "
          f"and {facts['near']} near copies) built in {time.perf_counter() - t0:.1f}s at {work}")
    spec = file_spec([f"train={work / 'train.jsonl'}", f"test={work / 'test.jsonl'}"], "text", "label", "id", True)
    t0 = time.perf_counter()
    cpu0 = _cpu()
    res = run_audit(spec, work / "audit", AuditConfig(), tokenizer=args.tokenizer, num_proc=args.num_proc,
                    progress=sys.stderr.isatty())
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    docs = sum(s["documents"] for s in res["splits"].values())
    d = res["duplicates"]["train"]
    s = res["leakage_summary"]["test"]
    print(f"audit: scan {res['timing']['scan_s']:.1f}s, merge {res['timing']['merge_s']:.1f}s, "
          f"wall {wall:.1f}s with num_proc={args.num_proc}")
    print(f"found: train {d['exact_extra_copies']} exact + {d['near_extra_copies']} near extra copies; "
          f"test leaks {s['exact']} exact, {s['near']} near, {s['ngram']} ngram of {s['documents']}")
    print(f"cpu: {cpu:.1f}s in all processes = {1000 * cpu / docs:.2f} ms per document "
          f"({docs / cpu:.0f} documents/s per busy core)")
    print(f"documents/s: {docs / wall:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
