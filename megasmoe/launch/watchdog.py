"""The peer watchdog: a lost rank (a dead process, a dead node) becomes a prompt exit.

Without it, the survivors of a lost node wait in their next collective until its
timeout (tens of minutes by default) and the job burns its allocation. With it:

- every rank bumps a heartbeat counter in the job's TCP store (``MASTER_ADDR``:
  ``MASTER_PORT``: torchrun's agent store, or rank 0's under the srun launcher) every
  ``HEARTBEAT_S`` seconds, from a daemon thread, so a rank busy in a long step or
  blocked in a collective still beats;
- rank 0 watches every rank, every other rank watches rank 0 and a shared "lost" key
  (3 store operations per rank per beat: it scales with the ranks, not their square);
- a rank whose counter has not moved for ``lost_after_s`` is lost: rank 0 publishes one
  line naming it (rank, node) and the last complete checkpoint, prints it and exits
  with ``LOST_EXIT_CODE``; every other rank prints the same line and exits too. A rank
  that cannot reach the store for ``lost_after_s`` treats rank 0's node as lost.

The exit is ``os._exit``: the main thread may be blocked in a collective that would never
return, and a normal exit would run cleanup that waits on the dead peer too. Nothing is
lost by it: a checkpoint is published by a rename and an atomic ``latest``
(megasmoe.checkpoint), so one interrupted mid-write is never ``latest``.

A rank that ends normally (or with an error of its own) first marks itself done, so its
peers do not mistake a finished rank for a lost one (``stop``).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["PeerWatchdog", "LOST_EXIT_CODE", "LOST_PREFIX", "MARKER_ENV", "HEARTBEAT_S",
           "MAX_LOST_AFTER_S", "lost_after_s"]

LOST_EXIT_CODE = 76
"""Exit code of a rank that gave up because a peer was lost (75 is the time-limit exit)."""

LOST_PREFIX = "megasmoe: lost rank"
"""How the one-line message starts (launch/pretrain.sh looks for it in the log too)."""

MARKER_ENV = "MEGASMOE_LOST_MARKER"
"""A file (on the run directory) the message is also appended to when a rank gives up:
launch/pretrain.sh sets it for each start of a job and requeues when it is there (the
exit code is not enough: torchrun turns a worker's 76 into 1)."""

HEARTBEAT_S = 1.0
"""Seconds between heartbeats (and checks)."""

MAX_LOST_AFTER_S = 60.0
"""A heartbeat silent this long means a lost rank, whatever the collective timeout: a live
process beats every second from its own thread, so a minute of silence is a dead one."""

_KEY = "megasmoe/watchdog"


def lost_after_s(collective_timeout_s: float) -> float:
    """How long a heartbeat may stop before its rank is lost: the collective timeout, at
    most MAX_LOST_AFTER_S, at least 5 heartbeats (a rank is not lost for one slow beat)."""
    return max(5 * HEARTBEAT_S, min(float(collective_timeout_s), MAX_LOST_AFTER_S))


class PeerWatchdog:
    """Heartbeats through the job's TCP store; exits this process when a peer is lost.

    ``exit`` is called with LOST_EXIT_CODE after the message (``os._exit`` by default;
    tests pass their own).
    """

    def __init__(self, rank: int, world_size: int, store_host: str, store_port: int,
                 lost_after_s: float, checkpoint_root: Optional[Path] = None,
                 exit: Callable[[int], None] = os._exit):
        self.rank, self.world_size = rank, world_size
        self.lost_after_s = lost_after_s
        self.checkpoint_root = checkpoint_root
        self.host = socket.gethostname().split(".")[0]
        self.verdict: Optional[str] = None
        """The message, once a peer was found lost."""
        self._exit = exit
        self._lock = threading.Lock()  # guards the state both threads read and write below
        now = time.monotonic()
        watched = [r for r in range(world_size) if r != rank] if rank == 0 else [0]
        self._seen = {r: (-1, now) for r in watched}  # rank -> (counter, when it last moved)
        self._hosts: dict = {}
        self._store_ok = now  # when the store last answered
        self._remote_verdict: Optional[str] = None  # rank 0's message, read from the store
        self._publish: Optional[str] = None  # rank 0: the message to tell the others
        self._published = threading.Event()
        self._failing = threading.Event()  # stop(failing=True): watch every rank
        self._fail_base: dict = {}  # rank -> counter when failing mode first read it
        self._alive_since_failing: set = set()  # ranks seen beating twice since then
        self._done_ranks: set = set()  # ranks that ended normally
        self._finish = threading.Event()  # stop(): mark this rank done, then end
        self._decided = threading.Event()
        import torch.distributed as dist

        # A client of its own: the process group's store is used by the main thread, and
        # its requests must not interleave with ours. Its calls may block (a store whose
        # host vanished silently): only the I/O thread makes them, and the judge thread,
        # which never touches the store, decides from the times the I/O thread records.
        self.store = dist.TCPStore(store_host, store_port, is_master=False,
                                   timeout=datetime.timedelta(seconds=min(lost_after_s / 2, 10.0)),
                                   wait_for_workers=False)
        # Keys of this incarnation of the job (torchrun restarts reuse the agent's store).
        self._prefix = f"{_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store.set(f"{self._prefix}/host/{rank}", self.host)
        self._io = threading.Thread(target=self._run_io, name="megasmoe-watchdog-io",
                                    daemon=True)
        self._judge = threading.Thread(target=self._run_judge, name="megasmoe-watchdog",
                                       daemon=True)

    @classmethod
    def from_env(cls, lost_after_s: float, checkpoint_root: Optional[Path] = None,
                 **kwargs) -> Optional["PeerWatchdog"]:
        """A started watchdog for this rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as
        torchrun / the srun launcher set them); None for a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        dog = cls(int(os.environ["RANK"]), world, os.environ["MASTER_ADDR"],
                  int(os.environ["MASTER_PORT"]), lost_after_s, checkpoint_root, **kwargs)
        dog.start()
        return dog

    def start(self) -> None:
        """Start beating and watching (two daemon threads)."""
        self._io.start()
        self._judge.start()

    # ------------------------------------------------------------------ store I/O

    def _counter(self, name: str) -> int:
        # add(key, 0) reads a counter without blocking on a key that does not exist yet.
        return int(self.store.add(f"{self._prefix}/{name}", 0))

    def _run_io(self) -> None:
        while True:
            failing = self._failing.is_set()
            time.sleep(HEARTBEAT_S / (4 if failing or self._publish else 1))
            try:
                if self._publish and not self._published.is_set():
                    self.store.set(f"{self._prefix}/lost", self._publish)
                    self.store.add(f"{self._prefix}/lost_flag", 1)
                    self._published.set()
                if self._finish.is_set():
                    self.store.add(f"{self._prefix}/done/{self.rank}", 1)
                    return
                self.store.add(f"{self._prefix}/beat/{self.rank}", 1)
                if self.rank != 0 and self._counter("lost_flag"):
                    with self._lock:
                        self._remote_verdict = self.store.get(f"{self._prefix}/lost").decode()
                with self._lock:
                    watched = [r for r in (range(self.world_size) if failing else self._seen)
                               if r != self.rank and r not in self._done_ranks]
                for r in watched:
                    if r not in self._hosts:
                        self._hosts[r] = self.store.get(f"{self._prefix}/host/{r}").decode()
                    done = self._counter(f"done/{r}")
                    value = self._counter(f"beat/{r}")
                    now = time.monotonic()
                    with self._lock:
                        if done:
                            self._done_ranks.add(r)
                            self._seen.pop(r, None)  # finished normally: not lost
                            continue
                        if r not in self._seen or value != self._seen[r][0]:
                            self._seen[r] = (value, now)
                        if failing:
                            base = self._fail_base.setdefault(r, value)
                            if value - base >= 2:  # two beats after the failure: alive
                                self._alive_since_failing.add(r)
                with self._lock:
                    self._store_ok = time.monotonic()
            except Exception:  # noqa: BLE001 - the store's host is gone: the judge decides
                if self._finish.is_set():
                    return

    # ------------------------------------------------------------------ the judge

    def _run_judge(self) -> None:
        while not self._finish.is_set():
            time.sleep(HEARTBEAT_S / 4)
            now = time.monotonic()
            with self._lock:
                remote = self._remote_verdict
                stale = [(now - t, r) for r, (_, t) in self._seen.items()
                         if now - t >= self.lost_after_s]
                store_silent = now - self._store_ok
                everyone_done = not self._seen and not self._failing.is_set()
            if remote:
                return self._give_up(remote)
            if stale:
                silent, r = max(stale)
                message = self._message(r, self._hosts.get(r, "?"),
                                        f"no heartbeat for {silent:.0f} s")
                if self.rank == 0:  # tell the others (they watch the flag), then go
                    self._publish = message
                    self._published.wait(2 * HEARTBEAT_S)
                return self._give_up(message)
            if store_silent >= self.lost_after_s:
                return self._give_up(self._message(
                    0, self._hosts.get(0, os.environ.get("MASTER_ADDR", "?")),
                    f"the job's store at {os.environ.get('MASTER_ADDR')}:"
                    f"{os.environ.get('MASTER_PORT')} has not answered for {store_silent:.0f} s"))
            if everyone_done:
                return  # everyone watched ended normally: nothing can be lost now

    def _message(self, rank: int, host: str, why: str) -> str:
        last = None
        if self.checkpoint_root is not None:
            from megasmoe.checkpoint import read_latest

            last = read_latest(self.checkpoint_root)
        return (f"{LOST_PREFIX} {rank} (node {host}): {why}; the job cannot continue, exiting "
                f"with code {LOST_EXIT_CODE}; last complete checkpoint: "
                f"{last.resolve() if last else 'none'}")

    def _give_up(self, message: str) -> None:
        message = f"{message} (seen by rank {self.rank} on {self.host})"
        self.verdict = message
        self._decided.set()
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        marker = os.environ.get(MARKER_ENV)
        if marker:
            try:
                with open(marker, "a") as f:  # one write of one line: no torn lines
                    f.write(message + "\n")
            except OSError as e:  # the message is in the log anyway
                print(f"megasmoe: cannot write {marker}: {e}", file=sys.stderr, flush=True)
        self._exit(LOST_EXIT_CODE)

    # ------------------------------------------------------------------ the end

    def stop(self, failing: bool = False) -> None:
        """Stop watching. A clean stop marks this rank done first (peers will not call it
        lost). With ``failing`` (the rank is ending on an exception, which a dead peer may
        have caused) it first watches every rank until each has beaten twice (no peer
        lost: the exception is the error to report) or up to ``lost_after_s`` + 2 beats
        for the verdict, so that the exit names the lost peer, not a socket error.
        Never blocks on the store: at most a few seconds when it does not answer."""
        if failing and self._judge.is_alive():
            self._failing.set()
            deadline = time.monotonic() + self.lost_after_s + 2 * HEARTBEAT_S
            while time.monotonic() < deadline and not self._decided.wait(0.1):
                with self._lock:
                    settled = len(self._alive_since_failing | self._done_ranks)
                if settled >= self.world_size - 1:
                    break
            if self.verdict:
                return
        self._finish.set()
        self._io.join(timeout=3 * HEARTBEAT_S)
        self._judge.join(timeout=HEARTBEAT_S)
