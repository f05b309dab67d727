"""One job per run directory: the run directory's lock.

While a job trains, rank 0 holds ``<run dir>/megasmoe.lock``: a JSON record of the
holder (host, pid and its start time, boot id, SLURM job id and restart count,
since when) on which it keeps an ``flock``; the file is removed when the job ends.
A second launch on the same run directory is refused in one line naming the holder
(``check_run_lock``: launch/pretrain.sh and the SLURM pre-flight run it before
torchrun starts; the trainer refuses too, for two launches that race). A lock whose
holder is dead is taken over, saying so in one line. Dead means: on this host, no
process holds the flock and the pid is gone (or is another process: start time) or
the host rebooted; on another host, SLURM says the holder's job no longer runs, or
the holder is an earlier run of this very job (a requeue, same job id). A holder on
another host without a SLURM job id cannot be checked from here: refused, naming the
file to delete.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from megasmoe.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock relies on its record alone
    fcntl = None

__all__ = ["check_run_lock", "hold_run_lock", "RunLock", "LockError", "Holder", "LOCK_NAME"]

LOCK_NAME = "megasmoe.lock"
"""The lock file, in the run directory; present while a job trains there."""

_ALIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED",
                 "SIGNALING", "RESIZING", "STAGE_OUT"}
"""squeue states of a job whose processes may still write (PENDING/REQUEUED: none run)."""


class LockError(ConfigError):
    """The run directory is in use by another job (a one-line, user-facing message).

    A ConfigError: the command line prints it as ``megasmoe: config error: ...`` and
    exits with 2, like any other problem found before training.
    """


def _hostname() -> str:
    return socket.gethostname()


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Holder:
    """Who holds (or held) a run directory's lock: what the lock file records."""

    host: str
    """Host name (socket.gethostname())."""
    pid: int
    """Process id of the holder (rank 0 of the job)."""
    pid_start: Optional[int] = None
    """Its start time in clock ticks since boot (guards against pid reuse)."""
    boot_id: Optional[str] = None
    """/proc/sys/kernel/random/boot_id of its host (a reboot frees the lock)."""
    slurm_job_id: Optional[str] = None
    """SLURM_JOB_ID of the holder's job, if it ran under SLURM."""
    slurm_restart_count: int = 0
    """SLURM_RESTART_COUNT of that job (how often it was requeued)."""
    since: str = ""
    """When the lock was taken (ISO 8601, local time with offset)."""

    @classmethod
    def me(cls, env: Optional[Mapping[str, str]] = None) -> "Holder":
        """This process, as the lock file records it."""
        env = os.environ if env is None else env
        return cls(host=_hostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                   boot_id=_boot_id(), slurm_job_id=env.get("SLURM_JOB_ID") or None,
                   slurm_restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
                   since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def to_json(self) -> str:
        """The lock file's text."""
        return json.dumps(self.__dict__) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Optional["Holder"]:
        """Parse a lock file's text; None if it is empty or not a lock record."""
        try:
            data = json.loads(text)
            return cls(host=str(data["host"]), pid=int(data["pid"]),
                       pid_start=data.get("pid_start"), boot_id=data.get("boot_id"),
                       slurm_job_id=data.get("slurm_job_id"),
                       slurm_restart_count=int(data.get("slurm_restart_count") or 0),
                       since=str(data.get("since", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        """``host vm, pid 123, SLURM job 45, since 2026-05-09 07:35:25+00:00``."""
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        since = f", since {self.since.replace('T', ' ')}" if self.since else ""
        return f"host {self.host}, pid {self.pid}{job}{since}"


def slurm_job_state(job_id: str, timeout_s: float = 30.0) -> tuple[Optional[str], str]:
    """(state, detail) of a SLURM job from squeue: ``("RUNNING", "")``; ``("", "...")``
    when SLURM no longer knows it; ``(None, why)`` when SLURM cannot be asked."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                              capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return None, "squeue is not installed here"
    except subprocess.TimeoutExpired:
        return None, f"squeue did not answer in {timeout_s:.0f} s"
    err = proc.stderr.strip()
    if proc.returncode != 0:
        if "invalid job id" in err.lower():
            return "", "unknown to SLURM"
        return None, f"squeue failed: {err.splitlines()[-1] if err else proc.returncode}"
    states = proc.stdout.split()
    return (states[0] if states else ""), ""


def _judge(holder: Optional[Holder], flock_free: bool,
           env: Mapping[str, str]) -> tuple[Optional[bool], str]:
    """Whether the lock's holder still runs: (True | False | None = cannot tell, why)."""
    if not flock_free:
        return True, ""
    if holder is None:
        return False, "unreadable lock file"
    here = _hostname()
    if holder.host == here:
        boot = _boot_id()
        if holder.boot_id and boot and holder.boot_id != boot:
            return False, "the host rebooted since"
        if _pid_exists(holder.pid):
            start = _pid_start(holder.pid)
            if holder.pid_start is None or start is None or start == holder.pid_start:
                return True, ""
            return False, "the process is gone (its pid is another process now)"
        return False, "the process is gone"
    job = holder.slurm_job_id
    mine = env.get("SLURM_JOB_ID")
    if job and mine and str(job) == str(mine):
        # SLURM runs one instance of a job at a time: an earlier run of this job is dead.
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        if restarts != holder.slurm_restart_count:
            return False, f"an earlier run of this SLURM job {job}, requeued since"
        return False, f"an earlier step of this SLURM job {job}"
    if job:
        state, detail = slurm_job_state(job)
        if state is None:
            return None, f"cannot ask SLURM about job {job}: {detail}"
        if state in _ALIVE_STATES:
            return True, ""
        return False, f"SLURM job {job} is {state.lower() if state else 'gone'}"
    return None, f"a process on another host without a SLURM job id cannot be checked from {here}"


def _refusal(run: Path, holder: Optional[Holder], alive: Optional[bool], why: str) -> LockError:
    lock = run / LOCK_NAME
    if holder is None:
        return LockError(f"run.dir {run} is in use by another job that is starting (lock "
                         f"{lock}); wait for it, or train elsewhere with another "
                         f"run.dir / run.name")
    if alive is None:
        return LockError(f"run.dir {run} is locked by {holder.describe()} and {why}; if that "
                         f"job no longer runs, delete {lock}")
    return LockError(f"run.dir {run} is in use by another job ({holder.describe()}); wait for "
                     f"it to finish or stop it, or train elsewhere with another "
                     f"run.dir / run.name")


_LOCK_EX = fcntl.LOCK_EX if fcntl else 2
_LOCK_SH = fcntl.LOCK_SH if fcntl else 1


def _flock(fd: int, op: int, wait_s: float = 0.0) -> Optional[bool]:
    """Take ``op`` (LOCK_EX / LOCK_SH) without blocking, retrying for ``wait_s``.

    True: taken; False: another process holds it; None: the filesystem has no locks.
    """
    if fcntl is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        except OSError:
            return None


def _read_fd(fd: int) -> Optional[Holder]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return Holder.from_json(b"".join(chunks).decode(errors="replace"))


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not unlinked or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def check_run_lock(run_path: Path, env: Optional[Mapping[str, str]] = None) -> None:
    """Raise LockError (one line) if a live job holds ``run_path``'s lock.

    A stale lock (holder dead, see the module docstring) passes: the trainer takes it
    over. Changes nothing on disk. ``env`` (default os.environ) gives this job's
    SLURM_JOB_ID / SLURM_RESTART_COUNT, so that a requeued job passes its own lock.
    """
    env = os.environ if env is None else env
    run = Path(run_path).resolve()
    try:
        fd = os.open(run / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        got = _flock(fd, _LOCK_SH)
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)
        holder = _read_fd(fd)
    finally:
        os.close(fd)
    alive, why = _judge(holder, got is not False, env)
    if alive is not False:
        raise _refusal(run, holder, alive, why)


def _create_with(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` atomically; False if it exists already."""
    tmp = path.with_name(f"{path.name}.{_hostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, also on NFS: never a half-written lock
            return True
        except FileExistsError:
            return False
        except OSError:
            pass  # no hard links on this filesystem: exclusive create, then write
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """A held run-directory lock (or a stand-in that holds nothing, on ranks other than 0)."""

    def __init__(self, path: Optional[Path] = None, fd: Optional[int] = None,
                 holder: Optional[Holder] = None):
        self.path = path
        self.fd = fd
        self.holder = holder
        self.took_over: Optional[str] = None
        """The one-line notice when a stale lock was taken over, else None."""

    @property
    def held(self) -> bool:
        """Whether this object holds a lock."""
        return self.fd is not None

    @classmethod
    def acquire(cls, run_path: Path, env: Optional[Mapping[str, str]] = None,
                attempts: int = 5) -> "RunLock":
        """Take ``run_path``'s lock for this process (creating the directory).

        Raises LockError (one line) when a live job holds it; takes a stale lock over
        (``took_over`` says from whom).
        """
        env = os.environ if env is None else env
        run = Path(run_path).resolve()
        run.mkdir(parents=True, exist_ok=True)
        path = run / LOCK_NAME
        me = Holder.me(env)
        for _ in range(attempts):
            if _create_with(path, me.to_json()):
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                # Another launch's check may hold a shared lock for a moment.
                if _flock(fd, _LOCK_EX, wait_s=5.0) is not False and _same_file(fd, path):
                    return cls(path, fd, me)
                os.close(fd)
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # released meanwhile: create it
            got = _flock(fd, _LOCK_EX, wait_s=2.0)
            if got is not False and not _same_file(fd, path):
                os.close(fd)
                continue
            holder = _read_fd(fd)
            alive, why = _judge(holder, got is not False, env)
            if alive is not False:
                os.close(fd)
                raise _refusal(run, holder, alive, why)
            # Ours now (we hold its flock): overwrite the record in place.
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.to_json().encode(), 0)
            os.fsync(fd)
            lock = cls(path, fd, me)
            if holder is None:
                lock.took_over = f"megasmoe: stale lock {path}, taken over: {why}"
            else:
                details = ", ".join(
                    ([f"SLURM job {holder.slurm_job_id}"] if holder.slurm_job_id else [])
                    + ([f"since {holder.since.replace('T', ' ')}"] if holder.since else []))
                lock.took_over = (f"megasmoe: stale lock from host {holder.host} pid "
                                  f"{holder.pid}{f' ({details})' if details else ''}, "
                                  f"taken over: {why}")
            return lock
        raise LockError(f"run.dir {run}: could not take the lock {path} in {attempts} tries "
                        f"(other launches keep taking it); start one job at a time")

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the flock. Idempotent."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                holder = _read_fd(self.fd)
                if holder is not None and (holder.host, holder.pid) == \
                        (self.holder.host, self.holder.pid):
                    self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a lock left behind is stale once this process is gone
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_run_lock(run_path: Path) -> RunLock:
    """Rank 0 takes ``run_path``'s lock for this job; every rank learns the outcome.

    Collective when torch.distributed is initialised. A refusal raises LockError on
    every rank (rank 0's names the holder; the caller should destroy the process group
    first, so that the command line prints it once). The takeover of a stale lock is
    printed by rank 0. Returns the lock (a stand-in holding nothing on other ranks).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    lock, error, message = RunLock(), None, None
    if rank == 0:
        try:
            lock = RunLock.acquire(run_path)
        except Exception as e:  # noqa: BLE001 - every rank must hear of any failure
            error, message = e, str(e)
    if distributed:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if rank == 0 and error is not None:
        raise error
    if message is not None:
        raise LockError(message)
    if lock.took_over:
        print(lock.took_over, file=sys.stderr, flush=True)
    return lock
