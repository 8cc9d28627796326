"""Planted label noise (`data.label_noise`): flip a fraction of the training labels, deterministically by
example id, so detectors of mislabeled data can be scored against the truth (`output_dir/noise.json`).

- `symmetric`: a flipped example gets one of the other classes, uniformly;
- `pair`: class c → the next class (sorted label names, wrapping around) — a systematic confusion;
- `class_conditional`: a noise matrix drawn from `seed`: class c flips at a rate drawn uniformly in
  [0.5, 1.5] × `rate` (capped at 0.9), to the other classes in proportions drawn from a Dirichlet(1).

Whether an example flips, and to which class, depends only on (seed, id) — not on the split's order, the
world size or the fold — so a run, its folds and its reruns flip exactly the same examples.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def _unit(seed: int, key: str, salt: str) -> float:
    """A uniform [0, 1) number from (seed, id, salt)."""
    h = hashlib.blake2b(f"{seed}\x00{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def noise_matrix(names: list[str], rate: float, kind: str, seed: int) -> np.ndarray:
    """T[i, j]: probability that an example of class i is labelled j."""
    k = len(names)
    T = np.zeros((k, k))
    rng = np.random.default_rng([seed, 7])
    for i in range(k):
        if kind == "symmetric":
            r, off = rate, np.full(k, 1.0 / (k - 1))
        elif kind == "pair":
            r, off = rate, np.eye(k)[(i + 1) % k]
        else:  # class_conditional
            r, off = min(0.9, rate * rng.uniform(0.5, 1.5)), rng.dirichlet(np.ones(k))
        off[i] = 0.0
        off = off / off.sum()
        T[i] = r * off
        T[i, i] = 1.0 - r
    return T


def flip_labels(ids: list[str], labels: list[str], names: list[str], rate: float, kind: str,
                seed: int) -> tuple[list[str], list[dict]]:
    """(noisy labels, [{"id", "original", "noisy"} for each flipped example])."""
    if rate <= 0 or len(names) < 2:
        return list(labels), []
    T = noise_matrix(names, rate, kind, seed)
    index = {n: i for i, n in enumerate(names)}
    noisy, flipped = [], []
    for doc_id, lab in zip(ids, labels):
        row = T[index[lab]]
        stay = row[index[lab]]
        u = _unit(seed, doc_id, "flip")
        if u < stay:
            noisy.append(lab)
            continue
        v = _unit(seed, doc_id, "to")  # which other class, by the row's off-diagonal mass
        off = row.copy()
        off[index[lab]] = 0.0
        cum = np.cumsum(off / off.sum())
        new = names[int(min(np.searchsorted(cum, v, side="right"), len(names) - 1))]
        noisy.append(new)
        flipped.append({"id": doc_id, "original": lab, "noisy": new})
    return noisy, flipped


def write_noise(path: Path, cfg_noise, flipped: list[dict], n_train: int) -> None:
    from ..config import write_text_atomic

    write_text_atomic(path, json.dumps({"rate": cfg_noise.rate, "kind": cfg_noise.kind, "seed": cfg_noise.seed,
                                        "train_examples": n_train, "flipped_count": len(flipped),
                                        "flipped": flipped}, indent=1))


def read_flipped(run_dir: Path) -> set[str] | None:
    """The ids flipped in a run (None when it planted no noise)."""
    f = Path(run_dir) / "noise.json"
    if not f.exists():
        return None
    return {r["id"] for r in json.loads(f.read_text())["flipped"]}
