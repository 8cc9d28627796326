"""SIGTERM / SIGUSR1 (preemption, SLURM's time-limit warning) end a run within seconds in every phase.

- start-up (config → tokenizer → data → model → resume): the handler raises `Interrupted` at once —
  there is nothing new to save (the last checkpoint, if any, is the consistent state); the CLI exits 0
  and says so. `tokenizers` training is Rust, but it pulls its texts from our Python iterator, so the
  exception surfaces at the next document.
- training: the handler only sets a flag; the loop sums the flag across ranks with its per-step
  all-reduce, so every rank stops after the same optimizer step (even if only one was signalled), then
  checkpoints and exits 0.
- evaluation: eval loops call `poll(accelerator)` once per batch (one tiny all-reduce of the flag on
  several ranks), so every rank leaves the eval at the same batch; the loop then checkpoints the step.
- export: bounded work (writing `final/`); the flag is read when it ends.
"""
from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """Raised where a signal must end the current phase now (start-up, evaluation)."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} during {phase}")
        self.signum, self.phase = signum, phase


_current: "StopSignal | None" = None


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        global _current
        self.received: int | None = None
        self.phase = "start-up"
        self.immediate = True  # start-up: raise in the handler
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        _current = self

    def _handle(self, signum, frame):  # noqa: ARG002
        first = self.received is None
        self.received = signum
        if self.immediate and first:
            raise Interrupted(signum, self.phase)

    def enter(self, phase: str, immediate: bool = False) -> None:
        """Name the phase (for messages); `immediate` phases raise from the handler. A signal that arrived
        while the previous phase deferred it is raised now if the new phase is immediate."""
        self.phase, self.immediate = phase, immediate
        if immediate and self.received is not None:
            raise Interrupted(self.received, phase)

    @property
    def flag(self) -> int:
        return 0 if self.received is None else 1

    def restore(self):
        global _current
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if _current is self:
            _current = None


def poll(accelerator=None) -> None:
    """Raise `Interrupted` on every rank if any rank has been signalled (one small all-reduce when there
    are several ranks). A no-op outside a run (e.g. a task evaluated from a script)."""
    stop = _current
    if stop is None:
        return
    flag = float(stop.flag)
    if accelerator is not None and accelerator.num_processes > 1:
        import torch

        flag = accelerator.reduce(torch.tensor([flag], device=accelerator.device), reduction="sum").item()
    if flag > 0:
        raise Interrupted(stop.received or signal.SIGTERM, stop.phase)
