"""The Python half of `bench/gpu.sh` (issue 17): which runs to make, and the one table of their results.

    python bench/gpu_bench.py plan [--dry-run]          # one line per run: NAME<TAB>override override …
    python bench/gpu_bench.py table RUN_DIR [RUN_DIR …] # tokens/s, MFU, peak memory from each run dir

Everything here runs on a CPU (tests/test_shards.py checks it): `plan` reads the config schema (a
`compile` column only when the config has a `compile` key; a flash-attention row only when `flash_attn`
imports), `table` reads what every run writes (`metrics.jsonl`: tokens_per_s, mfu per log window;
`run.json`: peak memory — CUDA's max allocated on a GPU, the peak RSS on a CPU dry run).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ_LENS = (128, 512)
# (steps, batch) per sequence length: a few hundred steps, about a minute each on one H100 in bf16
GPU_SHAPE = {128: (300, 64), 512: (200, 32)}
DRY_SHAPE = {128: (3, 4), 512: (3, 2)}


def has_config_key(key: str) -> bool:
    """Whether RunConfig has a (dotted) key, e.g. `compile` (added by another change; skipped until then)."""
    from llm_dist.config import RunConfig

    obj = RunConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def plan(dry_run: bool = False) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(runs, notes): each run a name and its train.py overrides on top of configs/mlm/base.yaml."""
    notes = []
    common = ["--eval_every=0", "--save_every=0", "--tracking.report_to=none", "--tracking.progress=false",
              "--model.attn_implementation=sdpa"]
    if dry_run:
        common += ["--model.preset=tiny", "--mixed_precision=no", "--tokenizer.vocab_size=4096", "--data.num_workers=0"]
    else:
        common += ["--mixed_precision=bf16"]
    compile_ok = has_config_key("compile")
    if not compile_ok:
        notes.append("compile: skipped (this version's config has no `compile` key)")
    flash = not dry_run and importlib.util.find_spec("flash_attn") is not None
    if not flash and not dry_run:
        notes.append("flash attention: skipped (flash_attn is not installed)")
    runs = []
    for L in SEQ_LENS:
        steps, batch = (DRY_SHAPE if dry_run else GPU_SHAPE)[L]
        base = common + [f"--data.seq_len={L}", f"--max_steps={steps}", f"--batch_size={batch}",
                         f"--log_every={max(steps // 6, 1)}"]
        runs.append((f"seq{L}_sdpa", base))
        if compile_ok:  # a CPU dry run checks the plumbing: aot_eager (dynamo + AOT autograd, no C++ build)
            runs.append((f"seq{L}_sdpa_compile",
                         base + ["--compile=true", f"--compile_backend={'aot_eager' if dry_run else 'inductor'}"]))
        if flash:
            runs.append((f"seq{L}_flash_docmask", [o for o in base if not o.startswith("--model.attn_implementation")]
                         + ["--model.attn_implementation=flash_attention_2", "--data.document_mask=true"]))
    return runs, notes


def summarize(run_dir: str | Path) -> dict:
    """One row of the table from a run dir: median tokens/s and MFU over the log windows after the first
    (start-up, compilation and allocator warm-up fall in the first), the peak memory and the final loss."""
    d = Path(run_dir)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "tokens_per_s" in r]
    if not train:
        raise ValueError(f"{d / 'metrics.jsonl'}: no throughput rows (did the run log?)")
    steady = train[1:] or train
    run = json.loads((d / "run.json").read_text())
    mem = run.get("memory", {})
    cuda = mem.get("cuda_peak_allocated_gb")
    cfg = {}
    if (d / "config.yaml").exists():
        import yaml

        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
    return {"run": d.name, "seq_len": cfg.get("data", {}).get("seq_len"), "batch": cfg.get("batch_size"),
            "steps": run.get("final_step"), "precision": run.get("mixed_precision"),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r.get("mfu", float("nan")) for r in steady),
            "peak_mem_gb": cuda if cuda is not None else mem.get("peak_rss_gb"),
            "mem_kind": "cuda" if cuda is not None else "rss", "final_loss": train[-1].get("loss")}


def table(rows: list[dict]) -> str:
    head = f"{'run':24} {'seq':>4} {'batch':>5} {'steps':>5} {'prec':>5} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8} {'mem':>4} {'loss':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['run']:24} {r['seq_len'] or '?':>4} {r['batch'] or '?':>5} {r['steps'] or '?':>5} "
                     f"{r['precision'] or '?':>5} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>5.1f}% "
                     f"{r['peak_mem_gb'] or float('nan'):>8.2f} {r['mem_kind']:>4} {r['final_loss'] or float('nan'):>7.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plan")
    pp.add_argument("--dry-run", action="store_true")
    pt = sub.add_parser("table")
    pt.add_argument("runs", nargs="+")
    pt.add_argument("--out", default=None, help="also write the rows as JSON")
    a = p.parse_args(argv)
    if a.cmd == "plan":
        runs, notes = plan(a.dry_run)
        for n in notes:
            print(f"# {n}")
        for name, overrides in runs:
            print(name + "\t" + " ".join(overrides))
        return 0
    try:
        rows = [summarize(r) for r in a.runs]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
