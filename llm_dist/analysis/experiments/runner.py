"""Running an experiment's runs: locally one after another (each itself 1 or N processes), or as a SLURM
job array (one task per run, through `slurm/sweep_array.sbatch`, so preemption / requeue / resume are the
script's own). A finished run (run.json, not signalled) is skipped; an interrupted one resumes from its last
checkpoint (every run config says `resume: auto`)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ...config import write_text_atomic
from ..launch import REPO, RunFailed, run_logged, sbatch_safe, submit_array, train_command, train_env
from .plan import SCORING, ExperimentError, Plan, Run, write_removal_ids


def all_runs(plan: Plan) -> list[Run]:
    return ([plan.scoring] if plan.scoring else []) + plan.runs


def ready(plan: Plan, run: Run) -> bool:
    return run.needs is None or (plan.scoring is not None and plan.scoring.done())


def log_path(plan: Plan, run: Run) -> Path:
    return plan.out / "logs" / f"{Path(run.config).parent.name}-seed{run.seed}.log"


def _deepspeed(run: Run) -> bool:
    return bool(run.cfg.get("deepspeed", {}).get("config"))


def command(plan: Plan, run: Run) -> list[str]:
    return train_command(run.config, [], plan.nproc)


def run_local(plan: Plan, progress: bool = True) -> dict:
    """Every unfinished run, the scoring run first; {run key: seconds} of those run now (also recorded in
    DIR/run_seconds.json as each finishes). A failing run stops the experiment (RunFailed)."""
    from tqdm.auto import tqdm

    timing = plan.out / "run_seconds.json"
    times = json.loads(timing.read_text()) if timing.exists() else {}
    runs = all_runs(plan)
    todo = [r for r in runs if not r.done()]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"experiment {plan.name}", unit="run",
               disable=not progress, file=sys.stderr)
    ran = {}
    for r in todo:
        if r.needs == SCORING:
            write_removal_ids(plan)  # the scoring run has finished (it is first in the list)
        bar.set_postfix_str(r.key)
        log = log_path(plan, r)
        t0 = time.time()
        rc = run_logged(command(plan, r), train_env(plan.nproc, _deepspeed(r)), log)
        if rc != 0 or not r.done():
            bar.close()
            raise RunFailed(f"run {r.key} ({r.out})", rc, log)
        ran[r.key] = times[r.key] = round(time.time() - t0, 1)
        write_text_atomic(timing, json.dumps(times, indent=1))
        bar.update(1)
    bar.close()
    if plan.scoring is not None and plan.scoring.done():
        write_removal_ids(plan)
    return ran


def slurm_batch(plan: Plan) -> list[Run]:
    """The unfinished runs that can start now (removal runs wait for the scoring run)."""
    return [r for r in all_runs(plan) if not r.done() and ready(plan, r)]


def slurm_command(plan: Plan, batch: list[Run], sbatch_args: list[str]) -> tuple[list[str], dict]:
    """sbatch of `slurm/sweep_array.sbatch`, array task i = batch[i]: its own config file and output_dir
    (SWEEP_CONFIGS / SWEEP_OUTPUT_DIRS), so a requeued task resumes its own run."""
    for p in [str(plan.out)] + [str(r.config) for r in batch]:
        if not sbatch_safe(p):
            raise ExperimentError(f"--output_dir {plan.out}: the SLURM backend needs paths without spaces or shell "
                                  f"characters ({p})")
    env = {"SWEEP_CONFIGS": ";".join(str(r.config) for r in batch),
           "SWEEP_OUTPUT_DIRS": ";".join(str(r.out) for r in batch),
           "SWEEP_VARIANTS": ";".join(f"--output_dir={r.out}" for r in batch)}
    if plan.nproc > 1:
        env["NPROC_PER_NODE"] = str(plan.nproc)
    cmd = ["sbatch", "--parsable", f"--array=0-{len(batch) - 1}", f"--job-name=llm-dist-exp-{plan.name}"[:64],
           f"--output={plan.out}/logs/slurm-%A_%a.out", *sbatch_args, str(REPO / "slurm" / "sweep_array.sbatch")]
    return cmd, env


def submit_slurm(plan: Plan, batch: list[Run], sbatch_args: list[str]) -> str:
    if plan.scoring is not None and plan.scoring.done():
        write_removal_ids(plan)
    cmd, env = slurm_command(plan, batch, sbatch_args)
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    job = submit_array(cmd, env, plan.out / "slurm_submit.sh", ExperimentError)
    write_text_atomic(plan.out / "slurm_jobs.json", json.dumps(
        {"job": job, "tasks": {str(i): r.key for i, r in enumerate(batch)}}, indent=1))
    return job
