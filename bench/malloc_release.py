"""What `malloc_release` (on by default on CPU) costs in speed and saves in memory, one run.

`malloc_release: yes` fixes glibc's mmap and trim thresholds at 128 KiB (llm_dist/training/memory.py):
every tensor above that is mmap'ed and given back on free, so RSS follows live memory — ZeRO-3's saving
shows (bench/zero_memory.py) — at the price of fresh page faults for each large allocation. This bench
launches the real trainer with `--malloc_release=no` and `=yes`, alternating which goes first in each
round, and reports tokens/s (median over the steps after warm-up) and each rank's peak RSS (the
trainer's ru_maxrss from run.json), as ratios yes / no measured in the same run:

- `single`: 1 process, MLM, `--model.preset=small` (hidden 512, 4 layers), batch 16 x 128
- `zero3`:  2 CPU ranks, the same model, `--deepspeed.config=configs/deepspeed/zero3.json`

    .venv/bin/python bench/malloc_release.py [--setups single,zero3] [--rounds 2] [--steps 20] [--preset small]

Timings on a shared 2-core machine are noisy: read the per-round ratios. Writes --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = Path(sys.executable)
ACCELERATE = str(PY.with_name("accelerate"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(setup: str, mode: str, out: Path, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    over = [f"--model.preset={args.preset}", f"--max_steps={args.steps}", "--batch_size=16", "--data.seq_len=128",
            "--log_every=1", "--eval_every=0", "--save_every=0", "--data.max_eval_batches=1", "--resume=never",
            "--tracking.report_to=none", "--tracking.progress=false", f"--output_dir={out}", f"--malloc_release={mode}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    for key in ("ACCELERATE_USE_CPU", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)
    if setup == "single":
        cmd = [str(PY), "train.py", "configs/mlm/tiny.yaml", *over]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(_port()), "train.py", "configs/mlm/tiny.yaml",
               *over, "--deepspeed.config=configs/deepspeed/zero3.json"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{setup}/{mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > args.warmup]
    res = {"tokens_per_s": statistics.median(tps), "peak_rss_gb_per_rank": run["memory"]["peak_rss_gb_per_rank"],
           "malloc_release": run["malloc_release"], "wall_s": time.time() - t0}
    shutil.rmtree(out, ignore_errors=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="single,zero3")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--preset", default="small")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--workdir", default="runs/bench/malloc_release")
    p.add_argument("--out", default="runs/bench/malloc_release.json")
    args = p.parse_args(argv)
    work = ROOT / args.workdir
    report = {"settings": vars(args), "setups": {}}
    for setup in [s.strip() for s in args.setups.split(",") if s.strip()]:
        rounds = []
        for r in range(args.rounds):
            order = ("no", "yes") if r % 2 == 0 else ("yes", "no")
            got = {m: launch(setup, m, work / f"{setup}_{m}", args) for m in order}
            got["ratio_tokens_per_s"] = got["yes"]["tokens_per_s"] / got["no"]["tokens_per_s"]
            got["ratio_peak_rss"] = max(got["yes"]["peak_rss_gb_per_rank"]) / max(got["no"]["peak_rss_gb_per_rank"])
            rounds.append(got)
            print(f"{setup} round {r + 1}: tokens/s no {got['no']['tokens_per_s']:.0f}, yes {got['yes']['tokens_per_s']:.0f} "
                  f"(yes/no {got['ratio_tokens_per_s']:.2f}x); peak RSS per rank no {got['no']['peak_rss_gb_per_rank']}, "
                  f"yes {got['yes']['peak_rss_gb_per_rank']} GiB ({got['ratio_peak_rss']:.2f}x)", flush=True)
        report["setups"][setup] = {"rounds": rounds,
                                   "median_ratio_tokens_per_s": statistics.median(x["ratio_tokens_per_s"] for x in rounds),
                                   "median_ratio_peak_rss": statistics.median(x["ratio_peak_rss"] for x in rounds)}
    print()
    for setup, s in report["setups"].items():
        print(f"{setup:8s} malloc_release yes / no: tokens/s {s['median_ratio_tokens_per_s']:.2f}x, "
              f"peak RSS {s['median_ratio_peak_rss']:.2f}x (median of {len(s['rounds'])} rounds)")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
