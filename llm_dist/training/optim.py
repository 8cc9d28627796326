"""AdamW (fused / foreach where the device supports it) and the schedules of `transformers.get_scheduler`
(linear, cosine, constant, constant-with-warmup, warmup-stable-decay)."""
from __future__ import annotations

import torch
from transformers import get_scheduler

from ..config import OptimConfig

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
              "constant_with_warmup": "constant_with_warmup", "wsd": "warmup_stable_decay"}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (as BERT and HF Trainer do)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, ds_config: dict | None = None):
    """torch AdamW, or — when the DeepSpeed JSON names an optimizer (e.g. CPU Adam for offload) — accelerate's
    `DummyOptim`, whose "auto" values (lr, betas, eps, weight decay) are filled from this config."""
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    groups = param_groups(model, cfg.weight_decay)
    if ds_config and "optimizer" in ds_config:
        from accelerate.utils import DummyOptim

        return DummyOptim(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused:  # fused kernels exist for CUDA and CPU in recent torch; foreach is the fallback
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, foreach=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_ratio * total_steps))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    kwargs = {}
    if cfg.scheduler == "wsd":
        kwargs = {"num_decay_steps": max(1, int(cfg.decay_ratio * total_steps))}
    return get_scheduler(SCHEDULERS[cfg.scheduler], optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)

