"""Shared helpers: launching train.py on 1 or 2 CPU ranks (gloo) and reading a run's outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ACCELERATE = str(Path(PY).with_name("accelerate"))


def run_env(deepspeed: bool = False, **extra) -> dict:
    """The environment of a launched run. DeepSpeed runs leave ACCELERATE_USE_CPU unset: accelerate
    turns DeepSpeed off under it; our Accelerator picks gloo itself when there is no GPU."""
    env = dict(os.environ)
    env.update({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1"})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if deepspeed:
        env.pop("ACCELERATE_USE_CPU")
    env.update(extra)
    return env


def kill_tree(proc) -> None:
    """SIGKILL a launcher and every worker it started (torchrun workers live in their own groups)."""
    import psutil

    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def launch_cmd(config: str, *overrides: str, nproc: int = 2) -> list[str]:
    if nproc == 1:
        return [PY, "train.py", config, *overrides]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "train.py", config, *overrides]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *overrides: str, nproc: int = 2, check: bool = True, timeout: int = 600,
           deepspeed: bool = False, **env):
    proc = subprocess.run(launch_cmd(config, *overrides, nproc=nproc), cwd=ROOT, env=run_env(deepspeed, **env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_run(out: Path) -> dict:
    return json.loads((Path(out) / "run.json").read_text())


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A WordPiece tokenizer trained once on BBC News for the whole session."""
    from llm_dist.data.sources import iter_texts
    from llm_dist.config import SourceConfig
    from llm_dist.models.build import train_wordpiece

    d = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece(iter_texts([SourceConfig(name="bbc_news")]), 4096).save_pretrained(str(d))
    return str(d)
