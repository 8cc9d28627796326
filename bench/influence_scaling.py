"""Influence cost against the number of training examples: per-example gradient throughput (torch.func,
projected to d) and scoring throughput, on the first N training examples of a run's last checkpoint, for
N = n/8, n/4, n/2, n — the cost grows linearly in N (examples/s stays flat).

    .venv/bin/python bench/influence_scaling.py RUN_DIR [--proj-dim 2048] [--layers 1] [--batch-size 16] [--max-n N]

RUN_DIR: any classification run with checkpoints (e.g. `python train.py configs/classify/tiny.yaml
--output_dir=runs/infl-tiny --save_every=40 --keep_checkpoints=3 --classify.epochs=1`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-n", type=int, default=0, help="the largest N (default: every training example)")
    a = ap.parse_args()
    import torch

    from llm_dist.analysis.influence.grads import Projector, select_params
    from llm_dist.analysis.influence.tracin import Grads, _fill, open_run, top_k

    run = open_run(a.run_dir)
    names = select_params(run.model, run.peft, a.layers)
    dim = sum(p.numel() for n, p in run.model.named_parameters() if n in set(names))
    proj = Projector(dim, a.proj_dim)
    proj(torch.zeros(1, dim))  # generate (and cache) the projection once, outside the timings
    ckpt = run.checkpoints[-1]
    n = len(run.data["train"]["ids"])
    n = min(n, a.max_n) if a.max_n > 0 else n
    test = run.data["test" if "test" in run.data else "validation"]
    m = len(test["ids"])
    print(f"{run.run_dir}: {n} training examples, {m} test, D = {dim:,} parameters, d = {proj.out_dim}, "
          f"{torch.get_num_threads()} threads")

    def grads(split, count):
        arrs = {"units": np.zeros((count, proj.out_dim), np.float16), "norms": np.zeros(count, np.float32),
                "self": np.zeros(count, np.float32), "logits": np.zeros((count, len(run.names)), np.float32)}
        t0 = time.time()
        _fill(run, ckpt, split, names, proj, False, arrs, 0, count, a.batch_size, False, "cpu", "bench")
        return Grads(arrs["units"], arrs["norms"], arrs["self"], arrs["logits"]), time.time() - t0

    tg, _ = grads(test, m)
    print("| N train | gradient s | gradient examples/s | scoring s | scoring pairs/s |\n| --- | --- | --- | --- | --- |")
    for frac in (8, 4, 2, 1):
        count = max(1, n // frac)
        g, secs = grads(run.data["train"], count)
        t0 = time.time()
        for _ in range(5):
            top_k([tg], [g], [1.0], True, 10)
        score = (time.time() - t0) / 5
        print(f"| {count} | {secs:.1f} | {count / secs:.1f} | {score:.4f} | {count * m / score:.3g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
