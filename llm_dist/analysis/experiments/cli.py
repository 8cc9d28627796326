"""`llm-dist experiment SPEC.yaml [options] [--key=value ...]`

Runs every variant × seed of the spec (see llm_dist/analysis/experiments/plan.py for its keys) as an
ordinary training run in DIR/runs/<variant>/seed<N>, skipping finished runs and resuming interrupted ones,
then writes DIR/experiment_report.{json,md,html} and plots (and a W&B report run when the base config
says tracking.report_to: wandb).

options:
  --output_dir DIR        default: the spec's output_dir, else runs/experiments/<name>
  --backend local|slurm   local: one run after another (default); slurm: one sbatch array of
                          slurm/sweep_array.sbatch, a task per unfinished run — re-run the same command
                          when it has finished to report (a removal experiment submits its scoring run
                          first, then the removal runs)
  --seeds N [N ...]       instead of the spec's seeds
  --variants V [V ...]    only these variants (names as the dry run lists them; the baseline is always kept)
  --sbatch_args "ARGS"    slurm: extra sbatch flags (e.g. "--partition=gpu --time=02:00:00")
  --dry-run               list the runs (done / would run) and the commands; run and write nothing
  --report-only           write the report from the runs that have finished; run nothing
  --quiet                 no progress bar
any other --key=value is a config override for every run (after the spec's)."""
from __future__ import annotations

import shlex
import time
from pathlib import Path

OWN = {"--output_dir": "output_dir", "--output-dir": "output_dir", "--backend": "backend",
       "--sbatch_args": "sbatch_args", "--sbatch-args": "sbatch_args"}
FLAGS = {"--dry-run": "dry_run", "--dry_run": "dry_run", "--report-only": "report_only",
         "--report_only": "report_only", "--quiet": "quiet"}


def parse(argv: list[str]):
    from .plan import ExperimentError

    opts = {"output_dir": None, "backend": "local", "sbatch_args": "", "seeds": None, "variants": None,
            "dry_run": False,
            "report_only": False, "quiet": False}
    spec, overrides, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key in OWN:
            if "=" in a:
                opts[OWN[key]] = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                opts[OWN[key]] = argv[i + 1]
                i += 1
            else:
                raise ExperimentError(f"{key}: missing value")
        elif key == "--seeds":
            vals = [a.split("=", 1)[1]] if "=" in a else []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                vals.append(argv[i + 1])
                i += 1
            try:
                opts["seeds"] = [int(v) for x in vals for v in x.split(",") if v]
            except ValueError:
                raise ExperimentError(f"--seeds: expected integers, got {' '.join(vals)!r}") from None
            if not opts["seeds"]:
                raise ExperimentError("--seeds: missing value")
        elif key == "--variants":
            vals = [a.split("=", 1)[1]] if "=" in a else []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                vals.append(argv[i + 1])
                i += 1
            if not vals:
                raise ExperimentError("--variants: missing value")
            opts["variants"] = vals
        elif a in FLAGS:
            opts[FLAGS[a]] = True
        elif not a.startswith("--") and spec is None:
            spec = a
        else:
            overrides.append(a)
        i += 1
    if spec is None:
        raise ExperimentError("no experiment spec (llm-dist experiment SPEC.yaml)")
    if opts["backend"] not in ("local", "slurm"):
        raise ExperimentError(f"--backend: {opts['backend']!r} is not one of local, slurm")
    return spec, overrides, opts


def main(argv: list[str] | None = None) -> int:
    from ..launch import driver_main
    from .plan import ExperimentError

    return driver_main(argv, __doc__, _main, ExperimentError)


def _main(argv: list[str]) -> int:
    from . import report
    from .plan import make_plan, prepare_tokenizer, write_plan
    from .runner import all_runs, command, ready, run_local, slurm_batch, slurm_command, submit_slurm

    spec, overrides, o = parse(argv)
    plan = make_plan(spec, o["output_dir"], o["seeds"], overrides, o["variants"])
    runs = all_runs(plan)
    todo = [r for r in runs if not r.done()]
    sbatch_args = shlex.split(o["sbatch_args"])
    if o["dry_run"]:
        print(f"experiment {plan.name}: {len(plan.variants)} variants × {len(plan.seeds)} seeds = {len(plan.runs)} runs"
              + (" + 1 scoring run" if plan.scoring else "") + f" → {plan.out}")
        for r in runs:
            state = "done (skipped)" if r.done() else ("would run" if ready(plan, r) else "waits for the scoring run")
            ov = next((v.overrides for v in plan.variants if v.name == r.variant), {})
            print(f"  {r.key}: {state}  {' '.join(f'{k}={v}' for k, v in ov.items())}")
        if todo and o["backend"] == "local":
            print("  $ " + " ".join(shlex.quote(c) for c in command(plan, todo[0])) + "   (one per run)")
        elif todo and slurm_batch(plan):
            cmd, env = slurm_command(plan, slurm_batch(plan), sbatch_args)
            print("  $ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "
                  + " ".join(shlex.quote(c) for c in cmd))
        return 0
    write_plan(plan)
    if not o["report_only"]:
        prepare_tokenizer(plan)
        if todo and o["backend"] == "slurm":
            batch = slurm_batch(plan)
            job = submit_slurm(plan, batch, sbatch_args)
            waiting = len(todo) - len(batch)
            print(f"experiment {plan.name}: submitted SLURM array job {job} ({len(batch)} runs; logs "
                  f"{plan.out}/logs/slurm-{job}_<task>.out)" + (f"; {waiting} removal runs wait for the scoring run"
                                                                 if waiting else "")
                  + "; when it has finished, run the same command again", flush=True)
            return 0
        if len(runs) - len(todo):
            print(f"experiment {plan.name}: {len(runs) - len(todo)} of {len(runs)} runs already finished (skipped)",
                  flush=True)
        t0 = time.time()
        run_local(plan, progress=not o["quiet"])
        if todo:
            print(f"experiment {plan.name}: {len(todo)} runs in {time.time() - t0:.0f} s", flush=True)
    rep = report.build(plan)
    paths = report.write(plan, rep)
    if plan.runs and plan.runs[0].cfg["tracking"]["report_to"] == "wandb":
        report.log_wandb(plan, rep, paths)
    _print_summary(rep, paths)
    return 0


def _print_summary(rep: dict, paths: dict) -> None:
    m = rep["metrics"][0] if rep["metrics"] else None
    print(f"experiment {rep['name']}: " + (f"{len(rep['missing_runs'])} runs not finished; " if rep["missing_runs"] else ""))
    if m:
        for v in rep["variants"]:
            s = v["metrics"].get(m, {})
            d = v["delta_vs_base"].get(m)
            ci = s.get("ci95")
            print(f"  {v['name']:<28} {m} {s.get('mean') if s.get('mean') is None else round(s['mean'], 4)}"
                  + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
                  + (f"  Δ {d['mean']:+.4f} (p={d['p_value']:.3g})" if d and d.get("p_value") is not None else ""))
    sc = rep.get("scaling")
    if sc and "error" not in sc:
        print(f"  scaling: err = {sc['a']:.4g}·n^-{sc['b']:.3f} + {sc['c']:.4f}, R² {sc['r2']:.3f}, extrapolation "
              f"error {sc['extrapolation_error'] if sc['extrapolation_error'] is None else round(sc['extrapolation_error'], 4)}")
    print(f"wrote {paths['json']}, {Path(paths['md']).name}, {Path(paths['html']).name}"
          + "".join(f", {Path(p).name}" for k, p in paths.items() if k not in ("json", "md", "html")), flush=True)
