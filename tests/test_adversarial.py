"""Adversarial training on `inputs_embeds` (issue 15): FGM's perturbation has norm ε per example, PGD stays
in the ε ball, FreeLB with K = 1 and zero init is exactly the plain step, the global-count loss scaling is
kept (one micro-batch of 8 = two of 4; 2 DDP ranks = 1 process), and a 2-rank run with augmentation,
adversarial training and the robustness evaluation works end to end."""
import copy
import re
import json

import pandas as pd
import pytest
import torch

from conftest import ROOT, launch, read_metrics, read_run, run_env
from issue15_helpers import write_bbc_subset
from llm_dist.training.steps import STEP_STRATEGIES, PlainStep, project, row_norms

TINY = "configs/classify/tiny.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_bbc_subset(tmp_path_factory.mktemp("advdata"), words=24)


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory, tokenizer_dir):
    from accelerate import Accelerator

    from llm_dist.config import load_config
    from llm_dist.tasks.classify.task import ClassifyTask

    d = data_dir
    cfg = load_config(TINY, [
        f"--data.train={d}/train.jsonl", f"--data.validation={d}/validation.jsonl", f"--data.test={d}/test.jsonl",
        f"--output_dir={tmp_path_factory.mktemp('advrun')}", f"--tokenizer.path={tokenizer_dir}", "--batch_size=8",
        "--model.hidden_dropout=0", "--model.attention_dropout=0"])
    acc = Accelerator()
    torch.manual_seed(0)
    task = ClassifyTask(cfg, acc)
    batch = task.collate["train"](list(range(8)))
    return cfg, acc, task, batch


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _run(setup, method, micro=None, **adv):
    cfg, acc, task, batch = setup
    a = copy.deepcopy(cfg.classify.adversarial)
    for k, v in adv.items():
        setattr(a, k, v)
    step = PlainStep() if method == "plain" else STEP_STRATEGIES[method](a)
    model = copy.deepcopy(task.model)
    model.train()
    torch.manual_seed(1)
    r = step(model, task, micro or [batch], acc, 1)
    return step, r, _grads(model)


def test_fgm_perturbation_norm_is_epsilon(setup):
    for eps in (0.3, 2.0):
        step, r, g = _run(setup, "fgm", epsilon=eps)
        assert torch.allclose(step.last_norms, torch.full((8,), eps), atol=1e-5), step.last_norms
        assert r.sums["adv_norm"] / r.sums["adv_rows"] == pytest.approx(eps, abs=1e-5)
        assert r.sums["adv_loss"] > r.loss_local  # the adversarial direction raises the loss
    _, _, plain = _run(setup, "plain")
    assert (g - plain).abs().max() > 1e-4  # the adversarial pass adds its gradient


def test_pgd_stays_in_the_ball(setup):
    for steps, size in ((1, 0.2), (4, 2.0)):
        step, r, _ = _run(setup, "pgd", epsilon=1.0, steps=steps, step_size=size)
        n = step.last_norms
        assert (n <= 1.0 + 1e-5).all(), n
        if size * steps >= 2.0:
            assert (n > 0.999).all()  # large steps reach the boundary and are projected onto it
        if steps == 1:
            assert torch.allclose(n, torch.full_like(n, size), atol=1e-5)  # one step of size α, inside the ball
    x = torch.randn(4, 5, 3) * 10
    assert torch.allclose(row_norms(project(x, 0.7)), torch.full((4,), 0.7), atol=1e-5)


def test_freelb_k1_zero_init_equals_a_clean_step(setup):
    step, r, g = _run(setup, "freelb", steps=1, init=0.0)
    _, rp, plain = _run(setup, "plain")
    assert torch.equal(g, plain) and r.loss_local == rp.loss_local
    assert float(step.last_norms.max()) == 0.0
    _, _, g3 = _run(setup, "freelb", steps=3, init=0.0)
    assert (g3 - plain).abs().max() > 1e-5  # more ascent steps do change the gradient
    step_i, _, _ = _run(setup, "freelb", steps=2, init=0.1, epsilon=1.0)
    assert (step_i.last_norms <= 1.0 + 1e-5).all() and (step_i.last_norms > 0).all()


def test_smart_regulariser_runs_in_the_ball(setup):
    step, r, g = _run(setup, "smart", epsilon=0.5, steps=1, step_size=0.3)
    assert (step.last_norms <= 0.5 + 1e-5).all() and r.sums["adv_loss"] > 0  # the symmetric KL
    _, _, plain = _run(setup, "plain")
    assert (g - plain).abs().max() > 0  # the regulariser contributes a gradient
    assert isinstance(step, STEP_STRATEGIES["smart"])


