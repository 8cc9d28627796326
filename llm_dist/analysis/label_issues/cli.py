"""`llm-dist label-issues CONFIG.yaml --folds K [--key=value ...] --output_dir DIR [options]`

K stratified folds of the config's training split (by id, seeded with data.split_seed or seed); each fold
is an ordinary training run of the config in DIR/fold_k, trained on the other folds and predicting its
held-out fold; then out-of-fold probabilities → cleanlab + out-of-fold loss → DIR/example_scores.parquet,
label_issues.csv, report.md/.html, scores.json (scored against the planted noise when
data.label_noise.rate > 0). Finished folds (fold_k/run.json, not signalled) are skipped on a re-run.

options:
  --folds K                 number of folds (default 5)
  --output_dir DIR          where the folds and the reports go (required)
  --backend local|slurm     local: folds one after another (default); slurm: an sbatch array of
                            slurm/sweep_array.sbatch, one fold per task — re-run the same command when it
                            has finished to score
  --nproc N                 local: processes per fold (accelerate launch; default 1)
  --sbatch_args "ARGS"      slurm: extra sbatch flags (e.g. "--partition=gpu --time=01:00:00")
  --run RUN_DIR             merge RUN_DIR/analysis/example_scores.parquet (a full-data run's detectors)
  --cleanlab_method M       cleanlab quality score: normalized_margin (default), self_confidence,
                            confidence_weighted_entropy
  --dry-run                 list the folds and what would run; run and write nothing
  --quiet                   no progress bar
any other --key=value is a config override (as for train)."""
from __future__ import annotations

import shlex
import time
from pathlib import Path

OWN = {"--folds": "folds", "--output_dir": "output_dir", "--output-dir": "output_dir", "--backend": "backend",
       "--nproc": "nproc", "--sbatch_args": "sbatch_args", "--sbatch-args": "sbatch_args", "--run": "run",
       "--cleanlab_method": "cleanlab_method", "--cleanlab-method": "cleanlab_method"}
FLAGS = {"--dry-run": "dry_run", "--dry_run": "dry_run", "--quiet": "quiet"}
METHODS = ("normalized_margin", "self_confidence", "confidence_weighted_entropy")


def parse(argv: list[str]):
    from .folds import LabelIssuesError

    opts = {"folds": "5", "output_dir": None, "backend": "local", "nproc": "1", "sbatch_args": "", "run": None,
            "cleanlab_method": "normalized_margin", "dry_run": False, "quiet": False}
    config, overrides, i = None, [], 0
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
                raise LabelIssuesError(f"{key}: missing value")
        elif a in FLAGS:
            opts[FLAGS[a]] = True
        elif not a.startswith("--") and config is None and not overrides:
            config = a
        else:
            overrides.append(a)
        i += 1
    if config is None:
        raise LabelIssuesError("no config (llm-dist label-issues CONFIG.yaml --folds K --output_dir DIR)")
    if not opts["output_dir"]:
        raise LabelIssuesError("--output_dir: missing (where the folds and the reports go)")
    for k in ("folds", "nproc"):
        try:
            opts[k] = int(opts[k])
        except ValueError:
            raise LabelIssuesError(f"--{k}: expected an integer, got {opts[k]!r}") from None
    if opts["nproc"] < 1:
        raise LabelIssuesError(f"--nproc: must be >= 1, got {opts['nproc']}")
    if opts["backend"] not in ("local", "slurm"):
        raise LabelIssuesError(f"--backend: {opts['backend']!r} is not one of local, slurm")
    if opts["cleanlab_method"] not in METHODS:
        raise LabelIssuesError(f"--cleanlab_method: {opts['cleanlab_method']!r} is not one of {', '.join(METHODS)}")
    if opts["run"] and not Path(opts["run"]).is_dir():
        raise LabelIssuesError(f"--run {opts['run']}: not a directory")
    return config, overrides, opts


def main(argv: list[str] | None = None) -> int:
    from ..launch import driver_main
    from .folds import LabelIssuesError

    return driver_main(argv, __doc__, _main, LabelIssuesError)


def _main(argv: list[str]) -> int:
    from .folds import fold_command, make_plan, run_local, slurm_command, submit_slurm, write_plan

    config, overrides, o = parse(argv)
    out = Path(o["output_dir"]).resolve()
    nproc = o["nproc"] if o["backend"] == "local" else 1
    plan = make_plan(config, overrides, o["folds"], out, nproc=nproc)
    todo = [f for f in plan.folds if not f.done()]
    sbatch_args = shlex.split(o["sbatch_args"])
    if o["dry_run"]:
        print(f"label-issues: {len(plan.rows)} training examples, {len(plan.names)} classes, {len(plan.folds)} folds"
              f" → {out}" + (f"; planted noise: {len(plan.flipped)} flipped" if plan.flipped is not None else ""))
        for f in plan.folds:
            state = "done (skipped)" if f.done() else "would run"
            print(f"fold {f.k}: train {f.n_train}, held out {len(f.heldout)} → {f.out}: {state}")
        if todo and o["backend"] == "local":
            for f in todo:
                print("  $ " + " ".join(shlex.quote(c) for c in fold_command(plan, f, nproc)))
        elif todo:
            cmd, env = slurm_command(plan, todo, sbatch_args)
            print("  $ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "
                  + " ".join(shlex.quote(c) for c in cmd))
        if not todo:
            print("all folds done: would score them")
        return 0
    write_plan(plan)
    timing_file = out / "fold_seconds.json"
    import json

    times = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if todo and o["backend"] == "slurm":
        job = submit_slurm(plan, todo, sbatch_args)
        print(f"label-issues: submitted SLURM array job {job} (folds {','.join(str(f.k) for f in todo)}; logs "
              f"{out}/logs/slurm-{job}_<fold>.out); when it has finished, run the same command again to score")
        return 0
    skipped = len(plan.folds) - len(todo)
    if skipped:
        print(f"label-issues: {skipped} of {len(plan.folds)} folds already finished (skipped)", flush=True)
    if todo:
        from ...config import write_text_atomic

        def record(k: int, seconds: float) -> None:
            times[str(k)] = round(seconds, 1)
            write_text_atomic(timing_file, json.dumps(times, indent=1))

        run_local(plan, todo, nproc, progress=not o["quiet"], on_done=record)
    t0 = time.time()
    from .scores import example_scores, merge_run, oof_probabilities, write_outputs

    probs, fold = oof_probabilities(plan)
    df = example_scores(plan, probs, fold, o["cleanlab_method"])
    info = {"config": config, "overrides": overrides, "folds": len(plan.folds),
            "seed": plan.cfg.seed if plan.cfg.data.split_seed is None else plan.cfg.data.split_seed,
            "nproc": nproc, "backend": o["backend"], "cleanlab_method": o["cleanlab_method"],
            "fold_seconds": {k: times[k] for k in sorted(times, key=int)}}
    if o["run"]:
        df, matched = merge_run(df, Path(o["run"]))
        info.update({"run": str(o["run"]), "run_ids_matched": matched})
    res = write_outputs(plan, df, out, info)
    line = (f"label-issues: {res['examples']} examples, out-of-fold accuracy {res['oof_accuracy_given']:.3f}, "
            f"cleanlab flags {res['cleanlab_flagged']}")
    if "detectors" in res:
        line += "; AUROC " + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in res["detectors"].items())
    print(line + f" ({time.time() - t0:.1f} s to score); wrote {out}/example_scores.parquet, label_issues.csv, "
          "report.md, report.html, scores.json", flush=True)
    return 0
