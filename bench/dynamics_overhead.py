"""The training-dynamics ledger's step-time overhead: one training run in this process, the ledger switched
on and off in alternating windows of steps (same model, same data stream, same process), and the ratio of
the mean step time with it on to the mean with it off.

Also measured in the same run: the time spent inside the ledger's hooks as a share of the on-windows' step
time (exact on a CPU, where nothing is asynchronous; it is the figure to trust on a loaded machine).

A window is `--window` optimizer steps and ends at a log step, so it includes the ledger's device-side row
statistics at every step and its one host transfer + parquet write at the log step. The first two windows
are warm-up and not counted. Prints the ratio (mean over windows and median of the paired on/off ratios);
target < 1.05. Timings are noisy on a shared machine: compare the ratio, not the seconds.

    python bench/dynamics_overhead.py                                    # tiny classify config
    python bench/dynamics_overhead.py --config configs/classify/minilm_bbc.yaml --steps 40 --window 5
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="step-time overhead of the training-dynamics ledger (on/off ratio)",
                                 epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/classify/tiny.yaml")
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps in all (default 160)")
    ap.add_argument("--window", type=int, default=10, help="steps per on / off window (default 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/dynamics_overhead.json")
    ap.add_argument("overrides", nargs="*", help="extra --key=value config overrides (after --)")
    a = ap.parse_args(argv)

    os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from common import cpu_name, quiet_libraries, reset_accelerate_state, write_report

    torch.set_num_threads(a.threads)
    quiet_libraries()
    reset_accelerate_state()
    from llm_dist.analysis.dynamics.ledger import DynamicsLedger
    from llm_dist.config import load_config
    from llm_dist.training.callbacks import Callback
    from llm_dist.training.loop import run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = load_config(a.config, [f"--output_dir={out}", f"--max_steps={a.steps}", "--eval_every=0",
                                     "--save_every=0", f"--log_every={a.window}", "--tracking.progress=false",
                                     "--tracking.report_to=none", "--dynamics.enabled=false", *a.overrides])
        class TimedLedger(DynamicsLedger):
            """The ledger, with the time spent in its hooks counted (on a CPU that is all it costs: nothing
            runs asynchronously; on a GPU the device-side work is queued and shows only in the step times)."""
            spent = 0.0

            def on_step_end(self, ctx, out):
                t = time.perf_counter()
                super().on_step_end(ctx, out)
                self.spent += time.perf_counter() - t

            def on_log(self, ctx, row):
                t = time.perf_counter()
                super().on_log(ctx, row)
                self.spent += time.perf_counter() - t

        ledger = TimedLedger(out, "train")

        class Toggle(Callback):
            """Times each window (from one training log row to the next) and switches the ledger."""
            name = "dynamics_toggle"

            def __init__(self):
                self.t, self.windows, self.n = None, [], 0

            def on_train_start(self, ctx):
                ledger.active = False
                self.t = time.perf_counter()

            def on_log(self, ctx, row):
                if "loss" not in row or ctx.step > a.steps:
                    return
                now = time.perf_counter()
                self.windows.append((ledger.active, (now - self.t) / a.window, ledger.spent / a.window))
                ledger.spent = 0.0
                self.n += 1
                ledger.active = self.n % 2 == 1  # off, on, off, on, …
                self.t = time.perf_counter()

        toggle = Toggle()
        t0 = time.time()
        run(cfg, callbacks=[ledger, toggle])
        rows = ledger.rows_written
        wall = time.time() - t0
    w = toggle.windows[2:]
    on = [s for active, s, _ in w if active]
    off = [s for active, s, _ in w if not active]
    hook = sum(h for active, _, h in w if active) / sum(on)  # share of the on-windows' time spent in the ledger
    if not on or not off:
        print("error: too few windows; raise --steps or lower --window", file=sys.stderr)
        return 2
    paired = [w[i][1] / w[i - 1][1] for i in range(1, len(w)) if w[i][0] and not w[i - 1][0]]
    paired += [w[i][1] / w[i + 1][1] for i in range(len(w) - 1) if w[i][0] and not w[i + 1][0]]
    ratio = statistics.mean(on) / statistics.mean(off)
    report = {"config": a.config, "steps": a.steps, "window": a.window, "threads": a.threads, "cpu": cpu_name(),
              "windows_on": len(on), "windows_off": len(off), "step_s_on": statistics.mean(on),
              "step_s_off": statistics.mean(off), "ratio_mean": ratio, "ratio_paired_median": statistics.median(paired),
              "ledger_hook_share": hook, "ratio_from_hook_time": 1 / (1 - hook), "ledger_rows": rows, "wall_s": wall}
    print(f"dynamics ledger overhead ({a.config}, {a.steps} steps, windows of {a.window}, {len(on)} on / {len(off)} off):")
    print(f"  step time on {report['step_s_on'] * 1e3:.1f} ms, off {report['step_s_off'] * 1e3:.1f} ms")
    print(f"  overhead ratio on/off: {ratio:.3f} (paired median {report['ratio_paired_median']:.3f}); "
          f"target < 1.05; {rows} ledger rows; {wall:.0f} s")
    print(f"  time inside the ledger's hooks: {hook:.2%} of the on-windows' step time → ratio {1 / (1 - hook):.4f} "
          "(the precise figure on a CPU, where the alternating ratio carries the machine's noise)")
    write_report(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
