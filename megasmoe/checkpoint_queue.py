"""The results queue of megatron's asynchronous checkpoint writer, started by megasmoe.

Its own module, free of torch, because it is what the queue's *spawned* Manager process
imports: a spawned process imports the module of its initializer, and with the
initializer in megasmoe.checkpoint that meant torch and torch.distributed.checkpoint in
every worker's Manager, about 0.6 s of CPU per worker for a queue that passes a few small
objects. Importing this module costs nothing beyond the standard library.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["STOP_SIGNALS", "start_results_queue"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals that make the trainer checkpoint and exit (what SLURM sends a job step)."""


def start_results_queue() -> None:
    """Start the results queue of megatron's torch_dist writer ourselves, once per process.

    megatron-core 0.16.1 creates it lazily (``filesystem_async._get_write_results_queue``:
    ``get_context("spawn").Manager().Queue()``, kept in a module global). Its Manager
    process outlives a worker that is killed (SIGKILL, or dying with its launcher), and,
    started with the stop signals blocked, could then only be SIGKILLed. This one is the
    same kind of queue from a Manager that ignores the stop signals and is killed when
    its worker dies (``_server_init``). Another megatron version (no such global) is left
    to itself.
    """
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_server_init, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def _server_init(worker_pid: int) -> None:
    """In the results queue's Manager process: ignore the stop signals, die with the worker."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != worker_pid:  # the worker died before prctl took effect
        os._exit(1)
