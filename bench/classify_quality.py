"""What BBC News topic classification reaches, measured: the pretrained MiniLM-L6 fine-tuned by llm_dist
(3 seeds, mean ± std) next to a TF-IDF + logistic-regression baseline, on one fixed stratified split, each
reported on all test articles and on the clean subset (no exact / near / 13-gram overlap with train,
from `llm-dist audit`).

    .venv/bin/python bench/classify_quality.py [--config configs/classify/minilm_bbc.yaml] [--seeds 1 2 3] [--key=value ...]

Prints a table and writes runs/quality/quality.json."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tfidf_baseline(cfg, leaked: set) -> dict:
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from llm_dist.data.classify import load_splits

    sp = load_splits(cfg)
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    x_train = vec.fit_transform(list(sp["train"]["text"]))
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x_train, list(sp["train"]["label"]))
    pred = clf.predict(vec.transform(list(sp["test"]["text"])))
    gold = np.array(list(sp["test"]["label"]))
    clean = np.array([i not in leaked for i in sp["test"]["id"]])

    def m(mask):
        return {"accuracy": float(accuracy_score(gold[mask], pred[mask])),
                "macro_f1": float(f1_score(gold[mask], pred[mask], average="macro")), "examples": int(mask.sum())}
    return {"test": m(np.ones_like(clean)), "test_clean": m(clean)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/classify/minilm_bbc.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default="runs/quality")
    args, overrides = ap.parse_known_args()  # the rest: --key=value for every fine-tuning run
    args.overrides = overrides
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    from llm_dist.analysis.audit import leaked_ids
    from llm_dist.config import load_config

    audit_dir = out / "audit"
    subprocess.run([py, "-m", "llm_dist.analysis.audit", args.config, f"--output_dir={audit_dir}", "--quiet"], cwd=ROOT, check=True)
    audit = audit_dir / "audit.json"
    leaked = leaked_ids(str(audit), split="test")

    runs = []
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        t0 = time.time()
        subprocess.run([py, "train.py", args.config, f"--seed={seed}", f"--output_dir={run_dir}", "--resume=never",
                        "--overwrite=true", f"--data.audit={audit}", "--tracking.progress=false", *args.overrides],
                       cwd=ROOT, check=True)
        run = json.loads((run_dir / "run.json").read_text())
        run["wall_seconds"] = time.time() - t0
        runs.append(run)
        print(f"seed {seed}: test accuracy {run['test']['accuracy']:.4f} macro-F1 {run['test']['macro_f1']:.4f} "
              f"(clean {run['test_clean']['accuracy']:.4f}) in {run['wall_seconds']:.0f} s", flush=True)

    base = tfidf_baseline(load_config(args.config, []), leaked)

    def ms(key, sub):
        vals = [r[sub][key] for r in runs]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    rows = []
    for sub in ("test", "test_clean"):
        (a, sa), (f, sf) = ms("accuracy", sub), ms("macro_f1", sub)
        rows.append((sub, f"{a:.4f} ± {sa:.4f}", f"{f:.4f} ± {sf:.4f}", f"{base[sub]['accuracy']:.4f}",
                     f"{base[sub]['macro_f1']:.4f}", runs[0][sub]["examples"]))
    print(f"\n{'subset':<11} {'MiniLM acc':>17} {'MiniLM macro-F1':>17} {'TF-IDF acc':>11} {'TF-IDF F1':>10} {'n':>4}")
    for r in rows:
        print(f"{r[0]:<11} {r[1]:>17} {r[2]:>17} {r[3]:>11} {r[4]:>10} {r[5]:>4}")
    secs = statistics.mean(r["wall_seconds"] for r in runs)
    print(f"\nmean wall time per fine-tuning run: {secs:.0f} s ({runs[0]['final_step']} steps)")
    (out / "quality.json").write_text(json.dumps({"config": args.config, "seeds": args.seeds, "overrides": args.overrides, "runs": [
        {k: r[k] for k in ("test", "test_clean", "wall_seconds", "train_seconds", "final_step")} for r in runs],
        "tfidf": base}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
