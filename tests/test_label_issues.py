"""`llm-dist label-issues`: K folds of a classify config locally on a small synthetic task with 15% planted
label noise; every detector (out-of-fold loss, cleanlab) beats chance by a margin; finished folds are skipped
on a re-run; --dry-run runs nothing; bad input is one line and exit 2; a full-data run's detectors merge in."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, run_env

FOLDS = 3
CLASSES = {
    "sport": ["football", "match", "goal", "team", "player", "coach", "league", "cup"],
    "tech": ["computer", "software", "internet", "phone", "digital", "network", "chip", "data"],
    "money": ["market", "shares", "profit", "bank", "economy", "prices", "trade", "investors"],
}
FILLER = ["the", "a", "of", "and", "to", "in", "on", "was", "is", "said", "new", "year", "people", "after", "with",
          "for", "they", "this", "that", "from", "by", "it", "at", "but"]
PER_CLASS = 100
RATE = 0.15


def _synthetic(path: Path) -> Path:
    """Short texts: 3–4 keywords of their class among filler words (a tiny BERT learns it in seconds)."""
    rng = random.Random(0)
    rows = []
    for label, words in CLASSES.items():
        for _ in range(PER_CLASS):
            toks = [rng.choice(FILLER) for _ in range(rng.randint(8, 12))] + rng.sample(words, rng.randint(3, 4))
            rng.shuffle(toks)
            rows.append({"id": f"ex{len(rows):04d}", "text": " ".join(toks), "label": label})
    rng.shuffle(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def _args(data: Path) -> list[str]:
    return [str(ROOT / "configs" / "classify" / "tiny.yaml"), f"--data.train={data}", "--data.id_column=id", "--data.max_length=32",
            "--classify.epochs=6", "--batch_size=16", "--optim.lr=3e-3", "--tokenizer.vocab_size=512",
            f"--data.label_noise.rate={RATE}", "--data.label_noise.seed=1", "--tracking.progress=false",
            "--log_every=20", "--seed=3"]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "llm_dist.cli", "label-issues", *args], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


class _Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _inproc(capsys, *args: str) -> _Done:
    """`llm-dist label-issues ARGS` in this process (no fold runs: dry runs, re-scoring, bad input)."""
    from llm_dist.cli import main

    capsys.readouterr()
    rc = main(["label-issues", *args])
    out = capsys.readouterr()
    return _Done(rc, out.out, out.err)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    d = tmp_path_factory.mktemp("label_issues")
    data = _synthetic(d / "synthetic.csv")
    out = d / "li"
    t0 = time.time()
    p = _cli(*_args(data), "--folds", str(FOLDS), "--output_dir", str(out), "--quiet")
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    print(f"\nlabel-issues, {FOLDS} folds: {time.time() - t0:.1f} s\n{p.stdout}")
    return {"dir": out, "data": data, "stdout": p.stdout}


def test_detectors_beat_chance(done):
    import pandas as pd

    from llm_dist.config import load_config
    from llm_dist.data.classify import load_splits, planted_noise

    out = done["dir"]
    df = pd.read_parquet(out / "example_scores.parquet")
    cfg = load_config(_args(done["data"])[0], _args(done["data"])[1:])
    train = load_splits(cfg)["train"]
    flipped = {r["id"] for r in planted_noise(train)}
    # every training example has an out-of-fold row, scored against the noisy label the folds trained on
    assert sorted(df["id"]) == sorted(train["id"])
    given = dict(zip(train["id"], train["label"]))
    assert all(given[i] == lab for i, lab in zip(df["id"], df["label"]))
    assert set(df["fold"]) == set(range(FOLDS))
    for col in ("text", "oof_prob_given", "oof_loss", "suggested_label", "cleanlab_issue", "suspicion_oof_loss",
                "suspicion_cleanlab"):
        assert col in df.columns, col
    assert {r["id"] for r in json.loads((out / "noise.json").read_text())["flipped"]} == flipped
    assert 0.08 < len(flipped) / len(df) < 0.22
    scores = json.loads((out / "scores.json").read_text())
    det = scores["detectors"]
    assert set(det) == {"oof_loss", "cleanlab"}
    for name, m in det.items():  # well above chance: AUROC 0.5, precision@k = the base rate
        assert m["auroc"] > 0.8, (name, m)
        assert m["precision_at_k"] > m["base_rate"] + 0.3, (name, m)
        assert m["auprc"] > 2 * m["base_rate"], (name, m)
    assert scores["cleanlab_issue_flag"]["precision"] > 0.5
    assert "oof_loss ~ cleanlab" in scores["agreement"]
    report = (out / "report.md").read_text()
    assert "| detector | AUROC | AUPRC | precision@k" in report and "| oof_loss |" in report
    assert "<table>" in (out / "report.html").read_text()
    issues = pd.read_csv(out / "label_issues.csv")
    assert list(issues.columns[:4]) == ["id", "given_label", "suggested_label", "score"]
    assert issues["id"].head(20).isin(flipped).mean() > 0.5  # the top of the ranking is mostly planted flips
    assert (out / "example_scores.csv").exists()
    fold0 = json.loads((out / "fold_0" / "run.json").read_text())
    assert not fold0.get("signalled") and (out / "fold_0" / "predictions.jsonl").exists()


def test_rerun_skips_finished_folds_and_merges_a_run(done, tmp_path, capsys):
    import numpy as np
    import pandas as pd

    out = done["dir"]
    stamps = {k: (out / f"fold_{k}" / "run.json").stat().st_mtime_ns for k in range(FOLDS)}
    # a full-data run's analysis table (another detector) merges in by id
    run = tmp_path / "run"
    (run / "analysis").mkdir(parents=True)
    ids = list(pd.read_parquet(out / "example_scores.parquet")["id"])
    pd.DataFrame({"id": ids, "label": "x", "text": "y",
                  "suspicion_aum": np.random.default_rng(0).random(len(ids))}).to_parquet(
        run / "analysis" / "example_scores.parquet")
    p = _inproc(capsys, *_args(done["data"]), "--folds", str(FOLDS), "--output_dir", str(out), "--quiet", "--run", str(run))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{FOLDS} of {FOLDS} folds already finished (skipped)" in p.stdout
    assert stamps == {k: (out / f"fold_{k}" / "run.json").stat().st_mtime_ns for k in range(FOLDS)}
    df = pd.read_parquet(out / "example_scores.parquet")
    assert "suspicion_aum" in df.columns and df["suspicion_aum"].notna().all()
    assert (df["label"] != "x").all()  # our label column, not the run's
    assert set(json.loads((out / "scores.json").read_text())["detectors"]) == {"oof_loss", "cleanlab", "aum"}
    # a fold whose run stopped on a signal (or never finished) runs again; the others stay skipped
    rj = out / "fold_1" / "run.json"
    saved = rj.read_text()
    try:
        rj.write_text(json.dumps({"final_step": 3, "signalled": True}))
        p = _inproc(capsys, *_args(done["data"]), "--folds", str(FOLDS), "--output_dir", str(out), "--dry-run")
        assert p.returncode == 0, p.stderr
        assert "fold 0: " in p.stdout and "fold_0: done (skipped)" in p.stdout
        assert "fold_1: would run" in p.stdout and "fold_2: done (skipped)" in p.stdout
    finally:
        rj.write_text(saved)
    # another config in the same DIR is refused (its finished folds would be wrong)
    p = _inproc(capsys, *_args(done["data"]), "--seed=4", "--folds", str(FOLDS), "--output_dir", str(out))
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_dry_run_lists_folds_and_runs_nothing(tmp_path, capsys):
    data = _synthetic(tmp_path / "synthetic.csv")
    out = tmp_path / "dry"
    p = _inproc(capsys, *_args(data), "--folds", "4", "--output_dir", str(out), "--dry-run")
    assert p.returncode == 0, p.stderr
    assert [line.split(":")[0] for line in p.stdout.splitlines() if line.startswith("fold ")] == \
        ["fold 0", "fold 1", "fold 2", "fold 3"]
    assert p.stdout.count("would run") == 4 and "llm_dist.cli train" in p.stdout
    assert not out.exists()
    # the SLURM backend: one array task per fold of slurm/sweep_array.sbatch, each in DIR/fold_k
    p = _inproc(capsys, *_args(data), "--folds", "3", "--output_dir", str(out), "--dry-run", "--backend", "slurm",
             "--sbatch_args", "--partition=cpu")
    assert p.returncode == 0, p.stderr
    assert "--array=0,1,2" in p.stdout and "sweep_array.sbatch" in p.stdout and "TASK_DIR_PREFIX=fold_" in p.stdout
    assert "--partition=cpu" in p.stdout and f"OUTPUT_DIR={out}" in p.stdout
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--folds", "1"], "--folds"),
    (["--folds", "500"], "every class needs at least 500"),
    (["--backend", "cloud"], "--backend"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, needle):
    data = _synthetic(tmp_path / "synthetic.csv")
    args = [*_args(data), "--folds", "3", "--output_dir", str(tmp_path / "out")]
    p = _inproc(capsys, *args, *extra)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_mlm_config_is_refused(tmp_path, capsys):
    p = _inproc(capsys, str(ROOT / "configs" / "mlm" / "tiny.yaml"), "--folds", "3", "--output_dir", str(tmp_path / "out"))
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "classify" in p.stderr, p.stderr
