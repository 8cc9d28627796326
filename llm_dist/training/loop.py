"""The training loop: one readable loop for every task.

config → accelerator → task (tokenizer, data, model) → optimizer/schedule → prepare → resume →
    for each step: pull grad_accum micro-batches, count loss units (masked tokens / examples) across
    ranks, backward each micro-batch's summed loss / global count, clip, step, log, eval, checkpoint
→ final/ export.

The loop knows nothing of MLM or classification: a task turns a batch into a summed loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DummyScheduler, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig, save_config, to_dict, write_text_atomic
from ..tracking.meters import MetricsWriter, Throughput, memory_stats, peak_memory_per_rank, peak_tflops
from .checkpoint import Checkpointer, load_data_state, load_portable, load_portable_scheduler, load_trainer_state
from .ds_config import check_precision, load_ds_config, resolve_device_autos
from .memory import configure_malloc
from .optim import build_optimizer, build_scheduler, warmup_steps
from .preflight import prepare_output_dir, preflight
from .nonfinite import NonFinite, NonFiniteGuard, nonfinite_checked, params_finite, total_grad_norm
from .nonfinite import report as nonfinite_report
from .signals import Interrupted, StopSignal


def build_accelerator(cfg: RunConfig) -> Accelerator:
    out = Path(cfg.output_dir)
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU ranks talk over gloo (DeepSpeed through accelerate needs this said explicitly)
        from datetime import timedelta

        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    ds_plugin = None
    if cfg.deepspeed.config:
        ds_dict = load_ds_config(cfg.deepspeed.config, cuda=torch.cuda.is_available())
        ds_plugin = DeepSpeedPlugin(hf_ds_config=ds_dict, gradient_accumulation_steps=cfg.grad_accum,
                                    gradient_clipping=cfg.optim.max_grad_norm)
    log_with = None if cfg.tracking.report_to == "none" else cfg.tracking.report_to
    if log_with == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))
    precision = None if cfg.mixed_precision == "auto" else cfg.mixed_precision  # None: accelerate reads the launcher's
    acc = Accelerator(mixed_precision=precision, log_with=log_with, project_config=project,
                       kwargs_handlers=handlers, deepspeed_plugin=ds_plugin,
                       gradient_accumulation_steps=cfg.grad_accum if ds_plugin else 1)
    if acc.state.deepspeed_plugin is not None:
        check_precision(str(acc.mixed_precision), True, torch.cuda.is_available())
        # our loop feeds micro-batches itself (no prepared train dataloader), so fill the batch "auto"s here
        dsc = resolve_device_autos(acc.state.deepspeed_plugin.deepspeed_config, torch.cuda.is_available())
        dsc["train_micro_batch_size_per_gpu"] = cfg.batch_size
        dsc["gradient_accumulation_steps"] = cfg.grad_accum
        dsc["train_batch_size"] = cfg.batch_size * cfg.grad_accum * acc.num_processes
        if dsc.get("gradient_clipping") == "auto":
            dsc["gradient_clipping"] = cfg.optim.max_grad_norm
        params = dsc.get("optimizer", {}).get("params", {})
        for key, value in (("betas", list(cfg.optim.betas)), ("eps", cfg.optim.eps)):
            if params.get(key) == "auto":  # accelerate fills lr / weight_decay from DummyOptim, not these
                params[key] = value
    elif cfg.deepspeed.config:
        raise ConfigError(f"config key 'deepspeed.config': {cfg.deepspeed.config} is set but accelerate runs without "
                          "DeepSpeed (ACCELERATE_USE_CPU=1 turns it off: unset it; on CPU gloo is used anyway)")
    return acc


def make_task(cfg: RunConfig, accelerator, checked=None):
    if cfg.task == "mlm":
        from ..tasks.mlm import MLMTask

        return MLMTask(cfg, accelerator)
    from ..tasks.classify import ClassifyTask

    return ClassifyTask(cfg, accelerator, splits=checked.splits if checked is not None else None)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(model, task, micro_batches: list[dict], accelerator, world_size: int, extra_flag: float = 0.0):
    """Forward/backward of one optimizer step over `micro_batches` (this rank's share).

    The loss of the step is sum(per-unit losses over all micro-batches and ranks) / (their count), so
    2 ranks × accum 1 computes the same gradient as 1 rank × accum 2 over the same examples. DDP averages
    gradients over ranks, hence the × world_size. Returns (global count, global tokens, flag sum,
    local summed loss, local metric sums)."""
    local = torch.tensor([sum(task.count(b) for b in micro_batches), sum(task.tokens(b) for b in micro_batches),
                          extra_flag], dtype=torch.float64, device=accelerator.device)
    glob = accelerator.reduce(local, reduction="sum") if world_size > 1 else local
    n_global = max(glob[0].item(), 1.0)
    loss_total, sums = 0.0, {}
    is_ds = accelerator.distributed_type.value == "DEEPSPEED"
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or is_ds) else accelerator.no_sync(model)
        if is_ds:  # the engine steps (clip, optimizer, zero grad) at the accumulation boundary only
            accelerator.gradient_state._set_sync_gradients(last)
        with sync, accelerator.autocast():
            loss_sum, metrics = task.loss(model, mb)
            scale = world_size / n_global
            if is_ds:  # the DeepSpeed engine divides by its gradient-accumulation steps itself
                scale *= len(micro_batches)
            accelerator.backward(loss_sum * scale)
        loss_total += loss_sum.detach().float().item()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return glob[0].item(), glob[1].item(), glob[2].item(), loss_total, sums


def run(cfg: RunConfig, stop: StopSignal | None = None) -> dict:
    """One run. `stop` is the CLI's signal handler, installed before the config was read (a new one
    otherwise); start-up is an immediate phase: a signal raises `Interrupted` out of here."""
    own = stop is None
    stop = StopSignal() if own else stop
    stop.enter("start-up", immediate=True)
    out = Path(cfg.output_dir)
    accelerator = build_accelerator(cfg)
    acc, main = accelerator, accelerator.is_main_process
    malloc_release = configure_malloc(cfg.malloc_release, _zero_stage(acc))  # before the model and data allocate
    world = acc.num_processes
    checked = preflight(cfg, world)  # every cheap check, on every rank; nothing written yet
    acc.wait_for_everyone()
    prepare_output_dir(cfg, checked, main)  # --overwrite=true removes the old records; creates output_dir
    acc.wait_for_everyone()
    set_seed(cfg.seed)

    task = make_task(cfg, acc, checked)
    if main:  # once the task (data, tokenizer, model) is built
        save_config(cfg, out / "config.yaml")
    model = task.model.to(acc.device)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 builds partitioned params
    params = {"total_params": sum(numel(p) for p in model.parameters()),
              "trainable_params": sum(numel(p) for p in model.parameters() if p.requires_grad)}
    if params["trainable_params"] < params["total_params"]:
        params["trainable_names"] = trainable
    total_steps = task.total_steps()
    ds_config = acc.state.deepspeed_plugin.deepspeed_config if _is_ds(acc) else {}
    optimizer = build_optimizer(model, cfg.optim, ds_config)

    state = {"step": 0, "tokens_seen": 0, "samples_seen": 0, "world_size": world, "zero_stage": _zero_stage(acc)}
    resume_from = checked.resume_from  # resolved and verified by preflight
    saved = load_trainer_state(resume_from) if resume_from is not None else None
    portable = saved is not None and (saved.get("world_size") != world or saved.get("zero_stage") != state["zero_stage"])
    if portable:  # another world size or ZeRO layout: consolidated weights, before the parallel set-up
        restored = load_portable(resume_from, saved, model, optimizer)

    if ds_config.get("scheduler"):  # DeepSpeed's own scheduler, stepped by the engine
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps,
                                   warmup_num_steps=warmup_steps(cfg.optim, total_steps))
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    else:  # built on the prepared optimizer, so it also drives an optimizer that DeepSpeed created
        model, optimizer = acc.prepare(model, optimizer)
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps)  # saved by the Checkpointer (JSON)
    if main and _is_ds(acc):  # every "auto" resolved: ours by device, accelerate's from the model at prepare
        write_text_atomic(out / "ds_config.json", json.dumps(acc.state.deepspeed_plugin.deepspeed_config, indent=1))
    ckpt = Checkpointer(out / "checkpoints", acc, keep=cfg.keep_checkpoints, model=model, optimizer=optimizer,
                        scheduler=scheduler, lineage=(saved or {}).get("lineage"))
    if portable:
        restored += load_portable_scheduler(resume_from, scheduler)
        if main:
            print(f"warning: {resume_from} was saved with world size {saved.get('world_size')} / ZeRO stage "
                  f"{saved.get('zero_stage')}; restored {', '.join(restored)} for world size {world} / ZeRO "
                  f"stage {state['zero_stage']} (see README: resuming elsewhere)", file=sys.stderr)

    if saved is not None:
        state.update({k: saved[k] for k in ("step", "tokens_seen", "samples_seen") if k in saved})
        if hasattr(task, "load_resume_state"):
            task.load_resume_state(saved)  # task-level position that does not depend on the world size
        if not portable:
            data_state = load_data_state(resume_from, acc.process_index)
            if data_state is not None:
                task.load_data_state(data_state)  # (re)creates the data iterator, which draws from the RNG…
            ckpt.load(resume_from)  # …so the RNG states are restored after it
        if main:
            print(f"resumed from {resume_from} at step {state['step']}")

    if cfg.tracking.report_to != "none":
        init_kwargs = {"wandb": {"dir": str(out), "name": cfg.tracking.run_name or out.name}}
        acc.init_trackers(cfg.tracking.project, config=_flat(to_dict(cfg)), init_kwargs=init_kwargs)
    writer = MetricsWriter(out / "metrics.jsonl", main, state["step"] if resume_from else None)
    meter = Throughput(task.flops_per_token(), peak_tflops(cfg.tracking.peak_tflops), world)
    bar = tqdm(total=total_steps if total_steps < 10**9 else None, initial=state["step"], disable=not main or not cfg.tracking.progress,
               desc=cfg.task, dynamic_ncols=True)

    def log(row: dict):
        row = {"step": state["step"], **row}
        writer.write(row)
        if cfg.tracking.report_to != "none":
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state["step"])

    model.train()
    stop.enter("training")  # from here a signal is read at the next step boundary (every rank agrees)
    window = {"loss": 0.0, "count": 0.0, "sums": {}}
    signalled, diverged = False, None
    best = None
    guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite_skips, nonfinite_checked(acc))
    t_start = time.time()

    def save_checkpoint():
        if not params_finite(model, acc):  # never write non-finite weights over good checkpoints
            raise NonFinite("non-finite weights at save time")
        ckpt.save(state["step"], _trainer_state(state, task, best), task.data_state())

    def evaluate(phase: str):
        """task.evaluate, leaving early on every rank when any rank is signalled (signals.poll)."""
        nonlocal signalled
        stop.enter(phase)
        try:
            return task.evaluate(model, state["step"])
        except Interrupted:
            signalled = True
            return None
        finally:
            stop.enter("training")

    while state["step"] < total_steps:
        micro = []
        for _ in range(cfg.grad_accum):
            try:
                micro.append(_to_device(task.next_batch(), acc.device))
            except StopIteration:
                break
        if not micro:  # a finite data source ran out
            break
        n, tokens, flag, loss_local, sums = train_step(model, task, micro, acc, world, float(stop.flag))
        if _is_ds(acc):  # the engine clipped (gradient_clipping) and stepped in backward()
            grad_norm = model.get_global_grad_norm()
        elif cfg.optim.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        else:
            grad_norm = total_grad_norm(model) if guard.active else None
        # The gradients are already reduced over ranks, so their norm — and this decision — is the same on
        # every rank: no extra collective. (DeepSpeed has stepped already: skipping is impossible there.)
        action = guard.check(loss_local, grad_norm, acc, can_skip=not _is_ds(acc))
        if action == "stop":
            diverged = nonfinite_report(task, micro, acc, state["step"] + 1, loss_local, grad_norm, "stopped", guard)
            optimizer.zero_grad(set_to_none=True)
            break
        if action == "skip":
            nonfinite_report(task, micro, acc, state["step"] + 1, loss_local, grad_norm, "skipped the optimizer step",
                             guard)
        else:
            optimizer.step()
            if hasattr(task, "after_optimizer_step"):
                task.after_optimizer_step(acc.unwrap_model(model), state["step"])
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens_seen"] += int(tokens)
        state["samples_seen"] += int(sum(b["input_ids"].shape[0] for b in micro)) * world
        meter.add(int(tokens), sum(b["input_ids"].shape[0] for b in micro) * world)
        window["loss"] += loss_local
        window["count"] += n / world  # local share; the log step reduces exactly below
        for k, v in sums.items():
            window["sums"][k] = window["sums"].get(k, 0.0) + v
        bar.update(1)

        if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
            window["sums"]["batch_fingerprint"] = float(sum(_fingerprint(b) for b in micro))
            keys = sorted(window["sums"])
            vec = torch.tensor([window["loss"], *[window["sums"][k] for k in keys]], dtype=torch.float64,
                               device=acc.device)
            vec = acc.reduce(vec, reduction="sum") if world > 1 else vec
            count = window["count"] * world
            row = {"loss": vec[0].item() / max(count, 1.0), "lr": _current_lr(model, scheduler),
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   **meter.read(), "tokens_seen": state["tokens_seen"], "samples_seen": state["samples_seen"],
                   **task.log_row({k: vec[i + 1].item() for i, k in enumerate(keys)}, count), **memory_stats()}
            row["peak_rss_gb"] = peak_memory_per_rank(acc)["peak_rss_gb"]  # max over ranks (rss_gb: rank 0 now)
            row["batch_fingerprint"] = int(vec[1 + keys.index("batch_fingerprint")].item())
            scale = _loss_scale(model, acc)
            if scale is not None:
                row["loss_scale"] = scale
            if guard.skipped:
                row["nonfinite_skips"] = guard.skipped
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            window = {"loss": 0.0, "count": 0.0, "sums": {}}

        done = state["step"] >= total_steps or (cfg.max_tokens and state["tokens_seen"] >= cfg.max_tokens)
        if flag > 0:
            signalled = True
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and not done and not signalled:
            metrics = evaluate("evaluation")
            if metrics is not None:
                log(metrics)
                best, stop_early = _track_best(task, model, metrics, best, state)
                if stop_early:
                    done = True
        if signalled or (cfg.save_every and state["step"] % cfg.save_every == 0 and not done):
            save_checkpoint()
        if signalled:
            if main:
                print(f"checkpoint saved on signal at step {state['step']}", flush=True)
            break
        if done:
            break
    bar.close()

    result = {"final_step": state["step"], "world_size": world, "num_machines": _num_machines(world),
              "distributed_type": acc.distributed_type.value, "zero_stage": state["zero_stage"],
              "mixed_precision": str(acc.mixed_precision),
              "tokens_seen": state["tokens_seen"], "signalled": signalled,
              "train_seconds": time.time() - t_start, "malloc_release": malloc_release, **params}
    if diverged is not None:  # nothing saved or exported from non-finite weights; the last good checkpoint stays
        result["diverged"] = diverged
        last = ckpt.complete()
        diverged["last_good_checkpoint"] = str(last[-1]) if last else None
        log({"event": "diverged", **diverged})
    elif not signalled:
        metrics = evaluate("final evaluation")
        if metrics is None:  # signalled during the final evaluation: keep the finished step, end here
            save_checkpoint()
            if main:
                print(f"checkpoint saved on signal at step {state['step']}", flush=True)
        else:
            log(metrics)
            best, _ = _track_best(task, model, metrics, best, state)
            result["eval"] = metrics
            if cfg.save_every:
                save_checkpoint()
            if best is not None and getattr(task, "best_state", None) is not None and not _is_ds(acc):
                acc.unwrap_model(model).load_state_dict(task.best_state)  # test and export the best model
                result["best"] = best
            stop.enter("export")
            if not params_finite(model, acc):
                raise NonFinite("non-finite weights at export")
            export_final(task, model, acc, out / "final", best)
            if hasattr(task, "final_report"):
                stop.enter("final report")
                try:
                    report = task.final_report(model, out)
                except Interrupted:
                    report, signalled = None, True
                if report:
                    log(report.pop("_log_row"))
                    result.update(report)
        result["signalled"] = signalled
    if own:
        stop.restore()
    result["param_checksums"] = _param_checksums(model, acc)
    result["memory"] = peak_memory_per_rank(acc)  # each rank's peak over the whole run, export included
    if main:
        tmp = out / "run.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=float))
        os.replace(tmp, out / "run.json")
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _param_checksums(model, acc) -> list[float]:
    """Each rank's sum of |parameters|: equal values mean the replicas stayed in sync."""
    if _is_ds(acc):
        return []
    local = torch.tensor([sum(p.detach().double().abs().sum().item() for p in model.parameters())],
                         dtype=torch.float64, device=acc.device)
    return [float(x) for x in acc.gather(local).cpu()]


