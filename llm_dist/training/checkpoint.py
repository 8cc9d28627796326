"""Atomic, verified checkpoints that never run code when they are loaded.

Layout under `output_dir/checkpoints/`:
    step_00000100/
        model.safetensors          the (unwrapped) model's weights — plain runs (DDP or one process)
        optimizer.bin              the torch optimizer's state dict (torch.save; read with weights_only=True)
        pytorch_model/, latest,    DeepSpeed runs instead of the two above: the engine's own files (every
        zero_to_fp32.py, …         rank's shard), probed with weights_only=True before DeepSpeed reads them
        scheduler.json             the learning-rate schedule's state dict (absent when DeepSpeed owns it)
        scaler.json                fp16 GradScaler state (plain fp16 runs only)
        rng_state_rank{R}.json     python / numpy / torch (and CUDA) RNG states of rank R
        data_state_rank{R}.json    rank R's data position (MLM stream position, packed tokens, shuffle buffer)
        trainer_state.json         step and token counters, task position, run lineage, format version
        manifest.json              every file's size and sha256, written last
    latest                         the name of the newest complete checkpoint (replaced atomically)

Safety: everything is JSON, safetensors, or a torch file read with `weights_only=True` (tensors and plain
containers only). The JSON files use a tagged encoding that round-trips tuples, non-string keys, tensors
and numpy arrays exactly (`to_jsonable` / `from_jsonable`) and can only ever produce plain data. Before
anything is loaded, `check_loadable` opens every pickle-based file of the checkpoint with
`torch.load(weights_only=True)` — DeepSpeed's files with a short allowlist of the DeepSpeed classes they
really hold — and refuses the checkpoint, naming the file, if any would need more (the manifest protects
against corruption, not against a crafted file).

Writing: every rank calls `save` (DeepSpeed saves collectively). Files go to a `.tmp-step_…` dir which the
main process renames once all ranks are done; `latest` is replaced after the rename. A write failure on any
rank (disk full, read-only file system) removes the partial dir on every rank's agreement and raises
`CheckpointWriteError`; the previous checkpoints and `latest` are untouched. Stale `.tmp-step_…` dirs of an
interrupted save are removed when a `Checkpointer` starts.

Rotation keeps the last `keep` checkpoints of this run: it deletes only checkpoints this Checkpointer wrote
or older ones of the same run lineage (`trainer_state.json` "lineage", inherited on resume), and only when
their manifest verifies; anything else is left for a human.

Resuming: `find_resumable` walks back from `latest` to the newest checkpoint whose manifest verifies,
warning about each truncated or corrupt one it skips; when checkpoints exist but none verifies it refuses
(ConfigError listing each and what is wrong) rather than start over.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

FORMAT = 2  # trainer_state.json "checkpoint_format"; 1 (no key) was accelerate's pickles
MODEL_TAG = "pytorch_model"  # DeepSpeed's tag dir inside a checkpoint (accelerate's MODEL_NAME)
MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.bin"
SCHEDULER_FILE, SCALER_FILE, TRAINER_FILE = "scheduler.json", "scaler.json", "trainer_state.json"
# the DeepSpeed classes its checkpoint files hold (ZeRO-1/2/3 optimizer states, fp16 loss scaling); nothing else
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, read-only file system…). One line naming the checkpoint;
    the partial files are gone and the previous checkpoints and `latest` are untouched."""


# ----------------------------------------------------------------------------- manifest
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
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "unreadable manifest.json"
    for name, meta in files.items():
        f = ckpt / name
        if not f.exists():
            return f"missing {name}"
        size = f.stat().st_size
        if size != meta["size"]:
            return (f"{name} is truncated ({size} of {meta['size']} bytes)" if size < meta["size"]
                    else f"{name} has the wrong size ({size}, not {meta['size']} bytes)")
        if _sha256(f) != meta["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[-1])


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=step_of)


