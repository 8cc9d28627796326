"""`llm-dist train | audit` — and `python train.py CONFIG.yaml [--key=value ...]`.

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
    _quiet_libraries()
    from .config import ConfigError, load_config
    from .data.sources import DataError
    from .models.build import ModelError

    path, overrides = None, list(argv)
    if overrides and not overrides[0].startswith("--"):
        path = overrides.pop(0)
    if overrides and overrides[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    created = None
    try:
        cfg = load_config(path, overrides)
        from .training.loop import run

        while True:
            created = None if Path(cfg.output_dir).exists() else Path(cfg.output_dir)
            result = run(cfg)
            if not cfg.then or result.get("signalled"):  # a preempted stage ends the chain
                break
            cfg = load_config(cfg.then, [])
    except (ConfigError, DataError, ModelError, FileNotFoundError) as e:
        if _is_main():  # every rank meets the same bad input; one says so
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)  # nothing half-written
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llm-dist {train,audit} ...\n  train CONFIG.yaml [--key=value ...]\n  audit CONFIG.yaml | --data train=PATH ...")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "audit":
        from .analysis.audit import main as audit_main

        return audit_main(rest)
    print(f"error: unknown command '{cmd}' (train, audit)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
