"""Atomic, verified checkpoints.

Layout under `output_dir/checkpoints/`:
    step_00000100/      accelerate `save_state` (model, optimizer, scheduler, RNG per rank)
                        + data_state_rank{R}.pt (each rank's data position) + trainer_state.json
                        + manifest.json (every file's size and sha256, written last)
    latest              the name of the newest complete checkpoint (replaced atomically)

Every rank calls `save` (DeepSpeed and accelerate save collectively). Files go to a `.tmp-…` dir which
the main process renames once all ranks are done; `latest` is updated after the rename; only the last
`keep` checkpoints are kept. `find_resumable` walks back from `latest` to the newest checkpoint whose
manifest verifies, warning about each truncated or corrupt one it skips.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    files = {}
    for f in sorted(ckpt.rglob("*")):
        if f.is_file() and f.name != "manifest.json":
            files[str(f.relative_to(ckpt))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    tmp = ckpt / "manifest.json.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, ckpt / "manifest.json")


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong."""
    man = ckpt / "manifest.json"
    if not man.exists():
        return "no manifest.json (incomplete)"
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest.json"
    for name, meta in files.items():
        f = ckpt / name
        if not f.exists():
            return f"missing {name}"
        if f.stat().st_size != meta["size"]:
            return f"{name} is truncated ({f.stat().st_size} of {meta['size']} bytes)"
        if _sha256(f) != meta["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[-1])


class Checkpointer:
    def __init__(self, root: str | os.PathLike, accelerator, keep: int = 2):
        self.root, self.acc, self.keep = Path(root), accelerator, max(1, keep)

    def save(self, step: int, trainer_state: dict, data_state: dict) -> Path:
        acc = self.acc
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        torch.save(data_state, tmp / f"data_state_rank{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / "latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / "latest")
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step_*") if p.is_dir()), key=step_of)


def find_resumable(root: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint under `root`, starting from the `latest` pointer."""
    root = Path(root)
    if not root.is_dir():
        return None
    cands = sorted((p for p in root.glob("step_*") if p.is_dir()), key=step_of, reverse=True)
    pointer = root / "latest"
    if pointer.exists():
        name = pointer.read_text().strip()
        cands.sort(key=lambda p: (p.name != name, -step_of(p)))
    for c in cands:
        problem = verify(c)
        if problem is None:
            return c
        warnings.warn(f"checkpoint {c} is unusable ({problem}); trying the previous one", stacklevel=2)
    return None


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return find_resumable(Path(output_dir) / "checkpoints")
    p = Path(resume)
    if (p / "latest").exists() or p.name == "checkpoints":
        found = find_resumable(p)
    else:
        problem = verify(p) if p.is_dir() else "not found"
        if problem:
            raise FileNotFoundError(f"config key 'resume': {resume}: {problem}")
        found = p
    if found is None:
        raise FileNotFoundError(f"config key 'resume': {resume}: no intact checkpoint")
    return found


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_data_state(ckpt: Path, rank: int) -> dict | None:
    f = ckpt / f"data_state_rank{rank}.pt"
    return torch.load(f, weights_only=False) if f.exists() else None