def _lineage_of(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / TRAINER_FILE).read_text()).get("lineage")
    except (OSError, ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------- JSON that round-trips exactly
_TAGS = ("__tuple__", "__items__", "__tensor__", "__ndarray__")


def to_jsonable(x):
    """Plain data (dicts, lists, tuples, str/int/float/bool/None, tensors, numpy arrays) → JSON-able, exactly
    reversible by `from_jsonable`. Anything else is a TypeError: checkpoints hold no objects."""
    if x is None or isinstance(x, (bool, str, float)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, list):
        return [to_jsonable(v) for v in x]
    if isinstance(x, tuple):
        return {"__tuple__": [to_jsonable(v) for v in x]}
    if isinstance(x, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in x):
            return {k: to_jsonable(v) for k, v in x.items()}
        return {"__items__": [[to_jsonable(k), to_jsonable(v)] for k, v in x.items()]}
    if torch.is_tensor(x):
        t = x.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": base64.b64encode(raw).decode("ascii"), "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape)}
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": x.dtype.str}
    if isinstance(x, np.generic):
        return to_jsonable(x.item())
    raise TypeError(f"cannot store a {type(x).__name__} in a JSON checkpoint file")


def from_jsonable(x):
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tuple__" in x:
        return tuple(from_jsonable(v) for v in x["__tuple__"])
    if "__items__" in x:
        return {_hashable(from_jsonable(k)): from_jsonable(v) for k, v in x["__items__"]}
    if "__tensor__" in x:
        dtype = getattr(torch, str(x["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {x['dtype']!r}")
        raw = base64.b64decode(x["__tensor__"])
        if not raw:
            return torch.empty([int(s) for s in x["shape"]], dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape([int(s) for s in x["shape"]])
    if "__ndarray__" in x:
        return np.asarray(x["__ndarray__"], dtype=np.dtype(str(x["dtype"])))
    return {k: from_jsonable(v) for k, v in x.items()}


def _hashable(k):
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    path.write_text(json.dumps(to_jsonable(obj), indent=indent))


def read_json(path: Path):
    """A checkpoint's JSON file as plain data; a one-line ConfigError naming the file when it is not one."""
    try:
        return from_jsonable(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, OSError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e).splitlines()[0][:160]
        raise ConfigError(f"checkpoint file {path} is not a valid JSON state file ({reason}); "
                          "refusing to load it") from None


# ----------------------------------------------------------------------------- safe loading of torch files
def _safe_globals(deepspeed: bool) -> list:
    if not deepspeed:
        return []
    import importlib

    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return out


def _refused(path: Path, e: BaseException) -> ConfigError:
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        why = f"it holds a pickled reference to {m.group(1)}, which could run code on load"
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
        line = next((ln for ln in lines if "WeightsUnpickler error" in ln or "Unsupported" in ln), lines[0])
        why = line.replace("WeightsUnpickler error: ", "")[:200]
    return ConfigError(f"checkpoint file {path} is refused: {why} (checkpoints may hold only tensors and plain data)")


def torch_load_safe(path: Path, deepspeed: bool = False, mmap: bool = False):
    """torch.load with weights_only=True (plus the DeepSpeed allowlist for DeepSpeed's files); a one-line
    ConfigError naming the file for anything else."""
    try:
        with torch.serialization.safe_globals(_safe_globals(deepspeed)):
            return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - every failure to load safely is a refusal
        raise _refused(path, e) from None


def _is_pickle_based(ckpt: Path, f: Path) -> bool:
    """Every file but JSON and safetensors — and DeepSpeed's `latest` tag file and recovery scripts at the
    top, which nothing here reads — could be unpickled by someone (us or DeepSpeed): probe it."""
    if f.suffix in (".json", ".safetensors"):
        return False
    return not (f.parent == ckpt and (f.name == "latest" or f.suffix == ".py"))


def check_loadable(ckpt: Path) -> None:
    """Refuse (ConfigError) a checkpoint whose files could run code when loaded, or one in the old pickle format."""
    state = read_json(ckpt / TRAINER_FILE) if (ckpt / TRAINER_FILE).exists() else None
    if not isinstance(state, dict):
        raise ConfigError(f"config key 'resume': {ckpt} has no readable {TRAINER_FILE}")
    if state.get("checkpoint_format") != FORMAT:
        raise ConfigError(f"config key 'resume': {ckpt} was written by an older llm_dist in a pickle format that "
                          "is not loaded (it could run code); start over with --resume=never --overwrite=true or "
                          "use a newer checkpoint")
    deepspeed = state.get("zero_stage") is not None
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        if _is_pickle_based(ckpt, f):
            torch_load_safe(f, deepspeed=deepspeed, mmap=True)


# ----------------------------------------------------------------------------- write failures
_DISK_FULL = ("No space left on device", "file write failed", "unexpected pos", "StorageFull", "Disk quota exceeded")


def _write_failure(e: BaseException) -> str | None:
    """'disk_full', 'io' (another OS-level write error), or None (not a write failure: a bug, re-raise)."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if (isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT)) or any(s in str(x) for s in _DISK_FULL):
            return "disk_full"
        x = x.__cause__ or x.__context__
    if isinstance(e, OSError) or "IoError" in str(e):
        return "io"
    return None


def _write_model(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(module, str(path), metadata={"format": "pt"})


def _write_tensors(obj, path: Path) -> None:
    torch.save(obj, path)


# ----------------------------------------------------------------------------- the checkpointer
def _is_ds(acc) -> bool:
    return acc.distributed_type.value == "DEEPSPEED"


def _plain_scheduler(scheduler) -> bool:
    """A torch LR scheduler we save ourselves (not DeepSpeed's, which the engine saves in its own files)."""
    if scheduler is None or not hasattr(scheduler, "state_dict"):
        return False
    try:
        from accelerate.scheduler import AcceleratedScheduler
    except ImportError:  # pragma: no cover
        return True
    return not isinstance(scheduler, AcceleratedScheduler)


class Checkpointer:
    def __init__(self, root: str | os.PathLike, accelerator, keep: int = 2, model=None, optimizer=None,
                 scheduler=None, lineage: str | None = None):
        self.root, self.acc, self.keep = Path(root), accelerator, max(1, keep)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.lineage = lineage or uuid.uuid4().hex  # only the main process's is ever written or compared
        self._written: set[str] = set()
        self._warned: set[str] = set()
        if accelerator.is_main_process:
            self.remove_stale()

    # --- writing ---------------------------------------------------------------------------------------
    def remove_stale(self) -> None:
        """Remove the partial dirs of an interrupted save (a crash or a full disk mid-write)."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.glob(".tmp-step_*")):
            shutil.rmtree(p, ignore_errors=True)
            print(f"warning: removed {p}, the partial checkpoint of an interrupted save", file=sys.stderr)
        (self.root / "latest.tmp").unlink(missing_ok=True)

    def save(self, step: int, trainer_state: dict, data_state: dict) -> Path:
        acc, main = self.acc, self.acc.is_main_process
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        failure = self._attempt(lambda: self._make_dir(tmp)) if main else None
        failure = self._agree(failure)  # also the barrier: nobody writes before the dir exists
        if failure is None:
            failure = self._agree(self._attempt(lambda: self._write(tmp, trainer_state, data_state)))
        if failure is None and main:
            failure = self._attempt(lambda: self._publish(tmp, final))
        failure = self._agree(failure if main else None)
        if failure is not None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                (self.root / "latest.tmp").unlink(missing_ok=True)
            kind, reason = failure
            if kind == "disk_full":
                msg = f"no space left on device while writing checkpoint {final}"
            else:
                msg = f"cannot write checkpoint {final}: {reason}"
            raise CheckpointWriteError(msg + " (the partial files were removed; earlier checkpoints and "
                                             f"{self.root / 'latest'} are unchanged)")
        self._written.add(final.name)
        if main:
            self._rotate()
        return final

    @staticmethod
    def _make_dir(tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    @staticmethod
    def _attempt(fn):
        """Run a write; None when it worked, (kind, reason) for a write failure; anything else propagates."""
        try:
            fn()
            return None
        except Exception as e:  # noqa: BLE001 - classified below; non-write errors are re-raised
            kind = _write_failure(e)
            if kind is None:
                raise
            reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return kind, reason

    def _agree(self, failure):
        """Every rank learns whether any rank failed (and whether a disk was full); a collective, so also a barrier."""
        acc = self.acc
        if acc.num_processes == 1:
            return failure
        local = torch.tensor([float(failure is not None), float(failure is not None and failure[0] == "disk_full")],
                             dtype=torch.float64, device=acc.device)
        total = acc.reduce(local, reduction="sum")
        if total[0].item() == 0:
            return None
        if failure is not None:
            return failure
        return ("disk_full", "") if total[1].item() > 0 else ("io", "a write failed on another rank")

    def _write(self, tmp: Path, trainer_state: dict, data_state: dict) -> None:
        acc, main, rank = self.acc, self.acc.is_main_process, self.acc.process_index
        if _is_ds(acc):
            self.model.save_checkpoint(str(tmp), MODEL_TAG)  # every rank: its shards (and rank 0 the rest)
        elif main:
            _write_model(acc.unwrap_model(self.model), tmp / MODEL_FILE)
            if self.optimizer is not None:
                _write_tensors(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        _write_json(tmp / f"data_state_rank{rank}.json", data_state)
        _write_json(tmp / f"rng_state_rank{rank}.json", self._rng_state())
        if main:
            if _plain_scheduler(self.scheduler):
                _write_json(tmp / SCHEDULER_FILE, self.scheduler.state_dict(), indent=1)
            if getattr(acc, "scaler", None) is not None and not _is_ds(acc):
                _write_json(tmp / SCALER_FILE, acc.scaler.state_dict())
            _write_json(tmp / TRAINER_FILE, {**trainer_state, "lineage": self.lineage, "checkpoint_format": FORMAT},
                        indent=1)

    def _publish(self, tmp: Path, final: Path) -> None:
        write_manifest(tmp)
        if final.exists():
            self._make_room(final)
        os.replace(tmp, final)
        try:
            pointer = self.root / "latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / "latest")
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # `latest` still names the previous checkpoint
            raise

    def _make_room(self, final: Path) -> None:
        """A step dir of the same name exists: replace it only if this run wrote it (or it is an intact one of
        this run's lineage); otherwise move it aside — a run never deletes a checkpoint it did not write."""
        if final.name in self._written or (_lineage_of(final) == self.lineage and verify(final) is None):
            shutil.rmtree(final)
            return
        n, aside = 1, self.root / f"superseded-{final.name}"
        while aside.exists():
            n += 1
            aside = self.root / f"superseded-{final.name}-{n}"
        os.replace(final, aside)
        print(f"warning: {final} was not written by this run (or fails verification); moved it to {aside} "
              "instead of overwriting it", file=sys.stderr)

    def _rotate(self) -> None:
        ours = [c for c in self.complete() if c.name in self._written or _lineage_of(c) == self.lineage]
        for old in ours[:-self.keep]:
            problem = verify(old)
            if problem is not None:
                if old.name not in self._warned:
                    self._warned.add(old.name)
                    print(f"warning: not rotating away {old}: it fails verification ({problem}); left for you to "
                          "inspect or delete", file=sys.stderr)
                continue
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        return _step_dirs(self.root)

    def _rng_state(self) -> dict:
        st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "accelerate_step": int(getattr(self.acc, "step", 0))}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    # --- exact resume (same world size and layout) ------------------------------------------------------
    def load(self, ckpt: Path) -> None:
        """Model, optimizer, schedule, loss scaler and — last, since building data iterators draws from them —
        this rank's RNG states. The checkpoint was vetted by `check_loadable` (resolve_resume)."""
        acc = self.acc
        if _is_ds(acc):
            path, _ = self.model.load_checkpoint(str(ckpt), MODEL_TAG)
            if path is None:
                raise ConfigError(f"config key 'resume': {ckpt}: DeepSpeed could not load {MODEL_TAG}/")
        else:
            device = "cpu" if acc.device.type == "cpu" else str(acc.device)  # safetensors refuses "cpu:0"
            _load_model(acc.unwrap_model(self.model), ckpt / MODEL_FILE, device, strict=True)
            if self.optimizer is not None and (ckpt / OPTIMIZER_FILE).exists():
                self.optimizer.load_state_dict(torch_load_safe(ckpt / OPTIMIZER_FILE))
        if _plain_scheduler(self.scheduler) and (ckpt / SCHEDULER_FILE).exists():
            self.scheduler.load_state_dict(read_json(ckpt / SCHEDULER_FILE))
        if getattr(acc, "scaler", None) is not None and (ckpt / SCALER_FILE).exists():
            acc.scaler.load_state_dict(read_json(ckpt / SCALER_FILE))
        f = ckpt / f"rng_state_rank{acc.process_index}.json"
        if f.exists():
            st = read_json(f)
            random.setstate(st["python"])
            np.random.set_state(st["numpy"])
            torch.set_rng_state(st["torch"])
            if "cuda" in st and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(st["cuda"])
            if "accelerate_step" in st:
                acc.step = st["accelerate_step"]


def _load_model(module: torch.nn.Module, path: Path, device: str, strict: bool):
    """safetensors into `module` (tied weights saved once are restored to both names)."""
    from safetensors.torch import load_model

    try:
        return load_model(module, str(path), strict=strict, device=device)
    except Exception as e:  # noqa: BLE001 - a bad or foreign file is a one-line error naming it
        raise ConfigError(f"checkpoint file {path} cannot be loaded into this model: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None


# ----------------------------------------------------------------------------- finding a checkpoint
def find_resumable(root: str | os.PathLike, what: str = "config key 'resume'") -> Path | None:
    """The newest intact checkpoint under `root`, starting from the `latest` pointer; None when there is none
    at all. When checkpoints exist but none verifies: ConfigError listing each and what is wrong with it."""
    root = Path(root)
    cands = list(reversed(_step_dirs(root)))
    if not cands:
        return None
    pointer = root / "latest"
    if pointer.exists():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        cands.sort(key=lambda p: (p.name != name, -step_of(p)))
    problems = []
    for c in cands:
        problem = verify(c)
        if problem is None:
            for bad, why in problems:
                warnings.warn(f"checkpoint {bad} is unusable ({why}); trying the previous one", stacklevel=2)
            return c
        problems.append((c, problem))
    listing = ", ".join(f"{c.name} ({why})" for c, why in problems)
    raise ConfigError(f"{what}: no usable checkpoint in {root}: {listing}; repair or move them, or start over "
                      "with --resume=never --overwrite=true")


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    """The checkpoint to resume from (vetted: intact and safe to load), or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        found = find_resumable(Path(output_dir) / "checkpoints")
    else:
        p = Path(resume)
        if (p / "latest").exists() or p.name == "checkpoints":
            found = find_resumable(p, what=f"config key 'resume': {resume}")
            if found is None:
                raise FileNotFoundError(f"config key 'resume': {resume}: no checkpoint in it")
        else:
            problem = verify(p) if p.is_dir() else "not found"
            if problem:
                raise FileNotFoundError(f"config key 'resume': {resume}: {problem}")
            found = p
    if found is not None:
        check_loadable(found)
    return found


def load_trainer_state(ckpt: Path) -> dict:
    return read_json(ckpt / TRAINER_FILE)


def load_data_state(ckpt: Path, rank: int) -> dict | None:
    f = ckpt / f"data_state_rank{rank}.json"
    return read_json(f) if f.exists() else None


# ----------------------------------------------------------------------------- resuming elsewhere
def load_portable(ckpt: Path, saved: dict, model, optimizer) -> list[str]:
    """Restore, into the not-yet-prepared model and optimizer, what survives a change of world size or of
    ZeRO layout: the full fp32 weights (consolidated from the ZeRO shards with DeepSpeed's zero_to_fp32
    when the checkpoint is sharded — its files were probed by `check_loadable`) and, for a plain (DDP)
    checkpoint and a torch optimizer, the optimizer moments. Returns what was restored."""
    restored = []
    if saved.get("zero_stage") is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=MODEL_TAG)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    else:
        missing, unexpected = _load_model(model, ckpt / MODEL_FILE, "cpu", strict=False)
    tied = {k for k in missing if k.endswith("decoder.weight") or k.endswith("decoder.bias")}
    if set(missing) - tied or unexpected:
        raise FileNotFoundError(f"{ckpt}: weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]})")
    restored.append("model weights")
    opt_file = ckpt / OPTIMIZER_FILE
    if saved.get("zero_stage") is None and opt_file.exists() and isinstance(optimizer, torch.optim.Optimizer):
        try:
            optimizer.load_state_dict(torch_load_safe(opt_file))
            restored.append("optimizer state")
        except (ValueError, KeyError):
            pass
    return restored


def load_portable_scheduler(ckpt: Path, scheduler) -> list[str]:
    f = ckpt / SCHEDULER_FILE
    if f.exists() and _plain_scheduler(scheduler):
        scheduler.load_state_dict(read_json(f))
        return ["learning-rate schedule"]
    return []
