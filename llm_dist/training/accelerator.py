"""The accelerator of a run, and the DeepSpeed config it uses (one place for both).

`build_accelerator(cfg)` makes the `Accelerator`: gloo for CPU ranks, mixed precision (the launcher's
unless the run config says), trackers' logging dir, and — with `deepspeed.config` or an accelerate config
file that names a DeepSpeed JSON — a `DeepSpeedPlugin` whose every "auto" is resolved here.

Three kinds of "auto" in configs/deepspeed/*.json, so the run config stays the single source of truth:
- filled by accelerate at `prepare`: lr, weight_decay, bf16/fp16, and the bucket sizes it derives from
  the model's hidden size (reduce_bucket_size, stage3_prefetch_bucket_size,
  stage3_param_persistence_threshold);
- filled by `build_accelerator`: micro-batch, accumulation, train batch, clipping, betas, eps;
- filled here, by device (`DEVICE_AUTO`): the ZeRO settings whose right value differs between GPUs
  and CPU ranks. DeepSpeed's defaults are GPU ones: up to 1e9 gathered parameters live (a 110M
  model stays whole), overlapped communication (extra bucket buffers, no gain over gloo), and one
  optimizer sub-group per parameter group (stage 3 then allocates a gradient buffer of the
  *unpartitioned* group size on every rank). On CPU ranks those settings cost ZeRO-3 all of its
  memory saving (bench/zero_memory.py; docs/bench_classify_zero.md).
The resolved dict (after accelerate's fills too) is written to output_dir/ds_config.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

from ..config import ConfigError, RunConfig

# zero_optimization key: (value with CUDA, value on CPU ranks)
DEVICE_AUTO = {
    "overlap_comm": (True, False),
    "stage3_max_live_parameters": (1e9, 1e7),  # ~1.4 BERT-base layers on CPU
    "stage3_max_reuse_distance": (1e9, 1e7),
    "sub_group_size": (1e9, 1e7),
}


def load_ds_config(path: str, cuda: bool) -> dict:
    """Read `path` (config key deepspeed.config) and resolve the device "auto"s; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'deepspeed.config': {path} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    if not isinstance(cfg.get("zero_optimization", {}), dict):
        raise ConfigError(f"{path}: 'zero_optimization' must be an object")
    return resolve_device_autos(cfg, cuda)


def resolve_device_autos(cfg: dict, cuda: bool) -> dict:
    """In place (also for a JSON that accelerate read itself, from an accelerate config file)."""
    zero = cfg.get("zero_optimization", {})
    for key, (gpu, cpu) in DEVICE_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = gpu if cuda else cpu
    return cfg


def cpu_fp16_supported() -> bool:
    """Whether this CPU has fp16 compute units (AVX512-FP16 / AMX-FP16) that oneDNN uses; DeepSpeed's CPU
    accelerator refuses fp16 without them (AMD EPYC and older Intel parts lack them; bf16 always works)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, deepspeed: bool, cuda: bool) -> None:
    """A precision the hardware cannot run is a config error (one line), not DeepSpeed's traceback."""
    if precision == "fp16" and deepspeed and not cuda and not cpu_fp16_supported():
        raise ConfigError("config key 'mixed_precision': fp16 with DeepSpeed needs a CPU with fp16 units "
                          "(AVX512-FP16 / AMX-FP16), which this one lacks; use bf16 or no")


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


def is_deepspeed(acc) -> bool:
    return acc.distributed_type.value == "DEEPSPEED"


def zero_stage(acc) -> int | None:
    if not is_deepspeed(acc):
        return None
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))
