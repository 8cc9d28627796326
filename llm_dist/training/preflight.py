"""Start-up checks: everything cheap is checked before anything is written or anything slow starts.

`preflight` runs on every rank, reads only, and raises ConfigError / DataError / ModelError (or the
FileNotFoundError of a bad resume path) naming the key, file and line:

    output_dir writable → model dir / preset, positions vs data.max_length / data.seq_len → tokenizer dir
    (and its size vs the model's embeddings) → resume checkpoint → data (files exist and parse, columns,
    labels, split sizes vs one global batch; MLM: every source file's first row) → what output_dir holds.

Only then does `prepare_output_dir` touch output_dir: `--overwrite=true` removes the old run's records,
and the directory is created. A finished run's records thus change only by a resume of that same run or
by an explicit `--overwrite=true` — never by a run that fails its checks.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, RunConfig

# what says "a run lives here"
RUN_RECORDS = ("config.yaml", "metrics.jsonl", "run.json", "checkpoints")
# what a run writes into output_dir (README: What a run writes); --overwrite=true removes these, nothing else
RUN_OUTPUTS = RUN_RECORDS + ("splits", "final", "final.tmp", "tokenizer", "tokenizer.tmp", "adapter",
                             "predictions.jsonl", "test_report.txt", "test_metrics.json", "confusion_matrix.png",
                             "ds_config.json", "wandb", "tensorboard", "best_model", "noise.json", "dynamics",
                             "analysis", "interventions.json")


@dataclass
class Checked:
    """What the checks found, handed to the run so nothing is resolved twice."""
    resume_from: Path | None = None
    splits: dict | None = None  # classify: train / validation / test, validated, not yet written
    records: list[str] = field(default_factory=list)  # run records already in output_dir


def preflight(cfg: RunConfig, world_size: int) -> Checked:
    out = Path(cfg.output_dir)
    check_writable(out)
    model_config = check_model(cfg)
    check_tokenizer(cfg, model_config)
    resume_from = check_resume(cfg)
    reuse_splits = not cfg.overwrite and cfg.resume != "never"
    splits = check_data(cfg, world_size, out / "splits" if reuse_splits else None)
    records = check_output_dir(cfg, resume_from)
    return Checked(resume_from=resume_from, splits=splits, records=records)


def prepare_output_dir(cfg: RunConfig, checked: Checked, main: bool) -> None:
    """After the checks: `--overwrite=true` removes the old run's outputs (and only those); create the dir."""
    if not main:
        return
    out = Path(cfg.output_dir)
    if cfg.overwrite and checked.records:
        for name in RUN_OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        print(f"--overwrite=true: removed the previous run's records from {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- the checks
def check_writable(out: Path) -> None:
    """output_dir (or, before it exists, its nearest existing parent) accepts a new file."""
    p = out
    try:
        while not p.exists() and not p.is_symlink() and p.parent != p:
            p = p.parent
        is_dir = p.is_dir()
    except OSError as e:  # a parent we may not even look into
        raise ConfigError(f"config key 'output_dir': cannot write to {out} ({e.strerror})") from None
    if not is_dir:
        raise ConfigError(f"config key 'output_dir': cannot write to {out}: {p} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=p):  # an unnamed file: nothing is left behind
            pass
    except OSError as e:
        raise ConfigError(f"config key 'output_dir': cannot write to {p} ({e.strerror})") from None


def check_model(cfg: RunConfig):
    """The model dir (exists, config.json, weights) and its position limit; presets grow their positions."""
    m = cfg.model
    if not m.path:
        return None  # the preset name is checked with the config; presets embed max(512, length) positions
    from transformers import AutoConfig

    from ..models.build import ModelError, check_model_dir, check_positions

    check_model_dir(m.path)
    try:
        config = AutoConfig.from_pretrained(m.path)
    except Exception as e:  # noqa: BLE001 - any loader failure, on one line
        raise ModelError(f"{m.path}: cannot read the model config ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    key, length = ("data.seq_len", cfg.data.seq_len) if cfg.task == "mlm" else ("data.max_length", cfg.data.max_length)
    check_positions(config, length, key, f"{m.path}/config.json")
    return config


def check_tokenizer(cfg: RunConfig, model_config) -> None:
    """A given tokenizer dir loads and fits the model's embeddings (a trained one is made to fit)."""
    from ..models.build import ModelError, check_vocab, load_tokenizer, tokenizer_source

    path, key = tokenizer_source(cfg)
    if not path:
        return
    if not Path(path).is_dir():
        raise ModelError(f"config key '{key}': {path}: {'tokenizer' if key == 'tokenizer.path' else 'model'} "
                         "dir not found")
    tok = load_tokenizer(path)
    if model_config is not None:
        check_vocab(model_config, tok, cfg.model.path)


def check_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from (verified), or None. `--overwrite=true` starts over: no auto-resume."""
    from .checkpoint import resolve_resume

    if cfg.resume not in ("auto", "never"):
        p = Path(cfg.resume)
        if not p.exists():
            raise FileNotFoundError(f"config key 'resume': {cfg.resume}: not found")
        if cfg.overwrite and _inside(p, Path(cfg.output_dir)):
            raise ConfigError(f"config key 'overwrite': true would remove the checkpoint to resume ({cfg.resume}); "
                              "resume it without --overwrite, or copy it elsewhere first")
    if cfg.overwrite and cfg.resume == "auto":
        return None
    return resolve_resume(cfg.resume, cfg.output_dir)


def check_data(cfg: RunConfig, world_size: int, pinned: Path | None):
    """Classify: the splits, fully validated (returned, to be written by the task). MLM: the sources."""
    from ..data.sources import DataError

    if cfg.task in ("classify", "prompt"):
        from ..data.classify import load_splits

        if cfg.data.audit and not Path(cfg.data.audit).is_file():
            raise DataError(f"config key 'data.audit': {cfg.data.audit} not found (run `llm-dist audit` first)")
        global_batch = cfg.batch_size * cfg.grad_accum * world_size
        splits = load_splits(cfg, pinned=pinned, min_train=global_batch, for_training=True)
        if cfg.data.audit and "test" in splits:  # the audit's ids must be this run's (else nothing would join)
            from ..analysis.audit import leaked_ids

            leaked_ids(cfg.data.audit, split="test", expected_ids=splits["test"]["id"])
        return splits
    _check_sources(cfg)
    return None


def _check_sources(cfg: RunConfig) -> None:
    """Each MLM source resolves to files of a known format whose first row parses (a `.parquet` that is
    not parquet, a JSONL with a bad first line, a missing text column fail here, not mid-run)."""
    from ..config import load_config
    from ..data.sources import DataError, bbc_news_dir, file_format, iter_rows, open_parquet, resolve_files

    for i, src in enumerate(cfg.data.sources):
        key = f"data.sources.{i}"
        if src.name is not None:
            if src.name != "bbc_news":
                raise DataError(f"config key '{key}.name': unknown source '{src.name}' (built-in sources: bbc_news)")
            bbc_news_dir()
        else:
            try:
                files = resolve_files(src.path)
            except DataError as e:
                raise DataError(f"config key '{key}.path': {e}") from None
            for f in files:
                if file_format(f, src.format) == "parquet":  # the footer: format and columns, no data read
                    names = open_parquet(f).schema_arrow.names
                    if src.text_column not in names:
                        raise DataError(f"{f}: no column '{src.text_column}' (columns: {', '.join(names)})")
                else:
                    next(iter_rows(f, src.format, src.text_column, src.id_column), None)
        if src.exclude_ids and not Path(src.exclude_ids).is_file():
            raise DataError(f"config key '{key}.exclude_ids': {src.exclude_ids}: not found")
        if src.exclude_splits_of:
            load_config(src.exclude_splits_of, [])


def check_output_dir(cfg: RunConfig, resume_from: Path | None) -> list[str]:
    """What output_dir already holds, and whether this run may write there.

    - `--overwrite=true`: anything (the old records are removed once every check has passed);
    - `resume: never` into a dir holding a run: refused;
    - `resume: auto` into a finished run (run.json) with no checkpoint to resume: refused — it would train
      over that run's records; a resume of the same run (its checkpoints) is allowed;
    - `resume: PATH` from elsewhere into a dir holding a run: refused."""
    out = Path(cfg.output_dir)
    records = [name for name in RUN_RECORDS if (out / name).exists()]
    if not records or cfg.overwrite:
        return records
    held = ", ".join(records)
    fix = "pass --overwrite=true to replace it, or choose a new output_dir"
    if cfg.resume == "never":
        raise ConfigError(f"config key 'resume': never, but output_dir {out} already holds a run ({held}); {fix}")
    if resume_from is None:
        if _finished(out):
            raise ConfigError(f"config key 'output_dir': {out} holds a finished run (run.json) with no checkpoint to "
                              "resume; pass --overwrite=true to train it again from scratch, or choose a new "
                              "output_dir")
        return records  # an unfinished run that never saved a checkpoint: it starts again
    if cfg.resume != "auto" and not _inside(resume_from, out):
        raise ConfigError(f"config key 'resume': {cfg.resume} is another run's checkpoint, but output_dir {out} "
                          f"already holds a run ({held}); {fix}")
    return records


def _finished(out: Path) -> bool:
    """run.json is written at the end of a run; one that says `signalled` was stopped, not finished."""
    f = out / "run.json"
    if not f.exists():
        return False
    try:
        return not json.loads(f.read_text()).get("signalled", False)
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: treat it as a finished run's record


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
