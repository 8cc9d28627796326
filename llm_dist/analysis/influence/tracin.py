"""TracIn-CP (Pruthi et al. 2020) over a classification run's saved checkpoints.

    influence(train z, test z') = Σ_c η_c · ⟨g_c(z), g_c(z')⟩          (raw)
                                 = Σ_c η_c · cos(g_c(z), g_c(z'))       (cosine, the default)

g_c: the per-example gradient of the cross-entropy of the example's label at checkpoint c, over the chosen
parameters (grads.select_params), projected to d dimensions (grads.Projector); with `adam`, the training
gradient is first preconditioned with checkpoint c's Adam moments (LESS). η_c: the mean learning rate of the
steps checkpoint c closes (from metrics.jsonl; scheduler.json's rate when no logged step falls in it), or 1
(`lr_weights="uniform"`). Self-influence: Σ_c η_c ⟨g_c(z), g_c(z)⟩ on the unprojected gradient (exact; the
cosine of a vector with itself would be 1 for every example).

The gradients of every split are computed once per checkpoint and cached under
RUN_DIR/influence/cache/<key>/step_N/ as memory-mapped arrays: unit vectors in fp16 ([N, d]) and norms,
self-products and logits in fp32 — unit vectors so that fp16 keeps the same relative precision for tiny and
large gradients. The key hashes everything the numbers depend on (parameters, d, seed, projection, Adam,
the split's ids and labels, the checkpoint's weights). With WORLD_SIZE > 1 (torchrun / accelerate launch)
each rank computes a contiguous share of every split's rows into the same files; rank 0 scores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from ...config import ConfigError, RunConfig, load_config, write_text_atomic
from ...training.checkpoint import (MODEL_FILE, MODEL_TAG, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_FILE, _load_model,
                                    _step_dirs, check_loadable, read_json, torch_load_safe, verify)
from .grads import AdamPreconditioner, PerExampleGrads, Projector, collate


class InfluenceError(Exception):
    """Bad input (no run dir, no checkpoints, bad test file …): one line, exit 2."""


NEEDS = ("influence (TracIn-CP) needs the run's saved checkpoints: train with --save_every=N (steps, or 'epoch') "
         "and --keep_checkpoints=K so that the K checkpoints kept are spread over training (e.g. save_every = "
         "total steps / K, K = 3–5)")


# ----------------------------------------------------------------------------- ranks
def dist_info() -> tuple[int, int]:
    """(rank, world size); joins a gloo process group when launched on several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), world
    return 0, 1


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous rows [lo, hi) of n."""
    return n * rank // world, n * (rank + 1) // world


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    run_dir: Path
    cfg: RunConfig
    checkpoints: list[Path]
    splits: dict            # datasets: id, text, label
    data: dict              # tokenized: input_ids, token_type_ids, labels, ids, lengths
    names: list[str]        # label names (index = label id)
    label2id: dict
    tokenizer: object
    model: torch.nn.Module
    zero_stage: int | None
    peft: bool


def open_run(run_dir, need_checkpoints: bool = True) -> Run:
    from ...data.classify import label_maps, load_splits, tokenize_split
    from ...data.sources import DataError
    from ...models.build import ModelError, load_tokenizer, tokenizer_source
    from ...tasks.classify.model import build_classifier

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InfluenceError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.yaml").exists():
        raise InfluenceError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        cfg = load_config(run_dir / "config.yaml", [])
    except ConfigError as e:
        raise InfluenceError(f"{run_dir / 'config.yaml'}: {str(e).splitlines()[0]}") from None
    if cfg.task != "classify":
        raise InfluenceError(f"{run_dir}: task '{cfg.task}': influence scores classification runs only")
    root = run_dir / "checkpoints"
    all_ckpts = _step_dirs(root)
    ckpts = []
    for c in all_ckpts:
        problem = verify(c)
        if problem is None:
            ckpts.append(c)
        else:
            print(f"warning: skipping checkpoint {c}: {problem}", file=sys.stderr)
    if need_checkpoints and not ckpts:
        what = "no checkpoints" if not all_ckpts else "no intact checkpoint"
        raise InfluenceError(f"{run_dir}: {what} in {root}; {NEEDS} (this run had save_every={cfg.save_every}, "
                             f"keep_checkpoints={cfg.keep_checkpoints})")
    for c in ckpts:
        try:
            check_loadable(c)
        except ConfigError as e:
            raise InfluenceError(str(e).replace("config key 'resume': ", "")) from None
    datasets.disable_progress_bars()
    try:
        splits = load_splits(cfg, pinned=run_dir / "splits")
        label2id, id2label = label_maps(splits["train"])
        path, _ = tokenizer_source(cfg)
        tok = load_tokenizer(path or str(run_dir / "tokenizer"))
    except (DataError, ModelError, ConfigError) as e:
        raise InfluenceError(f"{run_dir}: {str(e).splitlines()[0]}") from None
    names = [id2label[i] for i in range(len(id2label))]
    data = {s: tokenize_split(ds, tok, label2id, cfg.data.max_length) for s, ds in splits.items()}
    state = read_json(ckpts[-1] / TRAINER_FILE) if ckpts else {}
    zero = state.get("zero_stage") if isinstance(state, dict) else None
    mcfg = dataclasses.replace(cfg.model, attn_implementation="eager")  # vmap-friendly; the same maths
    bcfg = dataclasses.replace(cfg, model=mcfg)
    total = _final_step(run_dir, ckpts)
    try:
        model = build_classifier(bcfg, tok, id2label, lambda: total)
    except ModelError as e:
        raise InfluenceError(f"{run_dir}: {str(e).splitlines()[0]}") from None
    return Run(run_dir, cfg, ckpts, splits, data, names, label2id, tok, model, zero, bool(cfg.classify.peft.method))


def _final_step(run_dir: Path, ckpts: list[Path]) -> int:
    try:
        return int(json.loads((run_dir / "run.json").read_text())["final_step"])
    except (OSError, ValueError, KeyError):
        return int(ckpts[-1].name[5:]) if ckpts else 1


def load_weights(run: Run, ckpt: Path) -> None:
    """The checkpoint's full weights into run.model: model.safetensors, or (ZeRO) the fp32 weights
    consolidated from the shards with DeepSpeed's zero_to_fp32."""
    if run.zero_stage is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=MODEL_TAG)
        missing, unexpected = run.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise InfluenceError(f"{ckpt}: consolidated ZeRO weights do not fit the model (missing "
                                 f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    else:
        try:
            _load_model(run.model, ckpt / MODEL_FILE, "cpu", strict=True)
        except ConfigError as e:
            raise InfluenceError(str(e)) from None
    run.model.eval()


def checkpoint_weights(run: Run, mode: str = "lr") -> list[float]:
    """η_c per checkpoint: the mean learning rate of the steps (previous checkpoint, c], from the run's
    schedule recomputed from its config (optim.* and the total steps in run.json; for DeepSpeed-owned
    schedules an approximation); without run.json, the mean logged rate (metrics.jsonl) over those steps,
    else the rate scheduler.json holds at c, else 1. `uniform`: 1 for every checkpoint."""
    if mode == "uniform":
        return [1.0] * len(run.checkpoints)
    steps = [int(c.name[5:]) for c in run.checkpoints]
    sched = _schedule(run)
    logged = _logged_lrs(run.run_dir)
    out, prev = [], 0
    for c, step in zip(run.checkpoints, steps):
        if sched is not None and step <= len(sched):
            out.append(float(np.mean(sched[prev:step])) if step > prev else float(sched[step - 1]))
        elif [lr for s, lr in logged if prev < s <= step]:
            out.append(float(np.mean([lr for s, lr in logged if prev < s <= step])))
        elif (c / SCHEDULER_FILE).exists():
            last = read_json(c / SCHEDULER_FILE).get("_last_lr") or [1.0]
            out.append(float(last[0]))
        else:
            print(f"warning: {c}: no learning rate logged or saved for it; weighting it 1", file=sys.stderr)
            out.append(1.0)
        prev = step
    if not any(w > 0 for w in out):
        out = [1.0] * len(out)
    return out


def _schedule(run: Run) -> np.ndarray | None:
    """The learning rate of every step 1..total of a finished run, replayed from its config."""
    from ...training.optim import build_scheduler

    try:
        rec = json.loads((run.run_dir / "run.json").read_text())
        total = int(rec["final_step"])
    except (OSError, ValueError, KeyError):
        return None
    if rec.get("signalled") or total <= 0 or total > 10_000_000:
        return None
    if run.cfg.max_steps > 0:
        total = max(total, run.cfg.max_steps)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=run.cfg.optim.lr)
    sch = build_scheduler(opt, run.cfg.optim, total)
    lrs = np.empty(total)
    for i in range(total):
        lrs[i] = opt.param_groups[0]["lr"]
        opt.step()
        sch.step()
    return lrs


