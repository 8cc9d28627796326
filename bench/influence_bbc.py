"""Influence on BBC News with MiniLM (+ LoRA): plant exact and lightly edited copies of test articles in train,
train with 20% planted label noise and checkpoints, run `llm-dist influence`, and print the time and memory,
the top-1 proponent hit rate on the planted copies, the self-influence AUROC, and one worked example (a
misclassified test article with its strongest opponents).

    .venv/bin/python bench/influence_bbc.py --out runs/infl-bbc [--epochs 1] [--proj-dim 2048] [--full]
    .venv/bin/python bench/influence_bbc.py --preset tiny --epochs 3 --out runs/infl-bbc-tiny

`--full`: full fine-tuning (influence over the head + last encoder layer) instead of LoRA. `--preset tiny`:
the tiny BERT of configs/classify/tiny.yaml (random init, its own WordPiece) instead of MiniLM.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _edit(text: str, rng: random.Random) -> str:
    """A light edit: 3 words replaced by 'also' and the last sentence dropped (when there are several)."""
    words = text.split(" ")
    for k in rng.sample(range(len(words)), min(3, len(words))):
        words[k] = "also"
    out = " ".join(words)
    cut = out.rstrip().rfind(". ")
    return out[:cut + 1] if cut > len(out) // 2 else out


def write_data(out: Path, n_exact: int, n_edit: int, seed: int) -> dict:
    """train / validation / test JSONL files of the run's BBC split, with planted copies of test articles."""
    sys.path.insert(0, str(ROOT))
    from llm_dist.config import load_config
    from llm_dist.data.classify import load_splits

    cfg = load_config(str(ROOT / "configs/classify/minilm_bbc.yaml"), [])
    splits = load_splits(cfg)
    rng = random.Random(seed)
    test = list(zip(splits["test"]["id"], splits["test"]["text"], splits["test"]["label"]))
    chosen = rng.sample(test, n_exact + n_edit)
    planted = {}
    train = [dict(id=i, text=t, label=lab) for i, t, lab in
             zip(splits["train"]["id"], splits["train"]["text"], splits["train"]["label"])]
    for k, (i, t, lab) in enumerate(chosen):
        kind = "exact" if k < n_exact else "edited"
        cid = f"{kind}-copy-of/{i}"
        train.append(dict(id=cid, text=t if kind == "exact" else _edit(t, rng), label=lab))
        planted[i] = {"copy": cid, "kind": kind}
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", None), ("test", None)):
        if rows is None:
            ds = splits[name]
            rows = [dict(id=i, text=t, label=lab) for i, t, lab in zip(ds["id"], ds["text"], ds["label"])]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "planted.json").write_text(json.dumps(planted, indent=1))
    return planted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/infl-bbc")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--exact", type=int, default=20)
    ap.add_argument("--edited", type=int, default=20)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=1, help="without LoRA: the head + this many last encoder layers")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--preset", choices=("minilm", "tiny"), default="minilm")
    ap.add_argument("--skip-train", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    data, run = out / "data", out / "run"
    py = sys.executable
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    if not a.skip_train:
        planted = write_data(data, a.exact, a.edited, 0)
        n_train = sum(1 for _ in open(data / "train.jsonl"))
        steps = int(round(a.epochs * n_train / 16))
        every = max(1, -(-steps // a.checkpoints))  # ceil: the last save is the end of training
        config = "configs/classify/tiny.yaml" if a.preset == "tiny" else "configs/classify/minilm_bbc.yaml"
        cmd = [py, "train.py", config, f"--output_dir={run}", "--overwrite=true",
               f"--data.train={data / 'train.jsonl'}", f"--data.validation={data / 'validation.jsonl'}",
               f"--data.test={data / 'test.jsonl'}", "--data.id_column=id", "--data.sources=[]",
               f"--classify.epochs={a.epochs}", f"--data.label_noise.rate={a.noise}", f"--save_every={every}",
               f"--keep_checkpoints={a.checkpoints}", "--eval_every=0", "--tracking.progress=false",
               "--classify.report_every_epoch=false"]
        if a.preset == "tiny":
            cmd += ["--model.hidden_dropout=0", "--model.attention_dropout=0"]
        elif not a.full:
            cmd += ["--classify.peft.method=lora", "--optim.lr=5e-4"]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"training: {time.time() - t0:.0f} s", flush=True)
    planted = json.loads((data / "planted.json").read_text())
    cmd = [py, "-m", "llm_dist.cli", "influence", str(run), "--k", "10", "--proj-dim", str(a.proj_dim), "--layers", str(a.layers), "--quiet",
           "--no-wandb"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    wall = time.time() - t0
    s = json.loads((run / "influence" / "summary.json").read_text())
    rows = {r["id"]: r for r in map(json.loads, (run / "influence" / "test_topk.jsonl").read_text().splitlines())}
    flipped = {r["id"] for r in json.loads((run / "noise.json").read_text())["flipped"]} if (run / "noise.json").exists() else set()
    hits = {"exact": [0, 0], "edited": [0, 0]}
    for tid, p in planted.items():
        if p["copy"] in flipped:
            continue  # a copy whose label was flipped is (rightly) an opponent
        hits[p["kind"]][1] += 1
        hits[p["kind"]][0] += rows[tid]["proponents"][0]["id"] == p["copy"]
    t = s["timing"]
    print(f"\n{s['train_examples']} training × {s['test_examples']} test examples, {len(s['checkpoints'])} checkpoints, "
          f"{s['parameter_count']:,} parameters projected to d = {s['proj_dim']}")
    print(f"influence wall time {wall:.0f} s (training gradients {t['train_grad_s']:.0f} s = "
          f"{t['train_grad_examples_per_s']:.1f} examples·checkpoints/s; test gradients {t['test_grad_s']:.0f} s; "
          f"scoring {t['score_s']:.2f} s = {t['score_pairs_per_s']:.3g} pairs·checkpoints/s); peak RSS "
          f"{s['peak_rss_gb']:.2f} GB; gradient cache {s['cache_bytes'] / 2**20:.1f} MiB")
    for kind, (h, n) in hits.items():
        print(f"top-1 proponent = planted {kind} copy: {h}/{n}" + (f" ({h / n:.2f})" if n else ""))
    for name, m in sorted((s.get("detectors") or {}).items()):
        print(f"self-influence vs {s['noise']['flipped']} flipped labels: AUROC {m['auroc']:.3f}, AUPRC {m['auprc']:.3f}, "
              f"precision@k {m['precision_at_k']:.3f}")
    bad = [r for r in rows.values() if not r["correct"]]
    print(f"test accuracy at the last checkpoint {s['test_accuracy_last_checkpoint']:.3f} ({len(bad)} misclassified)")
    if bad:
        r = bad[0]
        print(f"\nworked example: {r['id']} (gold {r['label']}, predicted {r['predicted']}): {r['text'][:120]}…")
        for o in r["opponents"][:3]:
            print(f"  opponent {o['score']:+.4f} {o['id']} [{o['label']}{' FLIPPED' if o['id'] in flipped else ''}] "
                  f"{o['text'][:90]}…")
        for o in r["proponents"][:2]:
            print(f"  proponent {o['score']:+.4f} {o['id']} [{o['label']}{' FLIPPED' if o['id'] in flipped else ''}] "
                  f"{o['text'][:90]}…")
    return 0


if __name__ == "__main__":
    sys.exit(main())
