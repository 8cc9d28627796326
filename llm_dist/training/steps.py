"""Step strategies: the forward/backward work of one optimizer step.

The plain step runs each micro-batch once. Other strategies (adversarial training: several forward /
backward passes on perturbed `inputs_embeds`) replace it through `STEP_STRATEGIES` while keeping the
global-count loss scaling of `loss_scale()`, so the gradient of a step never depends on how its examples
are split over ranks and micro-batches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class StepResult:
    n_global: float  # loss units in the step over all ranks (masked tokens / examples)
    tokens_global: float
    flag: float  # the signal flag summed over ranks (> 0: stop after this step)
    loss_local: float  # this rank's summed loss
    sums: dict  # this rank's summed task metrics
    outputs: list = field(default_factory=list)  # the task's LossOutput per micro-batch


def count_step(task, micro_batches: list[dict], acc, world_size: int, extra_flag: float = 0.0):
    """The one collective before the forward passes: (global units, global tokens, flag sum)."""
    local = torch.tensor([sum(task.count(b) for b in micro_batches), sum(task.tokens(b) for b in micro_batches),
                          extra_flag], dtype=torch.float64, device=acc.device)
    glob = acc.reduce(local, reduction="sum") if world_size > 1 else local
    return glob[0].item(), glob[1].item(), glob[2].item()


def loss_scale(n_global: float, world_size: int, n_micro: int, is_ds: bool) -> float:
    """Multiply a micro-batch's summed loss by this before backward: the step's loss is then
    sum(unit losses over all micro-batches and ranks) / their count. DDP averages gradients over ranks
    (hence × world); the DeepSpeed engine divides by its accumulation steps itself (hence × micro)."""
    scale = world_size / max(n_global, 1.0)
    return scale * n_micro if is_ds else scale


class PlainStep:
    """Forward/backward of each micro-batch once (no gradient sync until the last one)."""

    name = "plain"

    def __call__(self, model, task, micro_batches: list[dict], acc, world_size: int,
                 extra_flag: float = 0.0) -> StepResult:
        n_global, tokens, flag = count_step(task, micro_batches, acc, world_size, extra_flag)
        is_ds = acc.distributed_type.value == "DEEPSPEED"
        scale = loss_scale(n_global, world_size, len(micro_batches), is_ds)
        loss_total, sums, outputs = 0.0, {}, []
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or is_ds) else acc.no_sync(model)
            if is_ds:  # the engine steps (clip, optimizer, zero grad) at the accumulation boundary only
                acc.gradient_state._set_sync_gradients(last)
            with sync, acc.autocast():
                out = task.loss(model, mb)
                acc.backward(out.loss_sum * scale)
            outputs.append(out)
            loss_total += out.loss_sum.detach().float().item()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return StepResult(n_global, tokens, flag, loss_total, sums, outputs)


STEP_STRATEGIES = {"plain": PlainStep}


def make_step(cfg) -> PlainStep:
    return STEP_STRATEGIES["plain"]()


def train_step(model, task, micro_batches, accelerator, world_size: int, extra_flag: float = 0.0):
    """The plain step as a function: (global count, global tokens, flag sum, local summed loss, metric sums)."""
    r = PlainStep()(model, task, micro_batches, accelerator, world_size, extra_flag)
    return r.n_global, r.tokens_global, r.flag, r.loss_local, r.sums