def _logged_lrs(run_dir: Path) -> list[tuple[int, float]]:
    out = []
    f = run_dir / "metrics.jsonl"
    if f.exists():
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "lr" in row and "step" in row and "loss" in row:
                out.append((int(row["step"]), float(row["lr"])))
    return out


# ----------------------------------------------------------------------------- gradient caches
@dataclasses.dataclass
class Grads:
    """One split's gradients at one checkpoint (memory-mapped)."""
    units: np.ndarray    # [N, d] fp16 (or fp32: `dtype`), unit vectors of the projected (preconditioned, for train with adam) gradient
    norms: np.ndarray    # [N] fp32, their norms
    self_: np.ndarray    # [N] fp32, ⟨Γ(g), g⟩ or ‖g‖² on the unprojected gradient
    logits: np.ndarray   # [N, C] fp32


FILES = ("units", "norms", "self", "logits")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_digest(split: dict) -> str:
    return _digest([split["ids"], split["labels"], [len(x) for x in split["input_ids"]],
                    hashlib.sha256(np.concatenate([np.asarray(x, dtype=np.int64) for x in split["input_ids"]]
                                                  or [np.zeros(0, np.int64)]).tobytes()).hexdigest()])


def _model_digest(ckpt: Path) -> str:
    try:
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        return _digest({k: v["sha256"] for k, v in files.items() if not k.startswith(("rng_", "data_state"))})
    except (OSError, ValueError, KeyError):
        return ckpt.name


