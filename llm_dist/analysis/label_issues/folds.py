"""The folds: plan (K stratified folds of the config's training split, by id), write each fold's data files
and the shared fold config, and run them — locally one after another (`python -m llm_dist.cli train`, or
`accelerate launch` with N processes) or as a SLURM array through `slurm/sweep_array.sbatch`.

Label noise: the folds train and are scored on the labels the full run would train on — the config's
`data.label_noise` flips by id, so the planner applies it once (through `load_splits`) and writes the
*noisy* labels into the fold files; the fold runs then plant no noise of their own (`rate: 0`)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...config import PATH_KEYS, SOURCE_PATH_KEYS, RunConfig, load_config, to_dict, write_text_atomic
from ..launch import REPO, RunFailed, run_logged, sbatch_safe, submit_array, train_command, train_env


class LabelIssuesError(ValueError):
    """Bad input to `llm-dist label-issues`: one line, exit 2."""


@dataclass
class Fold:
    k: int
    out: Path  # DIR/fold_k (the run's output_dir)
    files: dict  # split -> jsonl path (train, validation, test = the held-out fold)
    heldout: list = field(default_factory=list)
    n_train: int = 0

    def overrides(self) -> list[str]:
        return [f"--output_dir={self.out}", f"--data.train={self.files['train']}",
                f"--data.validation={self.files['validation']}", f"--data.test={self.files['test']}"]

    def done(self) -> bool:
        """Finished: run.json present, not signalled, and the held-out predictions written."""
        try:
            rj = json.loads((self.out / "run.json").read_text())
        except (OSError, ValueError):
            return False
        return not rj.get("signalled") and (self.out / "predictions.jsonl").is_file()


@dataclass
class Plan:
    cfg: RunConfig  # the config as given (with its overrides)
    out: Path
    folds: list
    train: object  # the training split (noisy labels when the config plants noise), sorted by id
    names: list
    flipped: list | None  # planted noise records ({id, original, noisy}) or None
    fold_config: Path
    fold_cfg_dict: dict
    validation_rows: list
    rows: list = field(default_factory=list)  # the training examples ({id, text, label[, text_pair]}), by id


def _abs_paths(cfg: RunConfig) -> None:
    """Relative path keys that exist from here become absolute (fold runs may start elsewhere: SLURM)."""
    def fix(obj, attr):
        v = getattr(obj, attr)
        if isinstance(v, str) and v and not os.path.isabs(v) and Path(v).exists():
            setattr(obj, attr, str(Path(v).resolve()))

    for key in PATH_KEYS:
        *parents, attr = key.split(".")
        obj = cfg
        for p in parents:
            obj = getattr(obj, p)
        fix(obj, attr)
    for src in cfg.data.sources:
        for attr in SOURCE_PATH_KEYS:
            fix(src, attr)


def _rows(ds, pair: bool) -> list[dict]:
    cols = ["id", "text", "label"] + (["text_pair"] if pair else [])
    data = {c: list(ds[c]) for c in cols}
    return [{c: data[c][i] for c in cols} for i in range(len(ds))]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def make_plan(config: str, overrides: list[str], k: int, out: Path, nproc: int = 1) -> Plan:
    """Load the config, cut K stratified folds of its training split (seeded, by id); nothing written."""
    from sklearn.model_selection import StratifiedKFold

    from ...data.classify import load_splits, planted_noise
    from ...data.interventions import reset as reset_interventions

    cfg = load_config(config, overrides)
    if cfg.task != "classify":
        raise LabelIssuesError(f"{config}: task '{cfg.task}': label issues need a classify config")
    if k < 2:
        raise LabelIssuesError(f"--folds: need at least 2 folds, got {k}")
    splits = load_splits(cfg, for_training=True)
    train = splits["train"]
    order = np.argsort(np.array(list(train["id"]), dtype=object), kind="stable")
    train = train.select(order.tolist())  # by id: the folds do not depend on the file's row order
    labels = np.array(list(train["label"]))
    names = sorted(set(labels.tolist()))
    counts = {n: int((labels == n).sum()) for n in names}
    small = {n: c for n, c in counts.items() if c < k}
    if small:
        n, c = next(iter(small.items()))
        raise LabelIssuesError(f"--folds {k}: class '{n}' has {c} training example(s); every class needs at least "
                               f"{k} (fewer folds, or more data)")
    seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    pair = "text_pair" in train.column_names
    rows = _rows(train, pair)
    # the config's validation split (clean labels) selects the best model; its test split when it has none
    val = splits.get("validation", splits.get("test"))
    val_rows = _rows(val, pair)
    min_train = cfg.batch_size * cfg.grad_accum * nproc
    folds = []
    for i, (tr, ho) in enumerate(skf.split(np.zeros(len(labels)), labels)):
        if len(tr) < min_train:
            raise LabelIssuesError(f"--folds {k}: fold {i} trains on {len(tr)} examples, fewer than one global batch "
                                   f"({min_train} = batch_size × grad_accum × --nproc)")
        d = out / "folds" / f"fold_{i}"
        folds.append(Fold(i, out / f"fold_{i}", {"train": d / "train.jsonl", "validation": d / "validation.jsonl",
                                                 "test": d / "heldout.jsonl"},
                          heldout=sorted(int(j) for j in ho), n_train=len(tr)))
    flipped = planted_noise(train) if cfg.data.label_noise.rate > 0 else None

    fcfg = load_config(config, overrides)  # a copy to edit: what every fold runs
    _abs_paths(fcfg)
    d = fcfg.data
    d.text_column, d.label_column, d.id_column = "text", "label", "id"
    d.text_pair_column = "text_pair" if pair else None
    reset_interventions(d)  # the fold files hold the noisy / intervened training data already
    d.audit = None  # the audit describes the config's test split, not a held-out fold
    fcfg.then, fcfg.overwrite, fcfg.resume = None, False, "auto"
    fcfg.output_dir = str(out / "fold_0")
    return Plan(cfg, out, folds, train, names, flipped, out / "fold_config.yaml", to_dict(fcfg), val_rows, rows)


def fingerprint(plan: Plan) -> dict:
    h = hashlib.sha256()
    for f in plan.folds:
        h.update(("\n".join(plan.rows[j]["id"] + "\t" + plan.rows[j]["label"] for j in f.heldout) + "\n\n").encode())
    return {"folds": len(plan.folds), "heldout_sha256": h.hexdigest(), "fold_config": plan.fold_cfg_dict}


def write_plan(plan: Plan) -> None:
    """The fold config, each fold's train / validation / held-out JSONL (ids kept) and plan.json. A DIR
    planned before with another config or folds is refused (its finished folds would be skipped wrongly)."""
    import yaml

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(plan)
    pj = out / "plan.json"
    if pj.exists():
        try:
            old = json.loads(pj.read_text())
        except ValueError:
            old = None
        if old != json.loads(json.dumps(fp)):
            raise LabelIssuesError(f"{out}: planned before with another config, overrides or --folds (plan.json); "
                                   "use a new --output_dir or remove it")
    val = _jsonl(plan.validation_rows)
    for f in plan.folds:
        f.files["train"].parent.mkdir(parents=True, exist_ok=True)
        ho = set(f.heldout)
        texts = {"train": _jsonl([r for j, r in enumerate(plan.rows) if j not in ho]),
                 "validation": val, "test": _jsonl([plan.rows[j] for j in f.heldout])}
        for s, text in texts.items():
            p = f.files[s]
            if not (p.is_file() and p.read_text() == text):
                write_text_atomic(p, text)
    text = yaml.safe_dump(plan.fold_cfg_dict, sort_keys=False)
    if not (plan.fold_config.is_file() and plan.fold_config.read_text() == text):
        write_text_atomic(plan.fold_config, text)
    if not pj.exists():
        write_text_atomic(pj, json.dumps(fp, indent=1))
    if plan.flipped is not None:
        write_text_atomic(out / "noise.json", json.dumps(
            {"rate": plan.cfg.data.label_noise.rate, "kind": plan.cfg.data.label_noise.kind,
             "seed": plan.cfg.data.label_noise.seed, "train_examples": len(plan.rows),
             "flipped_count": len(plan.flipped), "flipped": plan.flipped}, indent=1))


# ----------------------------------------------------------------------------- running
def fold_command(plan: Plan, fold: Fold, nproc: int) -> list[str]:
    return train_command(plan.fold_config, fold.overrides(), nproc)


def fold_env(plan: Plan, nproc: int) -> dict:
    return train_env(nproc, bool(plan.cfg.deepspeed.config))


class FoldFailed(RunFailed):
    def __init__(self, fold: Fold, rc: int, log: Path):
        super().__init__(f"fold {fold.k} ({fold.out})", rc, log)


def run_local(plan: Plan, todo: list, nproc: int, progress: bool = True, on_done=None) -> dict:
    """Run the unfinished folds one after another; {fold: seconds}. Each fold's output goes to
    DIR/logs/fold_k.log; a failing fold stops the run (FoldFailed)."""
    from tqdm.auto import tqdm

    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    times = {}
    bar = tqdm(total=len(plan.folds), initial=len(plan.folds) - len(todo), desc="label-issues folds", unit="fold",
               disable=not progress, file=sys.stderr)
    for f in todo:
        bar.set_postfix_str(f"fold {f.k}")
        log = logs / f"fold_{f.k}.log"
        t0 = time.time()
        rc = run_logged(fold_command(plan, f, nproc), fold_env(plan, nproc), log)
        if rc != 0 or not f.done():
            bar.close()
            raise FoldFailed(f, rc, log)
        times[f.k] = time.time() - t0
        if on_done is not None:
            on_done(f.k, times[f.k])  # e.g. record the fold's seconds now (a later fold may fail)
        bar.update(1)
    bar.close()
    return times


def slurm_command(plan: Plan, todo: list, sbatch_args: list[str]) -> tuple[list[str], dict]:
    """sbatch of `slurm/sweep_array.sbatch` with one array task per unfinished fold: task k's variant sets
    fold k's data files, its output_dir is DIR/fold_k (OUTPUT_DIR=DIR, TASK_DIR_PREFIX=fold_), and every
    task runs the shared fold config; preemption / requeue / resume are the script's own."""
    for p in [str(plan.out), str(plan.fold_config)]:
        if not sbatch_safe(p):
            raise LabelIssuesError(f"--output_dir {plan.out}: the SLURM backend needs a path without spaces or "
                                   "shell characters")
    variants = []
    for f in plan.folds:  # an entry per fold, so that array index = fold number
        variants.append(" ".join(f.overrides()[1:]))
    env = {"CONFIG": str(plan.fold_config), "OUTPUT_DIR": str(plan.out), "TASK_DIR_PREFIX": "fold_",
           "SWEEP_VARIANTS": ";".join(variants)}
    cmd = ["sbatch", "--parsable", f"--array={','.join(str(f.k) for f in todo)}",
           "--job-name=llm-dist-label-issues", f"--output={plan.out}/logs/slurm-%A_%a.out", *sbatch_args,
           str(REPO / "slurm" / "sweep_array.sbatch")]
    return cmd, env


def submit_slurm(plan: Plan, todo: list, sbatch_args: list[str]) -> str:
    cmd, env = slurm_command(plan, todo, sbatch_args)
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    return submit_array(cmd, env, plan.out / "slurm_submit.sh", LabelIssuesError)
