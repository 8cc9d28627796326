"""Planted label noise (data.label_noise) and the detector scoring it feeds."""
import json

import numpy as np
import pandas as pd
import pytest

from llm_dist.analysis.detectors import agreement, score_detectors
from llm_dist.data.noise import flip_labels, noise_matrix


@pytest.mark.parametrize("kind", ["symmetric", "pair", "class_conditional"])
def test_flips_rate_kind_and_determinism(kind):
    names = ["a", "b", "c", "d"]
    ids = [f"doc:{i}" for i in range(4000)]
    labels = [names[i % 4] for i in range(4000)]
    noisy, flipped = flip_labels(ids, labels, names, 0.2, kind, seed=3)
    assert abs(len(flipped) / 4000 - 0.2) < 0.03
    assert all(r["noisy"] != r["original"] for r in flipped)
    assert sum(n != o for n, o in zip(noisy, labels)) == len(flipped)
    if kind == "pair":
        assert all(names.index(r["noisy"]) == (names.index(r["original"]) + 1) % 4 for r in flipped)
    # by id, not by position: shuffling the input flips the same ids; another seed flips others
    perm = np.random.default_rng(0).permutation(4000)
    _, again = flip_labels([ids[i] for i in perm], [labels[i] for i in perm], names, 0.2, kind, seed=3)
    assert {r["id"] for r in again} == {r["id"] for r in flipped}
    _, other = flip_labels(ids, labels, names, 0.2, kind, seed=4)
    assert {r["id"] for r in other} != {r["id"] for r in flipped}
    T = noise_matrix(names, 0.2, kind, 3)
    assert np.allclose(T.sum(1), 1.0) and (T >= 0).all()


def test_detector_scores_are_right_on_known_rankings():
    ids = [str(i) for i in range(100)]
    flipped = {str(i) for i in range(10)}
    df = pd.DataFrame({"id": ids, "suspicion_perfect": [1.0 if i < 10 else 0.0 for i in range(100)],
                       "suspicion_inverse": [0.0 if i < 10 else 1.0 for i in range(100)],
                       "suspicion_random": np.random.default_rng(0).random(100)})
    s = score_detectors(df, flipped)
    assert s["perfect"]["auroc"] == 1.0 and s["perfect"]["precision_at_k"] == 1.0 and s["perfect"]["k"] == 10
    assert s["inverse"]["auroc"] == 0.0 and s["inverse"]["precision_at_k"] == 0.0
    assert 0.2 < s["random"]["auroc"] < 0.8 and s["random"]["base_rate"] == 0.1
    a = agreement(df, k=10)
    assert a["perfect ~ inverse"]["spearman"] < -0.9 and a["perfect ~ inverse"]["top_k_overlap"] == 0.0


def test_noise_json_from_a_run_config(tmp_path):
    """load_splits flips training labels only, and the task's noise.json lists exactly those ids."""
    from llm_dist.config import load_config
    from llm_dist.data.classify import load_splits, planted_noise

    cfg = load_config("configs/classify/tiny.yaml", ["--data.label_noise.rate=0.1", "--data.label_noise.kind=pair",
                                                     f"--output_dir={tmp_path}"])
    clean = load_splits(load_config("configs/classify/tiny.yaml", [f"--output_dir={tmp_path}"]))
    noisy = load_splits(cfg)
    flipped = planted_noise(noisy["train"])
    assert 0.07 < len(flipped) / len(noisy["train"]) < 0.13
    changed = {i for i, a, b in zip(noisy["train"]["id"], noisy["train"]["label"], clean["train"]["label"]) if a != b}
    assert changed == {r["id"] for r in flipped}
    assert list(noisy["test"]["label"]) == list(clean["test"]["label"])  # evaluation data stays clean
    json.dumps(flipped)