def compute_grads(run: Run, ckpt: Path, split: dict, name: str, names: list[str], proj: Projector,
                  adam: bool, cache_root: Path, rank: int = 0, world: int = 1, batch_size: int = 16,
                  progress: bool = False, device: str = "cpu", dtype: str = "float16") -> tuple[Grads, dict]:
    """The split's gradients at `ckpt`, from the cache or computed (this rank's share) and cached."""
    n, c = len(split["ids"]), len(run.names)
    key = _digest({"params": names, "proj": proj.spec(), "adam": adam, "split": split_digest(split),
                   "model": _model_digest(ckpt), "dtype": dtype, "version": 1})
    d = cache_root / ckpt.name / f"{name}-{key}"
    done = d / "complete.json"
    stats = {"cached": True, "seconds": 0.0, "examples": n}
    shapes = {"units": ((n, proj.out_dim), np.dtype(dtype)), "norms": ((n,), np.float32), "self": ((n,), np.float32),
              "logits": ((n, c), np.float32)}
    if not done.exists():
        stats["cached"] = False
        t0 = time.time()
        if rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            for f, (shape, dt) in shapes.items():
                np.lib.format.open_memmap(d / f"{f}.npy", mode="w+", dtype=dt, shape=shape).flush()
        barrier(world)
        arrs = {f: np.load(d / f"{f}.npy", mmap_mode="r+") for f in shapes}
        lo, hi = share(n, rank, world)
        _fill(run, ckpt, split, names, proj, adam, arrs, lo, hi, batch_size, progress and rank == 0, device,
              f"{name} @ {ckpt.name}")
        for a in arrs.values():
            a.flush()
        del arrs
        barrier(world)
        if rank == 0:
            write_text_atomic(done, json.dumps({"examples": n, "dim": proj.out_dim, "ranks": world,
                                                "seconds": time.time() - t0}))
        barrier(world)
        stats["seconds"] = time.time() - t0
    g = Grads(*(np.load(d / f"{f}.npy", mmap_mode="r") for f in FILES))
    return g, stats


def _fill(run, ckpt, split, names, proj, adam, arrs, lo, hi, batch_size, progress, device, what) -> None:
    from tqdm.auto import tqdm

    load_weights(run, ckpt)
    run.model.to(device)
    pre = None
    if adam:
        pre = adam_for(run, ckpt, names)
    peg = PerExampleGrads(run.model, names, device)
    order = sorted(range(lo, hi), key=lambda i: split["lengths"][i])  # similar lengths batched: less padding
    bar = tqdm(total=hi - lo, desc=f"gradients {what}", disable=not progress, unit="ex")
    pad = run.tokenizer.pad_token_id or 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        g, logits = peg(collate(split, idx, pad))
        if pre is not None:
            pg = pre.to(g.device)(g)
            selfp = (pg * g).sum(1)
            g = pg
        else:
            selfp = (g * g).sum(1)
        p = proj(g)
        norm = p.norm(dim=1)
        unit = p / norm.clamp_min(1e-30)[:, None]
        ix = np.asarray(idx)
        arrs["units"][ix] = unit.cpu().numpy().astype(arrs["units"].dtype)
        arrs["norms"][ix] = norm.cpu().numpy()
        arrs["self"][ix] = selfp.cpu().numpy()
        arrs["logits"][ix] = logits.float().cpu().numpy()
        bar.update(len(idx))
    bar.close()


