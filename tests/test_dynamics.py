"""Training dynamics: the per-example ledger (1 vs 2 ranks, exact across SIGKILL + resume), `llm-dist analyze`
(every detector beats chance on planted noise, --select writes a trainable file, bad input is one line), and
the overhead bench's CLI."""
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import PY, ROOT, kill_tree, launch, launch_cmd, read_run, run_env

TINY = "configs/classify/tiny.yaml"
KEY = ["pass", "id", "epoch", "presentation"]


def make_csv(path: Path, n: int = 400, seed: int = 0) -> Path:
    """A 4-class task a tiny model learns in seconds: each text holds 3 keywords of its class among filler."""
    rng = random.Random(seed)
    classes = {"sport": ["goal", "match", "striker", "league", "coach", "stadium"],
               "tech": ["software", "chip", "laptop", "network", "robot", "browser"],
               "money": ["bank", "shares", "profit", "market", "budget", "investor"],
               "food": ["recipe", "bread", "cheese", "kitchen", "dinner", "spice"]}
    filler = ("the a of and to in is was for on with as by at from that this it said new year people one more "
              "time day week last first two other after over about").split()
    names = sorted(classes)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(n):
            lab = names[i % len(names)]
            words = [rng.choice(filler) for _ in range(rng.randint(8, 14))]
            for _ in range(3):
                words.insert(rng.randrange(len(words) + 1), rng.choice(classes[lab]))
            w.writerow([f"ex{i:04d}", " ".join(words), lab])
    return path


def args_for(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--output_dir={out}", f"--data.train={data}", "--data.id_column=id", "--data.sources=[]",
            f"--tokenizer.path={data.parent / 'tokenizer'}", "--data.max_length=32", "--classify.epochs=6", "--eval_every=0",
            "--save_every=10", "--log_every=5", "--dynamics.enabled=true", "--dynamics.pass=eval",
            "--data.label_noise.rate=0.15", "--model.hidden_dropout=0", "--model.attention_dropout=0",
            "--tracking.progress=false", *extra]  # no dropout: 1 and 2 ranks draw its masks differently


# the same global batch (32) and micro-batch (16) on 1 rank (× 2 accumulation) and on 2 ranks, so both see the
# same examples in the same steps; 320 training examples: 10 steps per epoch, 60 steps
ONE, TWO = ("--batch_size=16", "--grad_accum=2"), ("--batch_size=16", "--grad_accum=1")


