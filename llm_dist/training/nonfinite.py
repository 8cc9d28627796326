"""Divergence guard: a non-finite loss or gradient norm never reaches the weights, a checkpoint or `final/`.

`on_nonfinite: stop` (default) ends the run at the first non-finite step without stepping the optimizer,
saving or exporting, and keeps the last good checkpoint; `skip` drops that optimizer step (the data is
consumed, the optimizer and schedule do not move) and stops after `max_nonfinite_skips` consecutive
skips. The decision reads the gradient norm, computed from gradients that DDP has already averaged over
ranks — so it is the same on every rank without another collective — plus this rank's loss on one rank.
Under DeepSpeed the engine steps inside `backward()`, so a non-finite step can only stop the run (and the
fp16 loss scaler's own overflow skips are left to it). Each event is reported with the step and the
example ids of the step's micro-batches on every rank.
"""
from __future__ import annotations

import math
import sys

import torch


class NonFinite(RuntimeError):
    """Non-finite weights where they would be saved or exported: the run stops without writing them."""


class NonFiniteGuard:
    def __init__(self, mode: str, max_skips: int, active: bool):
        self.mode, self.max_skips, self.active = mode, max_skips, active
        self.consecutive = 0
        self.skipped = 0

    def check(self, loss, grad_norm, acc, can_skip: bool) -> str:
        """'ok' | 'skip' | 'stop' for this step, the same on every rank. `loss`: this rank's summed loss
        (a float or a device scalar, read only where it decides)."""
        if not self.active:
            return "ok"
        if grad_norm is not None:  # computed from reduced gradients: equal on every rank
            bad = not math.isfinite(float(grad_norm)) or (acc.num_processes == 1 and not math.isfinite(float(loss)))
        else:  # no norm to read (an engine that does not report one): agree on the losses
            bad = not math.isfinite(float(loss))
            if acc.num_processes > 1:
                bad = acc.reduce(torch.tensor([float(bad)], device=acc.device), reduction="sum").item() > 0
        if not bad:
            self.consecutive = 0
            return "ok"
        self.consecutive += 1
        if self.mode == "skip" and can_skip and self.consecutive <= self.max_skips:
            self.skipped += 1
            return "skip"
        return "stop"


def total_grad_norm(model) -> torch.Tensor:
    """The global L2 norm of the (already reduced) gradients, without clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


def params_finite(model, acc) -> bool:
    """Every rank's parameters (its ZeRO partition) finite; agreed over ranks (one small all-reduce)."""
    bad = 0.0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p if t is None or p.numel() else t
        if t.numel() and not torch.isfinite(t.detach()).all():
            bad = 1.0
            break
    if acc.num_processes > 1:
        bad = acc.reduce(torch.tensor([bad], device=acc.device), reduction="sum").item()
    return bad == 0


def report(task, micro: list[dict], acc, step: int, loss: float, norm, action: str, guard: NonFiniteGuard) -> dict:
    """Say which step and which examples (every rank's) went non-finite; returns the event record."""
    ids = [i for b in micro for i in task.example_ids(b)]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        ids = gather_object(ids)
    all_ids = list(dict.fromkeys(ids))  # a long document spans several sequences of the batch
    event = {"step": step, "loss": loss if math.isfinite(loss) else str(loss),
             "grad_norm": float(norm) if norm is not None and math.isfinite(float(norm)) else str(
                 None if norm is None else float(norm)),
             "action": action, "consecutive": guard.consecutive, "example_ids": list(all_ids)}
    if acc.is_main_process:
        shown = ", ".join(map(str, all_ids[:8])) + (f" … ({len(all_ids)} in all)" if len(all_ids) > 8 else "")
        print(f"warning: non-finite loss or gradient at step {step} (loss {event['loss']}, grad norm "
              f"{event['grad_norm']}); {action}; examples: {shown}", file=sys.stderr, flush=True)
    return event


def nonfinite_checked(acc) -> bool:
    """False where a loss scaler already handles overflow steps itself (fp16: accelerate's GradScaler,
    DeepSpeed's dynamic loss scale) — its skipped steps are normal there, not divergence."""
    return str(acc.mixed_precision) != "fp16"
