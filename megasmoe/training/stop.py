"""Stopping on a signal: checkpoint at the next step boundary, then exit for a requeue.

SLURM sends SIGUSR1 (``--signal``) before a time limit and SIGTERM on ``scancel``; the
handler only records the signal, and the loop saves a checkpoint at the end of the step
it is in (every rank agrees on it, see ``Trainer._stop_requested``), then raises
``RequeueExit``: exit code 75 (EX_TEMPFAIL). launch/pretrain.sh requeues the job after a
time-limit SIGUSR1 once that checkpoint is published (docs/slurm.md).
"""

from __future__ import annotations

import signal

from megasmoe.checkpoint_queue import STOP_SIGNALS

__all__ = ["EXIT_REQUEUE", "RequeueExit", "StopSignal"]

EXIT_REQUEUE = 75
"""Exit code after a checkpoint requested by SIGTERM/SIGUSR1 (EX_TEMPFAIL): requeue me."""


class RequeueExit(SystemExit):
    """Raised after the checkpoint that a SIGTERM/SIGUSR1 asked for has been saved."""

    def __init__(self):
        super().__init__(EXIT_REQUEUE)


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (what SLURM sends before a time limit)."""

    SIGNALS = STOP_SIGNALS  # the signals a save defers (megasmoe.checkpoint)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> None:
        """Install the handlers (main thread only)."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
