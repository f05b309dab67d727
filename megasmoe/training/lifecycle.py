"""Workers die with their launcher.

torchrun starts every worker in a session of its own, so a ``kill -9`` of torchrun
used to leave the workers training (writing metrics and checkpoints into the run
directory) with nobody to stop them. ``die_with_launcher`` asks Linux to SIGKILL the
worker when torchrun dies (``prctl(PR_SET_PDEATHSIG)``), and every process the worker
forks from its main thread afterwards (DataLoader workers, megatron-core's async
checkpoint writer) to SIGKILL itself when the worker dies. SIGKILL, not the SIGTERM
the trainer turns into a checkpoint: with the launcher gone the peers are dying too,
so a checkpoint would hang in its collectives. Killing never corrupts the last good
checkpoint: a checkpoint is written to ``iter_N.tmp`` and published by a rename and
an atomic ``latest`` (megasmoe.checkpoint).

The run directory's lock (one job per run directory) is megasmoe.training.runlock.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["die_with_launcher", "LAUNCHER_PID_ENV"]

LAUNCHER_PID_ENV = "MEGASMOE_LAUNCHER_PID"
"""Set by launch/pretrain.sh to the pid torchrun will have (it execs torchrun): lets a
worker tell that torchrun died before the worker could ask to die with it."""

_PR_SET_PDEATHSIG = 1


_fork_hook = {"installed": False, "from_main": {}, "parent": 0}
_prctl = []  # libc's prctl, looked up once (forked children use the parent's)


def _set_pdeathsig(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on this process; False where it is unavailable."""
    try:
        if not _prctl:
            import ctypes

            _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
        return _prctl[0](_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _before_fork() -> None:
    # Which thread forks: a child's death signal fires when that *thread* exits, so only
    # children of the main thread (which lives as long as the worker) are armed.
    _fork_hook["from_main"][threading.get_ident()] = \
        threading.current_thread() is threading.main_thread()
    _fork_hook["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if not _fork_hook["from_main"].get(threading.get_ident()):
        return
    if _set_pdeathsig(signal.SIGKILL) and os.getppid() != _fork_hook["parent"]:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker died before the line above


def _arm_fork_children() -> None:
    """Children forked from the main thread from now on die (SIGKILL) with this process.

    Covers DataLoader workers and megatron-core's async checkpoint writer (both fork
    from the main thread). Processes started by exec (subprocess without preexec_fn,
    multiprocessing's spawn) are not armed: multiprocessing's resource tracker exits by
    itself once every process holding its pipe is gone.
    """
    if not _fork_hook["installed"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook["installed"] = True


def die_with_launcher() -> bool:
    """Make this worker (and its forked children) exit when the process that launched it dies.

    Linux only, and only under torchrun (``TORCHELASTIC_RUN_ID`` set): the worker asks
    for SIGKILL when torchrun dies, then checks that torchrun is still its parent (it may
    have died before the request). Under SLURM's srun launcher the parent is slurmstepd,
    which kills the step's processes itself; run alone, ``megasmoe pretrain``'s parent is
    a shell that may rightly exit first (nohup): nothing is armed there except that
    children forked from now on die with this process. Returns whether it is armed.
    """
    if not sys.platform.startswith("linux"):
        return False
    _arm_fork_children()
    expected = os.environ.pop(LAUNCHER_PID_ENV, "")  # for this process, not its children
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    if not _set_pdeathsig(signal.SIGKILL):
        return False
    ppid = os.getppid()
    if ppid == 1 or (expected.isdigit() and int(expected) != ppid):
        print(f"megasmoe: the launcher (torchrun{', pid ' + expected if expected else ''}) "
              f"is gone; this worker exits", file=sys.stderr, flush=True)
        os._exit(1)
    return True
