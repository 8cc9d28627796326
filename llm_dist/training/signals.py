"""SIGTERM / SIGUSR1 → checkpoint at the next step boundary, then exit cleanly.

The handler only sets a flag; the loop sums the flag across ranks with its per-step all-reduce, so every
rank stops after the same optimizer step even if only one of them was signalled."""
from __future__ import annotations

import signal


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._old = {}
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.received = signum

    @property
    def flag(self) -> int:
        return 0 if self.received is None else 1

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