class _AdamOn:
    def __init__(self, pre: AdamPreconditioner):
        self.pre = pre

    def to(self, device):
        p = self.pre
        if p.m.device != torch.device(device):
            p.m, p.v = p.m.to(device), p.v.to(device)
        return p


def adam_for(run: Run, ckpt: Path, names: list[str]):
    f = ckpt / OPTIMIZER_FILE
    if run.zero_stage is not None or not f.exists():
        raise InfluenceError(f"{ckpt}: --adam needs the torch optimizer state ({OPTIMIZER_FILE}); "
                             + ("ZeRO checkpoints shard it in DeepSpeed's format" if run.zero_stage is not None
                                else "this checkpoint has none"))
    try:
        return _AdamOn(AdamPreconditioner(torch_load_safe(f), run.model, names, run.cfg.optim.weight_decay, str(f)))
    except (ValueError, KeyError) as e:
        raise InfluenceError(str(e).splitlines()[0]) from None


# ----------------------------------------------------------------------------- scoring
def score_block(test: list[Grads], train: list[Grads], weights: list[float], cosine: bool,
                rows: slice, cols: slice) -> np.ndarray:
    """Σ_c η_c · (cosine or raw) scores of test rows × train cols, float32."""
    out = None
    for t, g, w in zip(test, train, weights):
        if w == 0:
            continue
        a = torch.from_numpy(np.asarray(t.units[rows], dtype=np.float32))
        b = torch.from_numpy(np.asarray(g.units[cols], dtype=np.float32))
        s = a @ b.T
        if not cosine:
            s = s * torch.from_numpy(np.asarray(t.norms[rows]))[:, None] * torch.from_numpy(np.asarray(g.norms[cols]))[None, :]
        s = s * float(w)
        out = s if out is None else out + s
    if out is None:
        out = torch.zeros((rows.stop - rows.start, cols.stop - cols.start))
    return out.numpy()


def top_k(test: list[Grads], train: list[Grads], weights: list[float], cosine: bool, k: int,
          test_block: int = 256, train_block: int = 16384, progress: bool = False):
    """(proponent scores, indices, opponent scores, indices), each [M, k']: the k highest and k lowest
    scores of each test row over all training rows, in blocks (bounded memory for any N)."""
    from tqdm.auto import tqdm

    m, n = len(test[0].norms), len(train[0].norms)
    k = min(k, n)
    hi_v = np.zeros((m, k), np.float32)
    hi_i = np.zeros((m, k), np.int64)
    lo_v = np.zeros((m, k), np.float32)
    lo_i = np.zeros((m, k), np.int64)
    bar = tqdm(total=m, desc="scoring", unit="test ex", disable=not progress)
    for r0 in range(0, m, test_block):
        rows = slice(r0, min(m, r0 + test_block))
        bv = bi = sv = si = None
        for c0 in range(0, n, train_block):
            cols = slice(c0, min(n, c0 + train_block))
            s = torch.from_numpy(score_block(test, train, weights, cosine, rows, cols))
            kk = min(k, s.shape[1])
            v1, i1 = s.topk(kk, dim=1)
            v2, i2 = (-s).topk(kk, dim=1)
            i1, i2 = i1 + c0, i2 + c0
            if bv is None:
                bv, bi, sv, si = v1, i1, -v2, i2
            else:
                v, i = torch.cat([bv, v1], 1), torch.cat([bi, i1], 1)
                top = v.topk(k, dim=1)
                bv, bi = top.values, i.gather(1, top.indices)
                v, i = torch.cat([sv, -v2], 1), torch.cat([si, i2], 1)
                bot = (-v).topk(k, dim=1)
                sv, si = -bot.values, i.gather(1, bot.indices)
        hi_v[rows], hi_i[rows], lo_v[rows], lo_i[rows] = bv.numpy(), bi.numpy(), sv.numpy(), si.numpy()
        bar.update(rows.stop - rows.start)
    bar.close()
    return hi_v, hi_i, lo_v, lo_i


def self_influence(train: list[Grads], weights: list[float]) -> np.ndarray:
    return sum(float(w) * np.asarray(g.self_, dtype=np.float64) for g, w in zip(train, weights))
