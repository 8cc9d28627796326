"""A DeepSpeed JSON → the dict this run uses.

Three kinds of "auto" in configs/deepspeed/*.json, so the run config stays the single source of truth:
- filled by accelerate at `prepare`: lr, weight_decay, bf16/fp16, and the bucket sizes it derives from
  the model's hidden size (reduce_bucket_size, stage3_prefetch_bucket_size,
  stage3_param_persistence_threshold);
- filled by the loop (`build_accelerator`): micro-batch, accumulation, train batch, clipping, betas, eps;
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
from pathlib import Path

from ..config import ConfigError

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
