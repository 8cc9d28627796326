"""Cost per optimizer step of each adversarial training method relative to the plain step, measured in the
same process on the same model and data: rounds of `--steps` steps per method, the methods interleaved
round by round (so a load change on a shared machine hits all of them alike), the first round discarded
as warm-up; prints the median step time of each method and its ratio to the plain step's, with the
forward / parameter-backward passes per micro-batch that explain it. On a CPU the ratio is of the
process's CPU time (`time.process_time`: what the step costs, whatever else the shared cores run); wall
time is printed beside it. On a GPU both are wall time after a synchronize.

    python bench/adversarial_cost.py                          # tiny classify on BBC News, batch 16, 1 process
    python bench/adversarial_cost.py --config configs/classify/minilm_bbc.yaml --steps 3 --rounds 3
    python bench/adversarial_cost.py -- --classify.adversarial.steps=2     # config overrides after --
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("plain", "fgm", "pgd", "freelb", "smart")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="step cost of FGM / PGD / FreeLB / SMART relative to the plain step",
                                 epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/classify/tiny.yaml")
    ap.add_argument("--steps", type=int, default=5, help="steps per method per round (default 5)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds, the first is warm-up (default 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/adversarial_cost.json")
    ap.add_argument("overrides", nargs="*", help="extra --key=value config overrides (after --)")
    a = ap.parse_args(argv)
    os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    import torch

    torch.set_num_threads(a.threads)
    from common import cpu_name, quiet_libraries, write_report

    quiet_libraries()
    from accelerate import Accelerator

    from llm_dist.config import load_config
    from llm_dist.tasks.base import make_task
    from llm_dist.training.steps import STEP_STRATEGIES, PlainStep

    tmp = tempfile.mkdtemp(prefix="advcost-")
    cfg = load_config(a.config, [f"--output_dir={tmp}", "--tracking.progress=false", *a.overrides])
    acc = Accelerator(cpu=not torch.cuda.is_available())
    task = make_task(cfg, acc)
    model = task.model.to(acc.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, opt = acc.prepare(model, opt)
    model.train()
    adv = cfg.classify.adversarial
    steps = {m: PlainStep() if m == "plain" else STEP_STRATEGIES[m](adv) for m in METHODS}
    times = {m: [] for m in METHODS}
    walls = {m: [] for m in METHODS}
    gpu = acc.device.type == "cuda"
    clock = time.perf_counter if gpu else time.process_time

    def batch():
        b = task.next_batch()
        return {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in b.items()}

    for rnd in range(a.rounds):
        for m in METHODS:
            for _ in range(a.steps):
                micro = [batch() for _ in range(cfg.grad_accum)]
                if gpu:
                    torch.cuda.synchronize()
                t, w = clock(), time.perf_counter()
                steps[m](model, task, micro, acc, acc.num_processes)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if gpu:
                    torch.cuda.synchronize()
                if rnd > 0:
                    times[m].append(clock() - t)
                    walls[m].append(time.perf_counter() - w)
    base = statistics.median(times["plain"])
    rows = {}
    kind = "wall s" if gpu else "cpu s"
    print(f"{'method':8} {'fwd':>4} {'bwd':>4} {kind + '/step':>11} {'x plain':>8} {'wall s/step':>12}   "
          f"({torch.cuda.get_device_name() if gpu else cpu_name()}, batch {cfg.batch_size} x accum {cfg.grad_accum}, "
          f"K={adv.steps})")
    wbase = statistics.median(walls["plain"])
    for m in METHODS:
        med = statistics.median(times[m])
        s = steps[m]
        wmed = statistics.median(walls[m])
        rows[m] = {"seconds_per_step": med, "clock": "wall" if gpu else "process_cpu", "relative_to_plain": med / base,
                   "wall_seconds_per_step": wmed, "wall_relative_to_plain": wmed / wbase,
                   "forwards": getattr(s, "forwards", 1), "param_backwards": getattr(s, "backwards", 1),
                   "steps_timed": len(times[m])}
        print(f"{m:8} {rows[m]['forwards']:>4} {rows[m]['param_backwards']:>4} {med:11.4f} {med / base:8.2f} "
              f"{wmed:12.4f}")
    write_report({"config": a.config, "overrides": a.overrides, "device": str(acc.device), "cpu": cpu_name(),
                  "threads": a.threads, "adversarial": vars(adv), "methods": rows}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
