"""Classification metrics (sklearn), the per-class text report and the confusion-matrix plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix,
                             f1_score)


def compute_metrics(gold: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    labels = list(range(len(names)))
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", labels=labels, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(gold, pred)) if len(gold) else 0.0,
        "per_class": classification_report(gold, pred, labels=labels, target_names=names, output_dict=True,
                                           zero_division=0),
        "confusion_matrix": confusion_matrix(gold, pred, labels=labels).tolist(),
        "examples": int(len(gold)),
    }


def plot_confusion(cm: list[list[int]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_text(m: dict, names: list[str]) -> str:
    """sklearn-style per-class report (precision, recall, F1, support) of `compute_metrics`' output."""
    pc = m["per_class"]
    lines = [f"{'':>16} precision    recall  f1-score   support"]
    for n in names:
        r = pc[n]
        lines.append(f"{n:>16} {r['precision']:9.3f} {r['recall']:9.3f} {r['f1-score']:9.3f} {int(r['support']):9d}")
    lines.append(f"{'accuracy':>16} {'':9} {'':9} {m['accuracy']:9.3f} {m['examples']:9d}")
    lines.append(f"{'macro avg':>16} {pc['macro avg']['precision']:9.3f} {pc['macro avg']['recall']:9.3f} "
                 f"{m['macro_f1']:9.3f} {m['examples']:9d}")
    return "\n".join(lines)
