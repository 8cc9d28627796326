"""`llm-dist train | audit | analyze | label-issues | influence` — and `python train.py CONFIG.yaml [--key=value ...]`.

Config and data errors are one line on stderr and exit code 2."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*(torch.utils._pytree|set_vital).*")


def train_main(argv: list[str]) -> int:
    from .training.signals import StopSignal

    stop = StopSignal()  # first: a preemption signal while libraries load is not lost (nor fatal)
    try:
        return _train(argv, stop)
    finally:
        stop.restore()


def _train(argv: list[str], stop) -> int:
    _quiet_libraries()
    from .config import ConfigError, load_config
    from .data.sources import DataError
    from .models.build import ModelError
    from .training.checkpoint import CheckpointWriteError
    from .training.nonfinite import NonFinite
    from .training.signals import Interrupted

    path, overrides = None, list(argv)
    if overrides and not overrides[0].startswith("--"):
        path = overrides.pop(0)
    if overrides and overrides[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    created = None
    try:
        try:
            cfg = load_config(path, overrides)
            _check_chain(cfg, load_config)
            from .training.loop import run
        except Interrupted as e:
            if _is_main():
                print(f"{e}: nothing to save; exiting", flush=True)
            return 0

        while True:
            created = None if Path(cfg.output_dir).exists() else Path(cfg.output_dir)
            try:
                result = run(cfg, stop)
            except Interrupted as e:  # a signal during start-up: nothing new to save
                return _stopped_in_startup(cfg, created, e)
            except CheckpointWriteError as e:  # disk full…: earlier checkpoints stay, so output_dir stays too
                if _is_main():
                    print(f"error: {e}", file=sys.stderr)
                return 2
            except NonFinite as e:
                if _is_main():
                    print(f"error: {cfg.output_dir}: {e}; nothing saved or exported", file=sys.stderr)
                return 3
            if result.get("diverged"):
                if _is_main():
                    d = result["diverged"]
                    print(f"error: {cfg.output_dir}: non-finite loss or gradient at step {d['step']} (see "
                          f"metrics.jsonl); stopped without saving or exporting; last good checkpoint: "
                          f"{d.get('last_good_checkpoint') or 'none'}", file=sys.stderr)
                return 3
            if not cfg.then or result.get("signalled"):  # a preempted stage ends the chain
                break
            cfg = load_config(cfg.then, [])
    except (ConfigError, DataError, ModelError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and not e.filename:
            raise  # not about a file (e.g. a lost connection between ranks): keep the traceback
        if _is_main():  # every rank meets the same bad input; one says so
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)  # nothing half-written
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _stopped_in_startup(cfg, created, e) -> int:
    """Exit 0 on a start-up signal. A run dir that already holds a run gets `run.json` saying
    `signalled` (the SLURM scripts requeue on it); one this start-up created is removed again."""
    import json
    import os

    out = Path(cfg.output_dir)
    if _is_main():
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif (out / "config.yaml").exists() and _unfinished(out / "run.json"):
            state = {}
            latest = out / "checkpoints" / "latest"
            if latest.exists():
                try:
                    state = json.loads((out / "checkpoints" / latest.read_text().strip() / "trainer_state.json").read_text())
                except (OSError, ValueError):
                    state = {}
            tmp = out / "run.json.tmp"
            tmp.write_text(json.dumps({"final_step": state.get("step", 0), "signalled": True, "stopped_in": e.phase},
                                      indent=1))
            os.replace(tmp, out / "run.json")
        print(f"{e}: nothing new to save (the last checkpoint, if any, is intact); exiting", flush=True)
    return 0


def _unfinished(run_json: Path) -> bool:
    """No run.json yet, or one that says the run stopped on a signal (a finished run's record stays)."""
    import json

    try:
        return bool(json.loads(run_json.read_text()).get("signalled"))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False


def _check_chain(cfg, load_config) -> None:
    """Every stage's config (`then: …`) loads and validates before the first stage starts."""
    from .config import ConfigError

    seen = 0
    while cfg.then:
        seen += 1
        if seen > 16:
            raise ConfigError(f"config key 'then': {cfg.then}: more than 16 chained configs (a cycle?)")
        cfg = load_config(cfg.then, [])


def _one_line(e: Exception) -> str:
    """The message of a config/data/model error, or `PATH: reason` of an OS error (read-only, no space …)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return msg.splitlines()[0]


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llm-dist {train,audit,analyze,label-issues,experiment,influence,prepare} ...\n"
              "  train CONFIG.yaml [--key=value ...]\n"
              "  audit CONFIG.yaml | --data train=PATH ...\n"
              "  analyze RUN_DIR [--select ambiguous|hard|easy --fraction F --out FILE.jsonl]\n"
              "  label-issues CONFIG.yaml --folds K [--key=value ...] --output_dir DIR\n"
              "  experiment SPEC.yaml [--backend local|slurm] [--dry-run] [--key=value ...]\n"
              "  influence RUN_DIR [--split test | --test FILE | --query TEXT [--label L]] [--k 10] [--proj-dim 2048]\n"
              "  prepare CONFIG.yaml --out DIR [--workers N] [--shard_mb M] [--task_index i --num_tasks n]")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "audit":
        from .analysis.audit import main as audit_main

        return audit_main(rest)
    if cmd == "analyze":
        _quiet_libraries()
        from .analysis.dynamics.analyze import main as analyze_main

        return analyze_main(rest)
    if cmd in ("label-issues", "label_issues"):
        from .analysis.label_issues import main as label_issues_main

        return label_issues_main(rest)
    if cmd == "experiment":
        from .analysis.experiments import main as experiment_main

        return experiment_main(rest)
    if cmd == "influence":
        _quiet_libraries()
        from .analysis.influence import main as influence_main

        return influence_main(rest)
    if cmd == "prepare":
        _quiet_libraries()
        from .data.shards import main as prepare_main

        return prepare_main(rest)
    print(f"error: unknown command '{cmd}' (train, audit, analyze, label-issues, experiment, influence, prepare)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