@pytest.mark.parametrize("method", ["fgm", "freelb"])
def test_global_count_scaling_over_micro_batches(setup, method):
    """One micro-batch of 8 and two of 4 give the same gradient: each pass's summed loss is divided by the
    step's global example count, not by its micro-batch's."""
    cfg, acc, task, batch = setup
    halves = [task.collate["train"](list(range(0, 4))), task.collate["train"](list(range(4, 8)))]
    _, _, one = _run(setup, method)
    _, _, two = _run(setup, method, micro=halves)
    assert (one - two).abs().max() < 1e-5 * max(1.0, one.abs().max().item())


@pytest.mark.slow
def test_strategies_on_two_ranks_equal_one_process(data_dir, tokenizer_dir, tmp_path):
    """One 2-rank launch covers every strategy: DDP gradient (2 ranks × 1 micro-batch, different counts)
    = the 1-process gradient (1 rank × 2 micro-batches); ranks hold the same gradient."""
    import subprocess

    out = tmp_path / "adv.json"
    from conftest import ACCELERATE, _free_port

    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "tests/scripts/adv_equiv.py",
           str(out), str(data_dir), tokenizer_dir]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert set(res) == set(STEP_STRATEGIES)
    for name, r in res.items():
        assert r["rank_diff"] == 0.0, (name, r)  # synced once, identical on both ranks
        if name != "smart":  # SMART's random start differs per rank by design
            assert r["max_abs_diff"] <= 1e-5 * r["max_abs_grad"] + 1e-7, (name, r)
    assert res["fgm"]["norms"] and all(abs(n - 1.0) < 1e-5 for n in res["fgm"]["norms"])


@pytest.mark.slow
def test_two_rank_run_augment_adversarial_robustness(data_dir, tokenizer_dir, tmp_path):
    """train.py on 2 ranks: EDA for two classes (ids ID#augN in the ledger), FGM at ε = 0.5 (logged
    adv_norm), and robustness at the end (word-level and embedding-attack accuracy in run.json)."""
    d, out = data_dir, tmp_path / "run"
    launch(TINY, f"--output_dir={out}", f"--data.train={d}/train.jsonl", f"--data.validation={d}/validation.jsonl",
           f"--data.test={d}/test.jsonl", "--data.id_column=id", f"--tokenizer.path={tokenizer_dir}", "--batch_size=8",
           "--max_steps=6",
           "--eval_every=0", "--log_every=3", "--tracking.progress=false", "--classify.augment.method=eda",
           "--classify.augment.classes=[sports, tech]", "--classify.adversarial.method=fgm",
           "--classify.adversarial.epsilon=0.5", "--classify.robustness.enabled=true",
           "--classify.robustness.word_rates=[0.3]", "--classify.robustness.epsilons=[0.5, 50.0]",
           "--classify.robustness.attack_steps=2", "--dynamics.enabled=true", "--dynamics.analyze=false")
    run = read_run(out)
    assert run["world_size"] == 2 and run["final_step"] == 6
    assert len(set(run["param_checksums"])) == 1  # replicas in sync
    rows = [r for r in read_metrics(out) if "adv_norm" in r]
    assert len(rows) == 2 and all(abs(r["adv_norm"] - 0.5) < 1e-4 for r in rows)
    rob = run["robustness"]
    assert rob["clean_accuracy"] == run["test"]["accuracy"]
    assert set(rob["word_level"]) == {"0.3"} and set(rob["embedding"]) == {"0.5", "50"}
    assert rob["embedding"]["50"] <= rob["clean_accuracy"] and 0 <= rob["word_level"]["0.3"] <= 1
    assert json.loads((out / "robustness.json").read_text()) == rob
    from llm_dist.analysis.dynamics.ledger import read_ledger

    led = read_ledger(out)
    led = led if isinstance(led, pd.DataFrame) else led.to_pandas()
    aug = led[led["id"].str.contains("#aug")]
    assert len(aug) > 0 and aug["id"].str.endswith("#aug1").all()
    labels = {json.loads(l)["id"]: json.loads(l)["label"] for l in (d / "train.jsonl").read_text().splitlines()}
    assert {labels[i.split("#aug")[0]] for i in aug["id"]} <= {"sports", "tech"}


@pytest.mark.parametrize("override,message", [
    ("--classify.adversarial.method=vat", "'classify.adversarial.method': 'vat' is not one of fgm, pgd, freelb, smart"),
    ("--classify.adversarial.epsilon=0", "'classify.adversarial.epsilon': must be > 0"),
    ("--classify.adversarial.init=5", "'classify.adversarial.init': must be <= classify.adversarial.epsilon"),
    ("--classify.augment.ops=[swap, shout]", "'classify.augment.ops': must be a non-empty list"),
    ("--classify.augment.method=mlm", "'classify.augment.mlm_path': missing"),
    ("--classify.robustness.word_rates=[1.5]", "'classify.robustness.word_rates': each must be in (0, 1]"),
])
def test_bad_switches_name_the_key(override, message):
    from llm_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, [override])


def test_deepspeed_is_refused_with_a_reason():
    from llm_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="runs under DDP only"):
        load_config(TINY, ["--classify.adversarial.method=fgm", "--deepspeed.config=configs/deepspeed/zero2.json"])
