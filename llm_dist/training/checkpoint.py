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


# ----------------------------------------------------------------------------- resuming elsewhere
def load_portable(ckpt: Path, saved: dict, model, optimizer) -> list[str]:
    """Restore, into the not-yet-prepared model and optimizer, what survives a change of world size or of
    ZeRO layout: the full fp32 weights (consolidated from the ZeRO shards with DeepSpeed's zero_to_fp32
    when the checkpoint is sharded) and, for a plain (DDP) checkpoint and a torch optimizer, the optimizer
    moments. Returns what was restored."""
    restored = []
    if saved.get("zero_stage") is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")
    else:
        from safetensors.torch import load_file

        sd = load_file(ckpt / "model.safetensors")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if k.endswith("decoder.weight") or k.endswith("decoder.bias")}
    if set(missing) - tied or unexpected:
        raise FileNotFoundError(f"{ckpt}: weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]})")
    restored.append("model weights")
    opt_file = ckpt / "optimizer.bin"
    if saved.get("zero_stage") is None and opt_file.exists() and isinstance(optimizer, torch.optim.Optimizer):
        try:
            optimizer.load_state_dict(torch.load(opt_file, weights_only=False, map_location="cpu"))
            restored.append("optimizer state")
        except (ValueError, KeyError):
            pass
    return restored


def load_portable_scheduler(ckpt: Path, scheduler) -> list[str]:
    f = ckpt / "custom_checkpoint_0.pkl"
    if f.exists() and hasattr(scheduler, "load_state_dict") and type(scheduler).__name__ != "AcceleratedScheduler":
        scheduler.load_state_dict(torch.load(f, weights_only=False))
        return ["learning-rate schedule"]
    return []
