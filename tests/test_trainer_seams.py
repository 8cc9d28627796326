"""The trainer's seams (issue 11): callbacks see every step's per-example outputs; epochs are evaluated
and saved on `eval_every: epoch`; a classify epoch keeps every example once (partial last batch), also
across a resume on another world size; the best model and early stopping survive a SIGKILL + resume."""
from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, kill_tree, launch, launch_cmd, read_metrics, read_run, run_env

CLS = "configs/classify/tiny.yaml"
pytestmark = pytest.mark.slow


class Recorder:
    """A callback that keeps what the loop hands callbacks: ids, per-example losses, logits."""

    name = "recorder"

    def __init__(self):
        from llm_dist.training.callbacks import Callback

        self.__class__ = type("RecorderCallback", (Recorder, Callback), {})
        self.ids, self.checks, self.evals = [], [], []

    def on_step_end(self, ctx, out):
        for batch, res in zip(out.batches, out.outputs):
            self.ids += ctx.task.example_ids(batch)
            self.checks.append((res.per_example.sum().item(), res.loss_sum.item(), tuple(res.logits.shape),
                                int(batch["weight"].sum().item()), len(batch["labels"])))

    def on_evaluate(self, ctx, metrics):
        self.evals.append(ctx.step)


def test_epoch_cadence_and_per_example_outputs(tmp_path, tokenizer_dir, capsys):
    """`eval_every: epoch` / `save_every: epoch` with a report each epoch (the seed recipe); the callback
    sees each training example exactly once per epoch (the last partial batch kept), and the per-example
    losses sum to the step's loss from the same forward pass."""
    from llm_dist.config import load_config
    from llm_dist.training.loop import run

    out = tmp_path / "run"
    cfg = load_config(CLS, [f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--classify.epochs=2",
                            "--eval_every=epoch", "--save_every=epoch", "--classify.report_every_epoch=true",
                            "--tracking.progress=false", "--batch_size=64", "--data.max_length=32"])
    rec = Recorder()
    result = run(cfg, callbacks=[rec])
    train_ids = (out / "splits" / "train.txt").read_text().split()
    n = len(train_ids)
    spe = -(-n // 64)  # ceil: the partial last batch is a step of its own
    assert n % 64 and result["final_step"] == 2 * spe
    assert sorted(rec.ids[: n]) == sorted(train_ids) and sorted(rec.ids[n:]) == sorted(train_ids)
    assert rec.evals == [spe, 2 * spe]  # once per epoch (the second is the final evaluation)
    for per_example_sum, loss_sum, logits_shape, real, rows in rec.checks:
        assert per_example_sum == pytest.approx(loss_sum, rel=1e-5) and logits_shape == (rows, 5)
    assert rec.checks[spe - 1][3] == n - (spe - 1) * 64  # the partial batch: its real examples only
    printed = capsys.readouterr().out
    assert printed.count("(validation):") == 2 and "epoch 1.00" in printed and "epoch 2.00" in printed
    assert (out / "checkpoints" / f"step_{spe:08d}").is_dir()
    evals = [r for r in read_metrics(out) if "eval_accuracy" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]


def test_classify_resume_on_fewer_ranks_continues_after_the_last_example(tmp_path, tokenizer_dir):
    """2 ranks × batch 16 for 7 steps → resumed on 1 rank × batch 16: over the epoch each example once."""
    from llm_dist.config import load_config
    from llm_dist.data.classify import GlobalBatches
    from llm_dist.training.loop import run

    out = tmp_path / "run"
    args = [f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--batch_size=16", "--eval_every=0",
            "--tracking.progress=false", "--data.group_by_length=false", "--data.max_length=32"]
    launch(CLS, *args, "--max_steps=7", "--save_every=7")
    assert read_run(out)["world_size"] == 2
    state = json.loads((out / "checkpoints" / "step_00000007" / "trainer_state.json").read_text())
    assert state["batches"] == {"epoch": 0, "consumed": 7 * 32}
    train_ids = (out / "splits" / "train.txt").read_text().split()
    n = len(train_ids)
    # what the 2 ranks consumed: the first 224 examples of epoch 0's global order
    labels = [0] * n  # (the order does not depend on labels without resampling)
    before = GlobalBatches([1] * n, labels, 32, 16, 0, 2, 42, False, False).epoch_order(0)[: 7 * 32]
    rec = Recorder()
    rest = -(-(n - 7 * 32) // 16)
    cfg = load_config(CLS, args + [f"--max_steps={7 + rest}"])
    result = run(cfg, callbacks=[rec])
    assert result["world_size"] == 1 and result["final_step"] == 7 + rest
    seen = [train_ids[i] for i in before] + rec.ids
    assert len(seen) == len(set(seen)) == n


def test_best_model_and_early_stop_survive_sigkill_resume(tmp_path, tokenizer_dir):
    """A classify run with evaluations, early stopping and checkpoints, SIGKILLed after the checkpoint that
    follows its best evaluation and resumed on 2 ranks, ends like the uninterrupted run: the same best step,
    early-stop step and final/ weights (the best model's, restored from best_model/ on resume)."""
    args = [f"--tokenizer.path={tokenizer_dir}", "--max_steps=150", "--eval_every=10", "--save_every=10",
            "--classify.early_stopping_patience=2", "--batch_size=8", "--tracking.progress=false"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(CLS, f"--output_dir={full}", *args)
    ref = read_run(full)
    best_step, stop_step = ref["best"]["step"], ref["final_step"]
    assert stop_step < 150 and best_step < stop_step  # early stopping really happened, after a best
    kill_at = best_step + 10
    assert kill_at < stop_step
    proc = subprocess.Popen(launch_cmd(CLS, f"--output_dir={cut}", *args), cwd=ROOT, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text().strip() == f"step_{kill_at:08d}"):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    kill_tree(proc)
    assert not (cut / "run.json").exists()
    launch(CLS, f"--output_dir={cut}", *args)
    res = read_run(cut)
    assert res["best"] == ref["best"] and res["final_step"] == stop_step and res["world_size"] == 2
    from safetensors.torch import load_file

    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    best = load_file(full / "best_model" / f"step_{best_step:08d}.safetensors")
    common = [k for k in a if k in best]
    assert common and all(torch.equal(a[k], best[k]) for k in common)  # final/ holds the best weights
    assert ref["test"]["accuracy"] == res["test"]["accuracy"]
