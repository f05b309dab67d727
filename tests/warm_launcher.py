"""A warm launcher for the tests' megasmoe runs: one interpreter imports torch, megatron-core
and megasmoe once, then forks every run's processes from that state.

Why: the suite is ~250 process launches, and each pays ~5 s of imports per process plus
~2.5 s for torchrun's own import of torch, on a 2-core machine (docs/benchmarks.md, "The
test suite, one test at a time"). A forked process starts with all of it imported.

What a run gets is what ``python -m megasmoe.cli ARGS`` gets under a launcher: the same
``megasmoe.cli`` executed as ``__main__`` in a process of its own, with the environment
contract that ``srun`` (the SLURM launcher) and torchrun give every rank: RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; rank 0 hosts the store, as under
srun. One process gets them only if asked (``rank_env``); without, it runs as a command
typed alone.
Like torchrun, the first rank to fail ends the others (SIGTERM, then SIGKILL after 10 s) and
fixes the exit code: here the failed rank's own code (torchrun reports 1).

What it does not cover is torchrun itself: the tests of the commands users type (README,
docs, launch scripts, SLURM, signals, ``kill -9`` of the launcher) start real torchrun and
real srun, and tests/test_warm_launcher.py checks that a run here and the same run under
torchrun log the same losses bit for bit. ``MEGASMOE_TEST_LAUNCHER=torchrun`` sends every
run of tests/conftest.py's ``run_megasmoe`` through torchrun instead.

Protocol (one connection per run, on a Unix socket): the client sends an 8-byte length with
two file descriptors (the run's stdout and stderr), then that many bytes of JSON
``{"argv", "env", "cwd", "nproc", "rank_env"}`` (argv as python's: ``-m MODULE ARGS`` or ``SCRIPT
ARGS``); the server answers one line with the run's process group id (killed on a
timeout), then one line with the exit code. The server is started on first use and ends
with the test session.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = 8
"""Bytes of the request's length header."""

TERM_GRACE_S = 10.0
"""How long the other ranks get between SIGTERM and SIGKILL after one rank failed."""

PARENT_CHECK_S = 2.0
"""How often an idle server checks that the test session that started it still runs."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (tests/conftest.py shares it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client went away")
        buf += chunk
    return buf


WARM_MODULES = (
    "torch._dynamo",  # torch.optim imports it on an optimizer's first parameter group
    "megasmoe.checkpoint",
    "megasmoe.cli",
    "megasmoe.evaluation.cli",
    "megasmoe.training.trainer",
)
"""What the server imports before it forks anything: what megasmoe's commands import."""


def _warm() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)


def _worker(req: dict, rank: int, port: int, fds: list[int]) -> None:
    """A rank: stdio to the client's files, the request's environment, the module or
    script as __main__; never returns."""
    import runpy
    import threading
    import traceback

    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                          else signal.SIG_DFL)
        os.chdir(req["cwd"])
        env = dict(req["env"])
        nproc = req["nproc"]
        if nproc > 1 or req["rank_env"]:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.clear()
        os.environ.update(env)
        argv = req["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as python does
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - a rank's crash is reported like python's
            traceback.print_exc()
            code = 1
        # What the interpreter does at exit: join threads, run atexit hooks, flush.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _leader(conn: socket.socket, req: dict, fds: list[int]) -> None:
    """One run: its own process group (the client kills it on a timeout), one forked
    process per rank, torchrun's rule on failure; writes the exit code; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.sendall(f"{os.getpgid(0)}\n".encode())
        port = free_port()
        ranks = set()  # pids of the ranks still running
        for rank in range(req["nproc"]):
            pid = os.fork()
            if pid == 0:
                conn.close()
                _worker(req, rank, port, fds)
            ranks.add(pid)
        for fd in fds:
            os.close(fd)
        code = 0
        deadline = None
        while ranks:
            if deadline is not None and time.monotonic() > deadline:
                for pid in ranks:
                    os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(0.05)
                continue
            ranks.discard(pid)
            rc = os.waitstatus_to_exitcode(status)
            if rc != 0 and code == 0:
                code = rc if rc > 0 else 128 - rc
                for other in ranks:
                    os.kill(other, signal.SIGTERM)
                deadline = time.monotonic() + TERM_GRACE_S
        conn.sendall(f"{code}\n".encode())
    finally:
        os._exit(0)


def serve(path: str) -> None:
    """Warm up, listen on ``path``, say "ready" on stdout, fork a leader per connection."""
    _warm()
    import threading

    # fork() copies only the calling thread: a second thread here would be lost mid-flight.
    assert threading.active_count() == 1, threading.enumerate()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # leaders are reaped by the kernel
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(PARENT_CHECK_S)
    print("ready", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except (TimeoutError, socket.timeout):
            if os.getppid() != parent:  # the test session is gone (killed): so are we
                import shutil

                shutil.rmtree(os.path.dirname(path), ignore_errors=True)
                return
            continue
        try:
            header, fds, _, _ = socket.recv_fds(conn, PREFIX, 2)
            req = json.loads(_recv_exact(conn, int(header.decode())))
        except (ConnectionError, ValueError):
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _leader(conn, req, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


# ------------------------------------------------------------------ client


class _Server:
    """The session's server process (started on first use, killed at exit)."""

    proc: subprocess.Popen | None = None
    path: str = ""

    @classmethod
    def socket_path(cls, cwd: Path) -> str:
        if cls.proc is None or cls.proc.poll() is not None:
            folder = tempfile.mkdtemp(prefix="megasmoe-warm-")
            cls.path = os.path.join(folder, "sock")
            log = open(os.path.join(folder, "server.log"), "w")
            cls.proc = subprocess.Popen(
                [sys.executable, __file__, cls.path], cwd=cwd, stdout=subprocess.PIPE,
                stderr=log, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = cls.proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"the warm launcher did not start (see {log.name})")
            atexit.register(cls.stop, cls.proc, folder)
        return cls.path

    @staticmethod
    def stop(proc: subprocess.Popen, folder: str) -> None:
        """Kill the server and remove its socket's folder."""
        import shutil

        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def run(argv: list[str], nproc: int, env: dict, cwd: Path, timeout: float,
        rank_env: bool = False) -> subprocess.CompletedProcess:
    """``python ARGV`` as ``nproc`` ranks forked from the warm interpreter (rank variables
    as srun/torchrun give them when nproc > 1 or ``rank_env``); exit code, stdout, stderr."""
    path = _Server.socket_path(cwd)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        body = json.dumps({"argv": argv, "env": env, "cwd": str(cwd), "nproc": nproc,
                           "rank_env": rank_env}).encode()
        socket.send_fds(conn, [f"{len(body):0{PREFIX}d}".encode()], [out.fileno(), err.fileno()])
        conn.sendall(body)
        reply = conn.makefile("r")
        pgid = int(reply.readline())
        conn.settimeout(timeout)
        try:
            code = int(reply.readline())
        except (TimeoutError, socket.timeout):
            os.killpg(pgid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(["python", *argv], timeout) from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["python", *argv], code,
                                           out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


if __name__ == "__main__":
    serve(sys.argv[1])
