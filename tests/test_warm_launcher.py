"""tests/warm_launcher.py, the suite's launcher: a run forked from the warm interpreter is
the run torchrun starts (every metric bit for bit but timings and peak RSS, which is lower:
forked ranks share the imported libraries' pages, so tests/test_plan_memory.py measures
under torchrun), a failed rank ends the others with its exit code, and a timeout kills
the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import FAST, REPO, launch, read_metrics, run_megasmoe


def test_a_warm_run_logs_what_the_same_torchrun_run_logs(tmp_path):
    args = ["pretrain", "configs/tiny-cpu.yaml", *FAST, "train.steps=3"]
    runs = {}
    for launcher in ("warm", "torchrun"):
        run_dir = tmp_path / launcher
        proc = run_megasmoe([*args, f"run.dir={run_dir}"], nproc=2, launcher=launcher)
        assert "on 2 CPU process(es): tp=1 pp=1 ep=2 dp=2" in proc.stdout, proc.stdout
        # Timings vary, and so does peak RSS: forked ranks share the imported pages.
        runs[launcher] = [{k: v for k, v in r.items()
                           if not any(s in k for s in ("time", "per_sec", "mem_gb"))}
                          for r in read_metrics(run_dir)]
    assert len(runs["warm"]) >= 3 and runs["warm"] == runs["torchrun"]


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "ranks.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_the_first_failed_rank_ends_the_others_and_sets_the_exit_code(tmp_path):
    script = _script(tmp_path, """
        import os, sys, time
        if os.environ["RANK"] == "1":
            print("rank 1 fails", file=sys.stderr)
            sys.exit(3)
        print("rank 0 of", os.environ["WORLD_SIZE"], "waits", flush=True)
        time.sleep(600)
    """)
    start = time.monotonic()
    proc = launch([script], nproc=2, timeout=120, launcher="warm")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert time.monotonic() - start < 60  # rank 0 was ended, not waited for
    assert proc.stdout == "rank 0 of 2 waits\n" and "rank 1 fails" in proc.stderr


def test_a_timeout_kills_every_rank(tmp_path):
    marker = tmp_path / "pids"
    script = _script(tmp_path, f"""
        import os, time
        with open({str(marker)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(600)
    """)
    with pytest.raises(subprocess.TimeoutExpired):
        launch([script], nproc=2, timeout=8, launcher="warm")
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) == 2
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                    timeout=10)
    assert not alive, alive


def test_the_server_ends_with_the_session_that_started_it(tmp_path):
    """A test session killed with SIGKILL runs no atexit hook: its server notices within
    PARENT_CHECK_S that its parent is gone, and ends."""
    code = ("import sys, time; sys.path.insert(0, 'tests'); import warm_launcher as w; "
            "w._Server.socket_path(w.Path('.')); print(w._Server.proc.pid, flush=True); "
            "time.sleep(600)")
    session = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    try:
        server = psutil.Process(int(session.stdout.readline()))
        assert server.is_running()
    finally:
        os.kill(session.pid, signal.SIGKILL)
        session.wait()
    server.wait(timeout=30)  # raises psutil.TimeoutExpired if it outlives the session
