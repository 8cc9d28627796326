"""Throughput, MFU and memory meters, and the metrics.jsonl writer."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

from ..training.callbacks import Callback

# Dense bf16 peak TFLOPs per device, for the MFU estimate when tracking.peak_tflops is 0.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10": 125.0, "L40": 181.0, "L4": 121.0,
               "V100": 125.0, "T4": 65.0, "4090": 165.0, "3090": 71.0}
CPU_PEAK_TFLOPS = 0.5  # a rough per-process CPU figure; set tracking.peak_tflops for your machine


def peak_tflops(configured: float) -> float:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
        return 100.0
    return CPU_PEAK_TFLOPS


def memory_stats() -> dict:
    out = {"rss_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


_PEAK_RSS_GB = 0.0


def peak_rss_gb() -> float:
    """This process's peak resident set since it started: the kernel's high-water mark (KiB on Linux) and the
    current RSS (the kernel's per-CPU RSS counters make the two lag each other slightly), as a running max."""
    global _PEAK_RSS_GB
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    now = psutil.Process(os.getpid()).memory_info().rss / 2**30
    _PEAK_RSS_GB = max(_PEAK_RSS_GB, kib / (2**30 if sys.platform == "darwin" else 2**20), now)
    return _PEAK_RSS_GB


def peak_memory_per_rank(acc) -> dict:
    """Peak host RSS (and CUDA allocated) of every rank, gathered: a collective, every rank calls it."""
    local = [peak_rss_gb()]
    if torch.cuda.is_available():
        local.append(torch.cuda.max_memory_allocated() / 2**30)
    vec = torch.tensor(local, dtype=torch.float64, device=acc.device)
    rows = (acc.gather(vec[None]) if acc.num_processes > 1 else vec[None]).cpu().tolist()
    out = {"peak_rss_gb": max(r[0] for r in rows), "peak_rss_gb_per_rank": [r[0] for r in rows]}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_gb"] = max(r[1] for r in rows)
    return out


class Throughput:
    """Tokens/s, samples/s and MFU over the training steps since the last `read()`. The window counts only
    the steps' own time (`add(..., seconds=)`: data, forward/backward, optimizer), never the evaluation,
    checkpoint, logging or report work between them; MFU divides the steps' FLOPs (from the tasks' real
    lengths: `Task.step_flops`) by that time. Without `seconds`, the wall time since the last read."""

    def __init__(self, flops_per_token: float, peak: float, world_size: int):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world_size
        self.reset()

    def reset(self):
        self.t0, self.tokens, self.samples, self.seconds, self.flops = time.perf_counter(), 0, 0, 0.0, 0.0

    def add(self, tokens: int, samples: int, seconds: float = 0.0, flops: float = 0.0):
        self.tokens += tokens
        self.samples += samples
        self.seconds += seconds
        self.flops += flops

    def read(self) -> dict:
        dt = max(self.seconds if self.seconds > 0 else time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        flops = self.flops if self.flops > 0 else self.flops_per_token * self.tokens
        out = {"tokens_per_s": tps, "samples_per_s": self.samples / dt, "train_step_seconds": dt,
               "mfu": flops / dt / (self.peak * 1e12 * self.world)}
        self.reset()
        return out


class MetricsWriter:
    """One JSON object per line in `output_dir/metrics.jsonl` (main process only). On resume, rows
    past the resumed step are dropped so the file reads as one run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")


class ThroughputMeter(Callback):
    """The throughput callback: counts each step's tokens and samples (all ranks) and adds `tokens_per_s`,
    `samples_per_s` and `mfu` to each training metrics row. Benches pass their own callback named
    "throughput" to `run(cfg, callbacks=[...])` to measure differently (e.g. CPU time)."""

    name = "throughput"

    def __init__(self, flops_per_token: float, peak: float, world_size: int):
        self.meter = Throughput(flops_per_token, peak, world_size)

    def on_step_end(self, ctx, out) -> None:
        self.meter.add(int(out.tokens), int(out.samples), out.seconds, out.flops)

    def on_log(self, ctx, row: dict) -> None:
        if "loss" in row:
            row.update(self.meter.read())