def ledger(out: Path) -> pd.DataFrame:
    """Every row of every closed shard, not de-duplicated."""
    files = sorted((out / "dynamics").glob("rank*.parquet"))
    assert files
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The CSV, and one WordPiece trained on it beside it (training one per run is not bit-reproducible)."""
    from llm_dist.models.build import train_wordpiece

    path = make_csv(tmp_path_factory.mktemp("dyn") / "data.csv")
    texts = pd.read_csv(path)["text"].tolist()
    train_wordpiece(iter(texts), 300).save_pretrained(str(path.parent / "tokenizer"))
    return path


@pytest.fixture(scope="module")
def one_rank(data) -> Path:
    out = data.parent / "r1"
    launch(TINY, *args_for(data, out, *ONE), nproc=1)
    return out


def test_detectors_beat_chance_on_planted_noise(one_rank):
    out = one_rank
    s = json.loads((out / "analysis" / "scores.json").read_text())
    assert s["pass"] == "eval" and s["examples"] == 320 and s["epochs"] == 6
    assert s["noise"]["flipped"] > 30
    seen = {k: round(v["auroc"], 3) for k, v in s["detectors"].items()}
    print("AUROC (eval pass):", seen)
    assert set(seen) == {"confidence", "aum", "forgetting", "loss"}
    assert all(v > 0.75 for v in seen.values()), seen  # chance is 0.5
    # the training-pass rows give the same verdict (analyze recomputes from the ledger alone)
    from llm_dist.analysis.dynamics.analyze import analyze

    t = analyze(out, "train", wandb=False)
    seen_t = {k: round(v["auroc"], 3) for k, v in t["detectors"].items()}
    print("AUROC (train pass):", seen_t)
    assert all(v > 0.75 for v in seen_t.values()), seen_t
    scores = pd.read_parquet(out / "analysis" / "example_scores.parquet")
    assert len(scores) == 320 and scores["id"].is_unique
    assert {"id", "label", "text", "confidence", "variability", "correctness", "region", "forgetting_events", "aum",
            "loss_mean", "loss_last", "suspicion_confidence", "suspicion_aum", "suspicion_forgetting",
            "suspicion_loss"} <= set(scores.columns)
    assert set(scores["region"]) <= {"easy", "ambiguous", "hard"}
    assert pd.read_csv(out / "analysis" / "example_scores.csv").shape[0] == 320
    issues = pd.read_csv(out / "analysis" / "label_issues.csv")
    assert list(issues.columns[:5]) == ["rank", "id", "given_label", "suggested_label", "score"]
    assert (issues["given_label"] != issues["suggested_label"]).all() and issues["score"].is_monotonic_decreasing
    flipped = {r["id"] for r in json.loads((out / "noise.json").read_text())["flipped"]}
    assert issues["id"].head(20).isin(flipped).mean() > 0.7
    assert "Detectors vs planted noise" in (out / "analysis" / "report.md").read_text()
    assert "data:image/png;base64" in (out / "analysis" / "report.html").read_text()
    assert (out / "analysis" / "data_map.png").stat().st_size > 5000
    assert read_run(out)["dynamics"]["examples"] == 320
    # every presentation once: 6 epochs × 320 train rows, 6 × 320 eval rows, no duplicate key
    raw = ledger(out)
    assert not raw.duplicated(KEY).any()
    assert (raw["pass"] == "train").sum() == 6 * 320 and (raw["pass"] == "eval").sum() == 6 * 320
    assert sorted(raw["step"].unique()) == list(range(1, 61))


def test_one_and_two_ranks_write_the_same_ledger(one_rank, data):
    out2 = data.parent / "r2"
    launch(TINY, *args_for(data, out2, *TWO, "--dynamics.analyze=false"), nproc=2)
    a, b = ledger(one_rank), ledger(out2)
    assert set(b["rank"]) == {0, 1} and not b.duplicated(KEY).any()
    a, b = a.sort_values(KEY).reset_index(drop=True), b.sort_values(KEY).reset_index(drop=True)
    assert a[KEY + ["step", "label"]].equals(b[KEY + ["step", "label"]])
    diff = (a["p_gold"] - b["p_gold"]).abs().max()
    print("max |p_gold 1 rank - 2 ranks|:", diff)
    assert diff < 1e-3


def test_sigkill_and_resume_keep_the_ledger_exact(one_rank, data):
    cut = data.parent / "cut"
    args = args_for(data, cut, *ONE, "--dynamics.analyze=false")
    proc = subprocess.Popen(launch_cmd(TINY, *args, nproc=1), cwd=ROOT, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, metrics = cut / "checkpoints" / "latest", cut / "metrics.jsonl"
    deadline = time.time() + 300
    # kill once rows past the newest checkpoint have been flushed (an unclosed shard holds them)
    while True:
        assert proc.poll() is None and time.time() < deadline
        if latest.exists() and metrics.exists():
            steps = [json.loads(l).get("step", 0) for l in metrics.read_text().splitlines() if l.strip()]
            ck = latest.read_text().strip()
            if ck.startswith("step_") and steps and max(steps) > int(ck[5:]) >= 20:
                break
        time.sleep(0.01)
    kill_tree(proc)
    assert list((cut / "dynamics").glob(".rank*")), "expected an unclosed shard at the kill"
    launch(TINY, *args, nproc=1)
    assert not list((cut / "dynamics").glob(".rank*"))
    a, b = ledger(one_rank), ledger(cut)
    assert not b.duplicated(KEY).any()  # nothing written twice, even before the merge de-duplicates
    a, b = a.sort_values(KEY).reset_index(drop=True), b.sort_values(KEY).reset_index(drop=True)
    assert a[KEY + ["step"]].equals(b[KEY + ["step"]])  # nothing lost
    assert (a["p_gold"] - b["p_gold"]).abs().max() < 1e-5


def test_select_writes_a_trainable_file(one_rank, data, tmp_path):
    f = tmp_path / "ambiguous.jsonl"
    p = subprocess.run([PY, "-m", "llm_dist.cli", "analyze", str(one_rank), "--select", "ambiguous", "--fraction",
                        "0.33", "--out", str(f), "--quiet"], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in f.read_text().splitlines()]
    assert len(rows) == round(0.33 * 320) and all(set(r) == {"id", "text", "label"} for r in rows)
    from llm_dist.analysis.dynamics.analyze import load

    scores = load(one_rank)[0]  # the run's pass (eval), as --select used
    top = scores.sort_values("variability", ascending=False)["variability"]
    chosen = scores.set_index("id").loc[[r["id"] for r in rows], "variability"]
    assert chosen.min() >= top.iloc[len(rows) - 1] - 1e-12
    # train on a selection (the easiest half: every class is in it, so the stratified split can be cut)
    f = tmp_path / "easy.jsonl"
    p = subprocess.run([PY, "-m", "llm_dist.cli", "analyze", str(one_rank), "--select", "easy", "--fraction", "0.5",
                        "--out", str(f), "--quiet"], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(f.read_text().splitlines()) == 160
    out = tmp_path / "sel"
    launch(TINY, f"--output_dir={out}", f"--data.train={f}", "--data.id_column=id", "--data.sources=[]",
           f"--tokenizer.path={data.parent / 'tokenizer'}", "--data.max_length=32", "--max_steps=2", "--eval_every=0",
           "--tracking.progress=false", nproc=1)
    assert read_run(out)["final_step"] == 2


def test_analyze_logs_to_wandb_offline(one_rank, tmp_path, monkeypatch):
    """A run that reported to W&B gets the data map, the detector table and sampled examples there (offline)."""
    import shutil

    from llm_dist.analysis.dynamics.analyze import analyze

    run = tmp_path / "run"
    run.mkdir()
    for name in ("dynamics", "splits"):
        shutil.copytree(one_rank / name, run / name)
    for name in ("config.yaml", "noise.json"):
        shutil.copy(one_rank / name, run / name)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("report_to: none", "report_to: wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    analyze(run)
    media = [m for m in (run / "wandb").glob("offline-run-*/files/media/**/*") if m.is_file()]
    assert any("data_map" in m.name for m in media) and any("detectors" in m.name for m in media), media


def test_analyze_bad_input_is_one_line(tmp_path):
    for d in (tmp_path / "missing", tmp_path):
        p = subprocess.run([PY, "-m", "llm_dist.cli", "analyze", str(d)], cwd=ROOT, env=run_env(),
                           capture_output=True, text=True)
        assert p.returncode == 2
        err = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), p.stderr


def test_config_refuses_mlm_and_bad_pass():
    from llm_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="dynamics.enabled"):
        load_config("configs/mlm/tiny.yaml", ["--dynamics.enabled=true"])
    with pytest.raises(ConfigError, match="dynamics.pass"):
        load_config(TINY, ["--dynamics.pass=both"])
    assert load_config(TINY, ["--dynamics.pass=eval"]).dynamics.pass_ == "eval"


def test_overhead_bench_help():
    p = subprocess.run([PY, "bench/dynamics_overhead.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "overhead" in p.stdout
