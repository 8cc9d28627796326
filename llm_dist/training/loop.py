"""The training loop: one readable loop for every task.

config → start-up checks → accelerator → task (tokenizer, data, model) → optimizer/schedule → prepare
→ resume → for each step: pull grad_accum micro-batches, let the step strategy run forward/backward
(the loss of a step is its summed unit losses over all micro-batches and ranks / their global count),
guard against non-finite values, clip, step, log, evaluate, checkpoint → final/ export → report.

The loop knows no task and no feature: it asks the task (tasks/base.py) what a batch means and its
callbacks (training/callbacks.py: trackers, throughput, best model / early stopping, …) what to do.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import DummyScheduler, set_seed
from tqdm.auto import tqdm

from ..config import RunConfig, save_config, write_text_atomic
from ..tasks.base import make_task
from ..tracking.meters import MetricsWriter, ThroughputMeter, memory_stats, peak_memory_per_rank, peak_tflops
from ..tracking.trackers import Trackers
from .accelerator import build_accelerator, is_deepspeed, zero_stage
from .callbacks import BestModel, Callback, Callbacks, Context, StepOutput
from .checkpoint import Checkpointer, load_data_state, load_portable, load_portable_scheduler, load_trainer_state
from .memory import configure_malloc
from .nonfinite import NonFinite, NonFiniteGuard, nonfinite_checked, params_finite, total_grad_norm
from .nonfinite import report as nonfinite_report
from .optim import build_optimizer, build_scheduler, warmup_steps
from .preflight import preflight, prepare_output_dir
from .signals import Interrupted, StopSignal
from .speed import CompiledModel, apply_model_speedups, enable_gradient_checkpointing
from .steps import host_counts, make_step, train_step  # noqa: F401 - train_step: the plain step as a function (scripts)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def default_callbacks(cfg: RunConfig, task, acc, out: Path, extra: list[Callback]) -> Callbacks:
    """Throughput, best model / early stopping, trackers and the dynamics ledger, then `extra` (one with the same name replaces
    a default: a bench passes its own "throughput")."""
    cbs = [ThroughputMeter(task.flops_per_token(), peak_tflops(cfg.tracking.peak_tflops), acc.num_processes),
           BestModel(task, acc, out)]
    if cfg.tracking.report_to != "none":
        cbs.append(Trackers())
    if cfg.dynamics.enabled:  # the per-example ledger (analysis/dynamics)
        from ..analysis.dynamics.ledger import DynamicsLedger

        cbs.append(DynamicsLedger(out, cfg.dynamics.pass_, cfg.dynamics.analyze))
    names = {c.name for c in extra}
    return Callbacks([c for c in cbs if c.name not in names] + list(extra))


def run(cfg: RunConfig, stop: StopSignal | None = None, callbacks: list[Callback] | None = None) -> dict:
    """One run. `stop` is the CLI's signal handler, installed before the config was read (a new one
    otherwise); start-up is an immediate phase: a signal raises `Interrupted` out of here."""
    own = stop is None
    stop = StopSignal() if own else stop
    stop.enter("start-up", immediate=True)
    out = Path(cfg.output_dir)
    acc = build_accelerator(cfg)
    main, world = acc.is_main_process, acc.num_processes
    malloc_release = configure_malloc(cfg.malloc_release, zero_stage(acc))  # before the model and data allocate
    checked = preflight(cfg, world)  # every cheap check, on every rank; nothing written yet
    acc.wait_for_everyone()
    prepare_output_dir(cfg, checked, main)  # --overwrite=true removes the old records; creates output_dir
    acc.wait_for_everyone()
    set_seed(cfg.seed)

    task = make_task(cfg, acc, checked)
    if main:  # once the task (data, tokenizer, model) is built
        save_config(cfg, out / "config.yaml")
    model = task.model.to(acc.device)
    speedups = apply_model_speedups(model, cfg, task)  # fast CPU dropout, [CLS]-only last layer (models/fast.py)
    if cfg.model.gradient_checkpointing:  # activations recomputed in backward (training/speed.py)
        enable_gradient_checkpointing(model)
    compiled = CompiledModel(model, cfg.compile_backend, main) if cfg.compile else None  # in place, before prepare
    guarded = compiled.call if compiled is not None else (lambda fn, *args: fn(*args))  # evaluation, report
    params = _param_counts(model)
    total_steps = task.total_steps()
    eval_every, save_every = _every(cfg.eval_every, task), _every(cfg.save_every, task)
    ds_config = acc.state.deepspeed_plugin.deepspeed_config if is_deepspeed(acc) else {}
    optimizer = build_optimizer(model, cfg.optim, ds_config)

    state = {"step": 0, "tokens_seen": 0, "samples_seen": 0, "world_size": world, "zero_stage": zero_stage(acc)}
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
    if main and is_deepspeed(acc):  # every "auto" resolved: ours by device, accelerate's from the model at prepare
        write_text_atomic(out / "ds_config.json", json.dumps(acc.state.deepspeed_plugin.deepspeed_config, indent=1))
    ckpt = Checkpointer(out / "checkpoints", acc, keep=cfg.keep_checkpoints, model=model, optimizer=optimizer,
                        scheduler=scheduler, lineage=(saved or {}).get("lineage"))
    cbs = default_callbacks(cfg, task, acc, out, callbacks or [])
    ctx = Context(cfg, acc, task, model, out, state)
    if portable:
        restored += load_portable_scheduler(resume_from, scheduler)
        if main:
            print(f"warning: {resume_from} was saved with world size {saved.get('world_size')} / ZeRO stage "
                  f"{saved.get('zero_stage')}; restored {', '.join(restored)} for world size {world} / ZeRO "
                  f"stage {state['zero_stage']} (see README: resuming elsewhere)", file=sys.stderr)
    if saved is not None:
        state.update({k: saved[k] for k in ("step", "tokens_seen", "samples_seen") if k in saved})
        task.load_resume_state(saved)  # task-level position that does not depend on the world size
        cbs.load_state_dict(saved.get("callbacks", {}))
        if not portable:
            data_state = load_data_state(resume_from, acc.process_index)
            if data_state is not None:
                task.load_data_state(data_state)  # (re)creates the data iterator, which draws from the RNG…
            ckpt.load(resume_from)  # …so the RNG states are restored after it
        if main:
            print(f"resumed from {resume_from} at step {state['step']}")

    writer = MetricsWriter(out / "metrics.jsonl", main, state["step"] if resume_from else None)
    bar = tqdm(total=total_steps if total_steps < 10**9 else None, initial=state["step"],
               disable=not main or not cfg.tracking.progress, desc=cfg.task, dynamic_ncols=True)

    def log(row: dict) -> dict:
        row = {"step": state["step"], **row}
        cbs.on_log(ctx, row)  # callbacks may add keys (throughput, …)
        writer.write(row)
        return row

    def save_checkpoint():
        if not params_finite(model, acc):  # never write non-finite weights over good checkpoints
            raise NonFinite("non-finite weights at save time")
        trainer_state = {**state, **task.resume_state(), "callbacks": cbs.state_dict()}
        ckpt.save(state["step"], trainer_state, task.data_state())
        cbs.on_save(ctx, state["step"])

    def evaluate(phase: str) -> dict | None:
        """task.evaluate, leaving early on every rank when any rank is signalled (signals.poll); None then."""
        stop.enter(phase)
        try:
            metrics = guarded(task.evaluate, model, state["step"])  # a compile error here: eager, evaluate again
        except Interrupted:
            return None
        finally:
            stop.enter("training")
        log(metrics)
        cbs.on_evaluate(ctx, metrics)
        return metrics

    step_fn = make_step(cfg)
    guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite_skips, nonfinite_checked(acc))
    window = _new_window()
    signalled, diverged = False, None
    cbs.on_train_start(ctx)
    model.train()
    stop.enter("training")  # from here a signal is read at the next step boundary (every rank agrees)
    t_start = time.time()
    step_seconds = 0.0  # training steps only (the throughput / MFU window): no eval, checkpoint or log work
    while state["step"] < total_steps:
        t_step = time.perf_counter()
        micro = []
        for _ in range(cfg.grad_accum):
            try:
                micro.append(task.next_batch())
            except StopIteration:
                break
        if not micro:  # a finite data source ran out
            break
        counts = host_counts(task, micro)  # read on the host, before the copies: no device sync per micro-batch
        micro = [_to_device(b, acc.device) for b in micro]
        if compiled is not None:  # a compile error inside the step: one warning, then the step again eagerly
            r = compiled.step(step_fn, optimizer, model, task, micro, acc, world, float(stop.flag), counts=counts)
        else:
            r = step_fn(model, task, micro, acc, world, float(stop.flag), counts=counts)
        if is_deepspeed(acc):  # the engine clipped (gradient_clipping) and stepped in backward()
            grad_norm = model.get_global_grad_norm()
        elif cfg.optim.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        else:
            grad_norm = total_grad_norm(model) if guard.active else None
        # The gradients are already reduced over ranks, so their norm — and this decision — is the same on
        # every rank: no extra collective. (DeepSpeed has stepped already: skipping is impossible there.)
        action = guard.check(r.loss_local, grad_norm, acc, can_skip=not is_deepspeed(acc))
        if action == "stop":
            diverged = nonfinite_report(task, micro, acc, state["step"] + 1, float(r.loss_local), grad_norm, "stopped",
                                        guard)
            optimizer.zero_grad(set_to_none=True)
            break
        if action == "skip":
            nonfinite_report(task, micro, acc, state["step"] + 1, float(r.loss_local), grad_norm,
                             "skipped the optimizer step", guard)
        else:
            optimizer.step()
            task.after_optimizer_step(acc.unwrap_model(model), state["step"])
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        samples = sum(b["input_ids"].shape[0] for b in micro) * world
        seconds = time.perf_counter() - t_step
        step_seconds += seconds
        state["step"] += 1
        state["tokens_seen"] += int(r.tokens_global)
        state["samples_seen"] += int(samples)
        # device scalars, added on the device: read once per log step (_train_row)
        window["loss"] = r.loss_local if window["loss"] is None else window["loss"] + r.loss_local
        window["count"] += r.n_global / world  # local share; the log step reduces exactly below
        for k, v in r.sums.items():
            window["sums"][k] = window["sums"][k] + v if k in window["sums"] else v
        cbs.on_step_end(ctx, StepOutput(state["step"], micro, r.outputs, grad_norm, action == "skip",
                                        tokens=r.tokens_global, samples=samples, seconds=seconds,
                                        flops=r.flops_global))
        bar.update(1)

        if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
            row = log(_train_row(window, micro, acc, model, scheduler, grad_norm, state, task, guard))
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}")
            window = _new_window()

        done = state["step"] >= total_steps or (cfg.max_tokens and state["tokens_seen"] >= cfg.max_tokens)
        signalled = r.flag > 0
        if eval_every and state["step"] % eval_every == 0 and not done and not signalled:
            signalled = evaluate("evaluation") is None
            done = done or ctx.should_stop  # early stopping
        if signalled or (save_every and state["step"] % save_every == 0 and not done):
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
              "mixed_precision": str(acc.mixed_precision), "tokens_seen": state["tokens_seen"],
              "signalled": signalled, "train_seconds": time.time() - t_start, "step_seconds": step_seconds,
              "malloc_release": malloc_release, **params}
    result["speedups"] = speedups
    if diverged is not None:  # nothing saved or exported from non-finite weights; the last good checkpoint stays
        result["diverged"] = diverged
        last = ckpt.complete()
        diverged["last_good_checkpoint"] = str(last[-1]) if last else None
        log({"event": "diverged", **diverged})
    elif not signalled:
        metrics = evaluate("final evaluation")
        if metrics is None:  # signalled during the final evaluation: keep the finished step, end here
            save_checkpoint()
            signalled = True
            if main:
                print(f"checkpoint saved on signal at step {state['step']}", flush=True)
        else:
            result["eval"] = metrics
            if save_every:
                save_checkpoint()
            cbs.before_export(ctx, result)  # the best model replaces the last one (BestModel)
            # before the export: saving a PEFT model merges the adapter into rank 0's live weights
            result["param_checksums"] = _param_checksums(model, acc)
            stop.enter("export")
            if not params_finite(model, acc):
                raise NonFinite("non-finite weights at export")
            export_final(task, model, acc, out / "final")
            stop.enter("final report")
            try:
                report = guarded(task.final_report, model, out)
            except Interrupted:
                report, signalled = None, True
            if report is not None:
                log(report.row)
                result.update(report.result)
        result["signalled"] = signalled
    if own:
        stop.restore()
    if compiled is not None:  # after the final evaluation and report, which may have fallen back
        result["compile"] = compiled.record()
    if "param_checksums" not in result:
        result["param_checksums"] = _param_checksums(model, acc)
    result["memory"] = peak_memory_per_rank(acc)  # each rank's peak over the whole run, export included
    cbs.on_train_end(ctx, result)
    if main:
        write_text_atomic(out / "run.json", json.dumps(result, indent=1, default=float))
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _new_window() -> dict:
    """A log window: the summed loss and metrics (float64 device scalars, None / {} until a step adds them)."""
    return {"loss": None, "count": 0.0, "sums": {}}


def _scalar(value, device) -> torch.Tensor:
    if value is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return value.to(device, torch.float64) if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64,
                                                                                     device=device)


def _train_row(window, micro, acc, model, scheduler, grad_norm, state, task, guard) -> dict:
    """The log step's training row: the window's loss and task metrics reduced exactly over ranks (the
    window's device scalars are stacked and read here, once per log step)."""
    world = acc.num_processes
    window["sums"]["batch_fingerprint"] = float(sum(_fingerprint(b) for b in micro))
    keys = sorted(window["sums"])
    vec = torch.stack([_scalar(window["loss"], acc.device), *[_scalar(window["sums"][k], acc.device) for k in keys]])
    vec = acc.reduce(vec, reduction="sum") if world > 1 else vec
    count = window["count"] * world
    values = vec.tolist()
    row = {"loss": values[0] / max(count, 1.0), "lr": _current_lr(model, scheduler),
           "grad_norm": float(grad_norm) if grad_norm is not None else None,
           "tokens_seen": state["tokens_seen"], "samples_seen": state["samples_seen"],
           **task.log_row({k: values[i + 1] for i, k in enumerate(keys)}, count), **memory_stats()}
    row["peak_rss_gb"] = peak_memory_per_rank(acc)["peak_rss_gb"]  # max over ranks (rss_gb: rank 0 now)
    row["batch_fingerprint"] = int(values[1 + keys.index("batch_fingerprint")])
    scale = _loss_scale(model, acc)
    if scale is not None:
        row["loss_scale"] = scale
    if guard.skipped:
        row["nonfinite_skips"] = guard.skipped
    return row


def _every(value, task) -> int:
    """`eval_every` / `save_every`: steps, or "epoch" (the task's steps per epoch)."""
    if value == "epoch":
        return int(task.steps_per_epoch or 0)
    return int(value)


def _param_counts(model) -> dict:
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 builds partitioned params
    params = {"total_params": sum(numel(p) for p in model.parameters()),
              "trainable_params": sum(numel(p) for p in model.parameters() if p.requires_grad)}
    if params["trainable_params"] < params["total_params"]:
        params["trainable_names"] = [n for n, p in model.named_parameters() if p.requires_grad]
    return params


def _param_checksums(model, acc) -> list[float]:
    """Each rank's sum of |parameters|: equal values mean the replicas stayed in sync."""
    if is_deepspeed(acc):
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
    if is_deepspeed(acc):
        opt = getattr(model, "optimizer", None)
        for name in ("cur_scale", "loss_scale"):
            value = getattr(opt, name, None)
            if isinstance(value, (int, float)) and str(acc.mixed_precision) == "fp16":
                return float(value)
        return None
    scaler = getattr(acc, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else None


def _num_machines(world: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return max(1, world // max(local, 1))


def export_final(task, model, acc, final: Path) -> None:
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
