"""Scoring detectors of mislabeled examples against planted noise, and against each other.

Every detector is a `suspicion_<name>` column of an `example_scores` table (one row per training id;
higher = more likely mislabeled). Given the flipped ids (`data.label_noise` → `noise.json`), each detector
gets AUROC, AUPRC (average precision), precision@k with k = the number flipped, and the base rate
(AUPRC of a random detector); detectors are compared by Spearman correlation and top-k overlap.
"""
from __future__ import annotations

import numpy as np


def suspicion_columns(df) -> list[str]:
    return [c for c in df.columns if c.startswith("suspicion_")]


def score_detectors(df, flipped: set[str]) -> dict:
    """{detector: {auroc, auprc, precision_at_k, k, base_rate}} for every suspicion column of `df`."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.array([i in flipped for i in df["id"].astype(str)], dtype=bool)
    k = int(truth.sum())
    out = {}
    for col in suspicion_columns(df):
        s = df[col].to_numpy(dtype=float)
        ok = np.isfinite(s)
        if k == 0 or k == len(truth) or ok.sum() < 2 or len(set(truth[ok])) < 2:
            continue
        top = np.argsort(-np.where(ok, s, -np.inf), kind="stable")[:k]
        out[col[len("suspicion_"):]] = {
            "auroc": float(roc_auc_score(truth[ok], s[ok])),
            "auprc": float(average_precision_score(truth[ok], s[ok])),
            "precision_at_k": float(truth[top].mean()),
            "k": k,
            "base_rate": float(truth.mean()),
        }
    return out


def agreement(df, k: int | None = None) -> dict:
    """Pairwise Spearman correlation and top-k overlap (k: the number flipped, else 10%) of the detectors."""
    from scipy.stats import spearmanr

    cols = suspicion_columns(df)
    k = k or max(1, len(df) // 10)
    out = {}
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            x, y = df[a].to_numpy(dtype=float), df[b].to_numpy(dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            rho = float(spearmanr(x[ok], y[ok]).statistic) if ok.sum() > 2 else float("nan")
            ta = set(np.argsort(-np.where(np.isfinite(x), x, -np.inf), kind="stable")[:k])
            tb = set(np.argsort(-np.where(np.isfinite(y), y, -np.inf), kind="stable")[:k])
            out[f"{a[len('suspicion_'):]} ~ {b[len('suspicion_'):]}"] = {"spearman": rho,
                                                                          "top_k_overlap": len(ta & tb) / k}
    return out


def detector_table(scores: dict) -> str:
    """A markdown table of `score_detectors` output."""
    lines = ["| detector | AUROC | AUPRC | precision@k | k | base rate |", "| --- | --- | --- | --- | --- | --- |"]
    for name, m in sorted(scores.items(), key=lambda kv: -kv[1]["auroc"]):
        lines.append(f"| {name} | {m['auroc']:.3f} | {m['auprc']:.3f} | {m['precision_at_k']:.3f} | {m['k']} | "
                     f"{m['base_rate']:.3f} |")
    return "\n".join(lines)
