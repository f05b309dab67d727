"""The results queue of megatron's torch_dist checkpoint writer, chosen by megasmoe per save.

A synchronous save needs no process to carry its results: megatron runs the writer's
collector (``write_preloaded_data_multiproc``) in the trainer itself, which puts the
results in this queue and reads them back a moment later. megatron's own queue is a
spawn-context Manager's in every case; for a synchronous save that was one more process
per rank, which imported torch to unpickle the first results (2.5 s on the critical
path of every run's first save, measured on 2 CPU cores). So a synchronous save gets a
thread queue, and only an asynchronous one, whose collector runs in a forked process,
gets a Manager's.

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

__all__ = ["STOP_SIGNALS", "use_results_queue"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals that make the trainer checkpoint and exit (what SLURM sends a job step)."""


_manager_queue = None
"""The Manager-backed queue of asynchronous saves, once started (one per process)."""


def use_results_queue(async_save: bool) -> None:
    """Set the results queue megatron's writer takes for the save about to start.

    A writer keeps the queue it took when it prepared its save, so switching between an
    asynchronous save in flight and a synchronous one does not cross their results.
    Another megatron version (no ``_results_queue`` global) is left to itself.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        return
    filesystem_async._results_queue = _manager_results_queue() if async_save else queue.Queue()


def _manager_results_queue():
    """The Manager-backed results queue of asynchronous saves, started at the first call.

    megatron-core 0.16.1 creates its own lazily (``filesystem_async._get_write_results_queue``:
    ``get_context("spawn").Manager().Queue()``, kept in a module global). Its Manager
    process outlives a worker that is killed (SIGKILL, or dying with its launcher), and,
    started with the stop signals blocked, could then only be SIGKILLed. This one is the
    same kind of queue from a Manager that ignores the stop signals and is killed when
    its worker dies (``_server_init``).
    """
    import multiprocessing
    from multiprocessing.managers import SyncManager

    global _manager_queue
    if _manager_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_server_init, initargs=(os.getpid(),))
        _manager_queue = manager.Queue()  # the proxy keeps the manager alive
    return _manager_queue


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
