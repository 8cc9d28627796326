"""Starting ordinary training runs from an analysis driver (label-issues folds, experiment variants): the
command (`python -m llm_dist.cli train`, or `accelerate launch` with N processes), its environment, a
failure that names the run and its log, and the SLURM array submission through `slurm/sweep_array.sbatch`."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(config: str | Path, overrides: list[str], nproc: int) -> list[str]:
    tail = ["-m", "llm_dist.cli", "train", str(config), *overrides]
    if nproc == 1:
        return [sys.executable, *tail]
    acc = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    return [acc, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *tail]


def train_env(nproc: int, deepspeed: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if nproc > 1 and not deepspeed:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("ACCELERATE_USE_CPU", "1")  # gloo on CPU ranks (DeepSpeed finds the CPU itself)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class RunFailed(RuntimeError):
    """A run exited non-zero (or finished without its outputs): names it, its exit code, its last error line."""

    def __init__(self, what: str, rc: int, log: Path):
        text = log.read_text(errors="replace").splitlines() if log.exists() else []
        errs = [line for line in text if line.startswith("error:")]
        why = (errs[-1] if errs else (text[-1] if text else "no output")).strip()
        super().__init__(f"{what} failed with exit code {rc}: {why} (log: {log})")
        self.rc = rc


def run_logged(cmd: list[str], env: dict, log: Path) -> int:
    """Run `cmd`, appending its output to `log` (after a `$ command` line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        fh.flush()
        return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())


def sbatch_safe(p: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_./+:@=,-]+", p) is not None


def submit_array(cmd: list[str], env: dict, record: Path, error) -> str:
    """sbatch `cmd` with `env` added; the job id. Writes `record` (a script that re-submits the same)."""
    from ..config import write_text_atomic

    if shutil.which("sbatch") is None:
        raise error("--backend slurm: sbatch not found on PATH")
    p = subprocess.run(cmd, env=dict(os.environ, **env), cwd=REPO, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise error(f"sbatch failed: {(p.stderr or p.stdout).strip().splitlines()[-1:] or ['?']}")
    job = p.stdout.strip().split(";")[0]
    script = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    write_text_atomic(record, "#!/bin/bash\n# submitted as job " + job + "\ncd " + str(REPO) + "\n" + script
                      + " ".join(shlex.quote(c) for c in cmd) + "\n")
    return job


def driver_main(argv: list[str] | None, doc: str, body, input_error: type) -> int:
    """The CLI shell of a driver verb (label-issues, experiment): --help, quiet libraries, and every failure
    as one `error:` line — a failed run exits 1 (2 when the run itself refused its input), bad input 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return 0 if argv else 2
    from ..cli import _quiet_libraries

    _quiet_libraries()
    import datasets

    datasets.disable_progress_bars()
    from ..config import ConfigError
    from ..data.sources import DataError

    try:
        return body(argv)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.rc == 2 else 1
    except (input_error, ConfigError, DataError, OSError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else (str(e) or type(e).__name__)
        print(f"error: {msg.splitlines()[0]}", file=sys.stderr)
        return 2