def _fingerprint(batch: dict) -> int:
    """A checksum of the step's inputs (summed over ranks when logged): equal rows mean equal batches."""
    import zlib

    return zlib.crc32(batch["input_ids"].cpu().numpy().tobytes()) % 1_000_003


def _current_lr(model, scheduler) -> float:
    if hasattr(model, "get_lr"):  # a DeepSpeed engine
        return float(model.get_lr()[0])
    return float(scheduler.get_last_lr()[0])


def _loss_scale(model, acc) -> float | None:
    """The dynamic fp16 loss scale (DeepSpeed's or accelerate's GradScaler), when one is in use."""
    if _is_ds(acc):
        opt = getattr(model, "optimizer", None)
        for name in ("cur_scale", "loss_scale"):
            value = getattr(opt, name, None)
            if isinstance(value, (int, float)) and str(acc.mixed_precision) == "fp16":
                return float(value)
        return None
    scaler = getattr(acc, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else None


def _zero_stage(acc) -> int | None:
    if not _is_ds(acc):
        return None
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def _is_ds(acc) -> bool:
    return acc.distributed_type.value == "DEEPSPEED"


def _num_machines(world: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return max(1, world // max(local, 1))


def _trainer_state(state: dict, task, best) -> dict:
    extra = task.resume_state() if hasattr(task, "resume_state") else {}
    return {**state, **extra, "best": best}


def _track_best(task, model, metrics, best, state):
    """Classification keeps the best model by a metric (and may stop early); MLM has nothing to keep."""
    if not hasattr(task, "track_best"):
        return best, False
    return task.track_best(model, metrics, best, state)


def export_final(task, model, acc, final: Path, best) -> None:
    """Every rank gathers the (possibly sharded) state dict; the main process writes `final/` atomically."""
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        import shutil

        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        task.save_final(acc.unwrap_model(model), state_dict, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    acc.wait_for_everyone()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out
