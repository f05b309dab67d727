"""Workers die with their launcher; one job per run directory (megasmoe.training.lifecycle, megasmoe.training.runlock).

The first tests are unit tests of the lock and of the death signal (seconds each).
The last three share one real job, `bash launch/pretrain.sh` on 2 CPU processes, in
file order: a second launch on its run directory is refused (by launch/pretrain.sh, and
by the trainer when torchrun is started directly); `kill -9` of its torchrun takes every
worker (and DataLoader worker) with it; the next launch takes the stale lock over and
resumes from the last checkpoint. About two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import BIN, FAST, REPO, read_metrics, run_megasmoe

from megasmoe.config import ConfigError
from megasmoe.training import lifecycle, runlock
from megasmoe.training.runlock import LOCK_NAME, Holder, LockError, RunLock, check_run_lock

TINY = "configs/tiny-cpu.yaml"
HOST = socket.gethostname()
PY = str(BIN / "python")


def _env(**extra) -> dict:
    """This environment without SLURM_* / torchrun variables (pytest may run in a job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _pids_of(marker: str) -> list[int]:
    """Live processes (other than this one) whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _sessions(sids) -> list[int]:
    """Live processes in the sessions ``sids``: a torchrun worker leads a session of its
    own, and everything it starts (DataLoader workers, multiprocessing's resource
    tracker, whatever their command line) stays in it."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) in sids and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _kill_all(pids) -> None:
    """SIGKILL processes this test started (by pid)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_gone(pids, timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; returns those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": HOST, "pid": os.getpid(), "since": "2026-01-02T03:04:05+00:00", **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


# --------------------------------------------------------------------------- the lock


def _lock_holder(run_dir) -> subprocess.Popen:
    """Another process that takes run_dir's lock, prints 'held' and keeps it (5 min)."""
    return subprocess.Popen(
        [PY, "-c", "import sys, time; from megasmoe.training.runlock import RunLock; "
                   "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(300)",
         str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    """A process holding the lock: refused (check and acquire) in one line naming host,
    pid and since when. Killed with -9: the lock is stale and taken over, saying so;
    released: the file is gone."""
    run_dir = tmp_path / "run"
    holder = _lock_holder(run_dir)
    try:
        assert holder.stdout.readline().strip() == "held"
        for attempt in (lambda: check_run_lock(run_dir), lambda: RunLock.acquire(run_dir)):
            with pytest.raises(LockError) as e:
                attempt()
            msg = str(e.value)
            assert "\n" not in msg and isinstance(e.value, ConfigError)
            assert msg.startswith(f"run.dir {run_dir.resolve()} is in use by another job "
                                  f"(host {HOST}, pid {holder.pid}, since 20"), msg
        # Its record names it; a pid that is alive but a newer process is not the holder.
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    check_run_lock(run_dir)  # stale: passes, changes nothing
    assert (run_dir / LOCK_NAME).exists()
    lock = RunLock.acquire(run_dir)
    assert re.fullmatch(rf"megasmoe: stale lock from host {HOST} pid {holder.pid} "
                        rf"\(since 20[^)]*\), taken over: the process is gone", lock.took_over)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()
    with RunLock.acquire(run_dir) as again:  # a released lock is simply free
        assert again.held and again.took_over is None
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_guards_against_pid_reuse_and_reboots(tmp_path):
    """The recorded pid alive but started at another time, or another boot id: stale.
    The flock decides over a record that looks dead."""
    me = Holder.me()
    _write_lock(tmp_path / "a", pid_start=me.pid_start, boot_id=me.boot_id)
    with pytest.raises(LockError):
        check_run_lock(tmp_path / "a")  # this very process, by pid and start time
    _write_lock(tmp_path / "b", pid_start=me.pid_start + 1, boot_id=me.boot_id)
    check_run_lock(tmp_path / "b")
    assert "its pid is another process now" in RunLock.acquire(tmp_path / "b").took_over
    _write_lock(tmp_path / "c", pid_start=me.pid_start, boot_id="another-boot")
    assert "rebooted" in RunLock.acquire(tmp_path / "c").took_over
    # A record of a long-dead pid, but somebody holds the flock: in use.
    path = _write_lock(tmp_path / "d", pid=2**22 + 7)
    holder = subprocess.Popen(
        [PY, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                   "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(300)",
         str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match="is in use by another job"):
            check_run_lock(tmp_path / "d")
    finally:
        holder.kill()
        holder.wait()
    check_run_lock(tmp_path / "d")


def test_lock_of_another_host_asks_slurm(tmp_path, monkeypatch):
    """Another host: SLURM decides (running: refused; gone: taken over); without a SLURM
    job id, or when SLURM cannot be asked, refused naming the file to delete."""
    state = {}
    monkeypatch.setattr(runlock, "slurm_job_state", lambda job: state[job])
    env = {}
    run_dir = tmp_path / "run"
    _write_lock(run_dir, host="gpu-node-7", pid=4242, slurm_job_id="555")
    state["555"] = ("RUNNING", "")
    with pytest.raises(LockError, match=r"in use by another job \(host gpu-node-7, pid 4242, "
                                        r"SLURM job 555, since 2026-01-02 03:04:05"):
        check_run_lock(run_dir, env)
    state["555"] = (None, "squeue is not installed here")
    with pytest.raises(LockError) as e:
        check_run_lock(run_dir, env)
    assert str(e.value).endswith(f"cannot ask SLURM about job 555: squeue is not installed "
                                 f"here; if that job no longer runs, delete "
                                 f"{run_dir.resolve() / LOCK_NAME}")
    for gone in (("", "unknown to SLURM"), ("COMPLETED", ""), ("PENDING", "")):
        state["555"] = gone
        check_run_lock(run_dir, env)
    lock = RunLock.acquire(run_dir, env)
    assert lock.took_over == ("megasmoe: stale lock from host gpu-node-7 pid 4242 (SLURM job "
                              "555, since 2026-01-02 03:04:05+00:00), taken over: SLURM job "
                              "555 is pending")
    lock.release()
    _write_lock(run_dir, host="gpu-node-7", pid=4242)
    with pytest.raises(LockError, match=rf"without a SLURM job id cannot be checked from "
                                        rf"{HOST}; if that job no longer runs, delete "):
        check_run_lock(run_dir, env)


def test_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    """The SLURM pre-flight (launch.preflight) refuses a run dir another job trains in;
    a requeued job (same job id, on any node) passes and takes its own lock over."""
    from megasmoe.launch import preflight

    monkeypatch.setattr(runlock, "slurm_job_state", lambda job: ("RUNNING", ""))
    run_dir = tmp_path / "run"
    _write_lock(run_dir, host="gpu-node-7", pid=4242, slurm_job_id="77")
    alloc = {"SLURM_JOB_NODELIST": HOST, "SLURM_JOB_NUM_NODES": "1",
             "SLURM_TASKS_PER_NODE": "2"}
    args = (TINY, [f"run.dir={run_dir}"])
    with pytest.raises(LockError, match="SLURM job 77"):
        preflight(*args, {**alloc, "SLURM_JOB_ID": "78"}, node_check=False)
    requeued = {**alloc, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    preflight(*args, requeued, node_check=False)
    lock = RunLock.acquire(run_dir, requeued)
    assert "an earlier run of this SLURM job 77, requeued since" in lock.took_over
    assert json.loads((run_dir / LOCK_NAME).read_text())["slurm_restart_count"] == 1
    lock.release()


def test_launch_script_resolves_relative_paths_from_the_callers_directory(tmp_path):
    """`bash <repo>/launch/pretrain.sh cfg.yaml run.dir=run` run from another directory:
    the config is found there and run.dir is there (MEGASMOE_CALLER_DIR), as the refusal
    by the lock of a process holding <that directory>/run shows, before torchrun."""
    (tmp_path / "cfg.yaml").write_text((REPO / TINY).read_text())
    run_dir = tmp_path / "run"
    holder = _lock_holder(run_dir)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "cfg.yaml", "run.dir=run"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=_env())
    finally:
        holder.kill()
        holder.wait()
    expected = (f"megasmoe: config error: run.dir {run_dir} is in use by another job "
                f"(host {HOST}, pid {holder.pid}, since ")
    assert proc.returncode == 2 and proc.stderr.startswith(expected), proc.stderr[-4000:]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------- death signal

_LAUNCHER = textwrap.dedent("""
    # A stand-in for torchrun: starts a worker in a session of its own, prints its pid.
    import os, subprocess, sys, time
    env = {**os.environ, **dict(kv.split("=", 1) for kv in sys.argv[1:])}
    worker = subprocess.Popen([sys.executable, "-c", sys.stdin.read()], env=env,
                              start_new_session=True, stdout=sys.stdout)
    worker.wait()
""")

_WORKER = textwrap.dedent("""
    # A worker: asks to die with its launcher, forks a child (like a DataLoader worker).
    import multiprocessing as mp, os, time
    from megasmoe.training.lifecycle import die_with_launcher
    armed = die_with_launcher()
    child = mp.get_context("fork").Process(target=time.sleep, args=(300,))
    child.start()
    print(os.getpid(), child.pid, armed, flush=True)
    time.sleep(300)
""")


def _launcher(*env: str):
    proc = subprocess.Popen([PY, "-c", _LAUNCHER, *env], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    proc.stdin.write(_WORKER)
    proc.stdin.close()
    return proc


def test_worker_and_its_children_die_with_the_launcher():
    """Under torchrun (TORCHELASTIC_RUN_ID), kill -9 of the launcher kills the worker and
    the child it forked; run alone (no launcher variables) nothing is armed; a worker
    whose launcher is already gone exits at once."""
    started = []
    try:
        armed = _launcher("TORCHELASTIC_RUN_ID=test")
        worker, child, flag = armed.stdout.readline().split()
        started += [int(worker), int(child)]
        alone = _launcher()
        worker2, child2, flag2 = alone.stdout.readline().split()
        started += [int(worker2), int(child2)]
        assert (flag, flag2) == ("True", "False")
        armed.kill()
        alone.kill()
        armed.wait()
        alone.wait()
        assert _wait_gone([int(worker), int(child)], timeout=5) == []
        time.sleep(1)
        assert _alive(int(worker2)) and _alive(int(child2))  # harmless without a launcher
        _kill_all([int(worker2)])
        assert _wait_gone([int(child2)], timeout=5) == []  # forked children die with it
        # The launcher's pid (from launch/pretrain.sh) is not the parent: it is gone.
        late = _launcher("TORCHELASTIC_RUN_ID=test", f"{lifecycle.LAUNCHER_PID_ENV}=1")
        assert late.stdout.readline() == ""
        late.kill()
        late.wait()
        assert "megasmoe: the launcher (torchrun, pid 1) is gone; this worker exits" in \
            late.stderr.read()
    finally:
        _kill_all(started)


# --------------------------------------------------------------------------- real jobs


def _launch_args(run_dir: Path, *overrides: str) -> list[str]:
    return ["bash", "launch/pretrain.sh", TINY, *FAST, "train.steps=1000",
            "checkpoint.interval=2", *overrides, f"run.dir={run_dir}"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """`bash launch/pretrain.sh` (2 processes, one DataLoader worker each) training a long
    run with a checkpoint every 2 steps; yields once it saved one. Killed at the end."""
    run_dir = tmp_path_factory.mktemp("lifecycle") / "run"
    log = run_dir.parent / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_launch_args(run_dir, "data.num_workers=1"), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    info = {"run_dir": run_dir, "proc": proc, "log": log}
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None, f"the job ended (rc={proc.returncode}):\n" \
                                        f"{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint yet:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield info
    finally:
        _kill_all([proc.pid, *_pids_of(f"run.dir={run_dir}")])
        proc.wait()


def test_second_launch_on_a_training_run_dir_is_refused(job):
    """While the job trains, `bash launch/pretrain.sh` on its run directory exits with 2
    and one line naming the holder, before torchrun starts; torchrun started directly
    is refused by the trainer in the same line (no traceback). The run is untouched."""
    run_dir = job["run_dir"]
    lock_before = (run_dir / LOCK_NAME).read_text()
    holder = json.loads(lock_before)
    assert holder["host"] == HOST and _alive(holder["pid"])
    config_mtime = (run_dir / "config.yaml").stat().st_mtime_ns
    try:
        proc = subprocess.run(_launch_args(run_dir), cwd=REPO, capture_output=True,
                              text=True, timeout=60, env=_env())
        direct = run_megasmoe(["pretrain", TINY, *FAST, "train.steps=1000",
                               f"run.dir={run_dir}"], nproc=2, timeout=180, check=False,
                              env=_env(), launcher="torchrun")
    finally:
        _kill_all(set(_pids_of(f"run.dir={run_dir}")) - set(_pids_of("data.num_workers=1")))
    expected = (f"megasmoe: config error: run.dir {run_dir.resolve()} is in use by another job "
                f"(host {HOST}, pid {holder['pid']}, since ")
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr[-4000:]
    assert proc.stderr.startswith(expected), proc.stderr
    # torchrun itself exits with 1 and its ChildFailedError report after any failed worker.
    assert direct.returncode != 0, (direct.stdout[-2000:], direct.stderr[-4000:])
    refusals = [line for line in direct.stderr.splitlines() if line.startswith("megasmoe:")]
    assert len(refusals) == 1 and refusals[0].startswith(expected), direct.stderr[-4000:]
    assert "LockError" not in direct.stderr and "megasmoe: training" not in direct.stdout
    assert "exitcode  : 2" in direct.stderr, direct.stderr[-4000:]  # rank 0's exit code
    assert (run_dir / LOCK_NAME).read_text() == lock_before
    assert (run_dir / "config.yaml").stat().st_mtime_ns == config_mtime
    assert job["proc"].poll() is None  # the first job trains on


def test_kill_9_of_torchrun_kills_every_worker(job):
    """kill -9 of the launcher: no process of the job (workers, their DataLoader workers)
    survives it by more than a few seconds, so nothing writes into the run any more."""
    run_dir, proc = job["run_dir"], job["proc"]
    assert proc.poll() is None, job["log"].read_text()[-4000:]
    workers = [p for p in _pids_of(f"run.dir={run_dir}") if p != proc.pid]
    pids = _sessions(set(workers))
    assert len(pids) >= 4, pids  # 2 workers + their DataLoader workers
    os.kill(proc.pid, signal.SIGKILL)  # launch/pretrain.sh exec'd torchrun: same pid
    proc.wait()
    left = _wait_gone(pids, timeout=10)
    assert left == [], f"still running 10 s after kill -9 of torchrun: {left}"
    assert (run_dir / LOCK_NAME).exists()  # left behind: stale now
    job["killed_step"] = int((run_dir / "checkpoints" / "latest").read_text()[5:])
    job["killed_holder"] = json.loads((run_dir / LOCK_NAME).read_text())["pid"]


def test_next_launch_takes_the_stale_lock_over_and_resumes(job):
    """After kill -9, a new launch on the run directory takes the lock over (one line
    naming the dead holder), resumes from the last checkpoint and releases the lock."""
    if "killed_step" not in job:
        test_kill_9_of_torchrun_kills_every_worker(job)
    run_dir, step = job["run_dir"], job["killed_step"]
    proc = subprocess.run(_launch_args(run_dir, f"train.exit_at_step={step + 1}"), cwd=REPO,
                          capture_output=True, text=True, timeout=240, env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert re.search(rf"^megasmoe: stale lock from host {HOST} pid {job['killed_holder']} "
                     rf"\(since [^)]*\), taken over: the process is gone$", proc.stderr,
                     re.M), proc.stderr[-4000:]
    assert re.search(rf"resumed from \S*iter_{step:07d} at step {step}\b", out), out[-4000:]
    assert max(r["step"] for r in read_metrics(run_dir)) == step + 1
    assert not (run_dir / LOCK_NAME).exists()


def test_slurm_preflight_refuses_bad_data_in_one_line(tmp_path):
    """The SLURM pre-flight checks the data as `megasmoe world-size` does locally (paths,
    index integrity, vocabulary, split) instead of leaving it to every rank."""
    from megasmoe.data.errors import DataError
    from megasmoe.launch import preflight

    alloc = {"SLURM_JOB_NODELIST": HOST, "SLURM_JOB_NUM_NODES": "1",
             "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "91"}
    with pytest.raises(DataError, match="nothing"):
        preflight(TINY, [f"run.dir={tmp_path / 'run'}", "data.source=indexed",
                         f"data.prefixes=[{tmp_path / 'nothing'}]"], alloc, node_check=False)
