"""`sbatch launch/pretrain.sh` end to end under a real SLURM controller on this machine.

The module fixture starts a single-node cluster (tests/slurm/start_cluster.sh: Debian's
slurmctld + slurmd + munge, 2 CPUs) unless it runs already. Every job trains the tiny
config on 2 tasks (CPU, gloo) through the batch script as a user would submit it, and
the tests read what SLURM and the run directory say afterwards: job state and exit
code, the per-job log in <run dir>/logs/, checkpoints, metrics.jsonl.

Jobs run one after another (each takes both CPUs). About 4-5 minutes in all.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, read_metrics, train_losses

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOBCOMP = Path("/var/log/slurm/jobcomp.log")
TINY = "configs/tiny-cpu.yaml"


def _clean_env() -> dict:
    """This environment without SLURM_* (pytest itself may run inside an allocation)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def sbatch(tmp_path: Path, *args: str, sbatch_opts: tuple = (), env: dict = None) -> int:
    """Submit launch/pretrain.sh with 2 tasks on one node; returns the job id."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2",
           f"--output={tmp_path}/sbatch-%j.out", *sbatch_opts, "launch/pretrain.sh", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**_clean_env(), **(env or {})})
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return int(proc.stdout.strip().split(";")[0])


def job_info(job: int) -> dict:
    """`scontrol show job` as a dict; after SLURM forgot the job, its jobcomp record."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True,
                          text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    if JOBCOMP.exists():
        records = [line for line in JOBCOMP.read_text().splitlines()
                   if line.startswith(f"JobId={job} ")]
        if records:
            return dict(re.findall(r"(\w+)=(\S*)", records[-1]))
    raise AssertionError(f"SLURM knows nothing of job {job}: {proc.stderr}")


def wait_job(job: int, timeout: float, until=None) -> dict:
    """Poll until the job reaches a final state (or ``until(info)`` holds); returns its info."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = job_info(job)
        if (until or (lambda i: i.get("JobState") in FINAL))(info):
            return info
        time.sleep(1)
    subprocess.run(["scancel", str(job)])
    raise AssertionError(f"job {job} not done within {timeout:.0f}s: {info}")


def job_log(run_dir: Path, job: int) -> str:
    """The log the batch script writes into the run directory."""
    path = run_dir / "logs" / f"slurm-{job}.out"
    assert path.is_file(), f"no job log {path}"
    return path.read_text()


def latest(run_dir: Path) -> str:
    """The checkpoint the `latest` marker names."""
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_contiguous(run_dir: Path, last: int) -> None:
    """metrics.jsonl: every step 1..last exactly once, in order, each with a loss."""
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == list(range(1, last + 1)), f"steps logged: {steps}"


# --------------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def first_job(cluster, tmp_path_factory):
    """One job trained to step 10 of 20 (train.exit_at_step=10) in a fresh run dir."""
    tmp = tmp_path_factory.mktemp("slurm_resume")
    run_dir = tmp / "run"
    job = sbatch(tmp, TINY, *FAST, "train.steps=20", "train.exit_at_step=10",
                 f"run.dir={run_dir}")
    info = wait_job(job, timeout=300)
    return tmp, run_dir, job, info


def test_sbatch_trains_two_tasks_and_checkpoints(first_job):
    """A plain `sbatch launch/pretrain.sh ...` completes under slurmctld with 2 gloo ranks."""
    tmp, run_dir, job, info = first_job
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert info.get("ExitCode", "0:0") == "0:0"
    # The SLURM --output file only points to the run directory's log.
    assert f"logs to {run_dir.resolve()}/logs/slurm-{job}.out" in \
        (tmp / f"sbatch-{job}.out").read_text()
    assert "pre-flight ok: 1 node x 2 processes per node = 2" in log
    assert "--nproc-per-node=2" in log and "--rdzv-backend=c10d" in log
    assert "on 2 CPU process(es)" in log
    assert latest(run_dir) == "iter_0000010"
    assert (run_dir / "checkpoints" / "iter_0000010" / "megasmoe.json").is_file()
    assert_contiguous(run_dir, 10)


def test_second_sbatch_resumes_the_run_dir(first_job, tmp_path):
    """A second job on the same run directory resumes from its checkpoint and finishes.

    It runs with MEGASMOE_LAUNCHER=srun (one `megasmoe pretrain` per SLURM task, no
    torchrun), so both launchers train for real in this module.
    """
    _, run_dir, _, first = first_job
    assert first["JobState"] == "COMPLETED"
    before = train_losses(run_dir)
    job = sbatch(tmp_path, TINY, *FAST, "train.steps=20", f"run.dir={run_dir}",
                 env={"MEGASMOE_LAUNCHER": "srun"})
    info = wait_job(job, timeout=300)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert "launcher srun" in log and "megasmoe.launch srun-task" in log
    assert re.search(r"resumed from \S*iter_0000010 at step 10", log), log[-4000:]
    assert latest(run_dir) == "iter_0000020"
    assert_contiguous(run_dir, 20)
    after = train_losses(run_dir)
    assert all(after[s] == before[s] for s in range(1, 11))  # the first job's records kept


def test_time_limit_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """At the time limit: SIGUSR1 -> checkpoint -> exit 75 -> requeue -> resume -> done.

    `--time=1 --signal=B:USR1@30`: slurmctld looks at time limits every 30 s and may
    signal up to that much early, so the signal comes within the job's first 30 s,
    usually before training runs. The batch script holds it until the log shows the
    trainer running (earlier it would kill workers that have no handler yet), forwards
    it, and requeues after the checkpoint. 200 steps cannot be done in the first 30 s
    (60 could: about 20 s of training on a quiet 2-core machine).
    The requeued job (same id) gets a longer limit from the test (`scontrol update
    TimeLimit=5`): with the same minute it would be signalled again as soon as it
    trained, which is right but would take many requeues.
    """
    run_dir = tmp_path / "run"
    steps = 200
    job = sbatch(tmp_path, TINY, *FAST, f"train.steps={steps}", f"run.dir={run_dir}",
                 sbatch_opts=("--time=1", "--signal=B:USR1@30"))
    info = wait_job(job, timeout=240,
                    until=lambda i: int(i.get("Restarts", 0)) >= 1 or i["JobState"] in FINAL)
    assert int(info.get("Restarts", 0)) >= 1, f"not requeued: {info}\n{job_log(run_dir, job)}"
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=5"], check=True)
    info = wait_job(job, timeout=300)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    first, _, rest = log.partition(f"==== megasmoe job {job} start 2")
    assert rest, log[-6000:]
    # First start: signalled, forwarded once training ran, checkpointed, requeued.
    assert "megasmoe: SIGUSR1" in first and "forwarding SIGUSR1 to the job step" in first
    m = re.search(r"saved step (\d+), exiting with code 75", first)
    assert m, first[-6000:]
    saved = int(m.group(1))
    assert 1 <= saved < steps
    assert f"checkpoint iter_{saved:07d} saved; requeueing job {job}" in first
    # Second start: resumed from that checkpoint and finished.
    assert re.search(rf"resumed from \S*iter_{saved:07d} at step {saved}\b", rest), rest
    assert "job step exited with 0" in rest
    assert latest(run_dir) == f"iter_{steps:07d}"
    assert_contiguous(run_dir, steps)  # no gap, no repeated step across the requeue


@pytest.mark.parametrize("bad, expected", [
    ("parallel.world_size=4",
     "megasmoe: launch error: the config needs 4 processes (parallel.world_size=4) but the "
     "allocation has 1 node x 2 processes per node = 2"),
    ("parallel.tp=3",
     "megasmoe: config error: parallel: world size 2 is not divisible by tp x pp x cp"),
])
def test_layout_that_does_not_fit_fails_before_training(cluster, tmp_path, bad, expected):
    """A layout that does not fit 1 node x 2 tasks: FAILED in seconds, one clear line."""
    run_dir = tmp_path / "run"
    job = sbatch(tmp_path, TINY, *FAST, bad, f"run.dir={run_dir}")
    info = wait_job(job, timeout=120)
    log = job_log(run_dir, job)
    assert info["JobState"] == "FAILED", f"{info}\n{log}"
    assert info.get("ExitCode") == "2:0", info
    errors = [line for line in log.splitlines() if re.match(r"megasmoe: \w+ error:", line)]
    assert len(errors) == 1 and errors[0].startswith(expected), log
    assert "megasmoe: training" not in log and "srun --nodes" not in log
    assert not (run_dir / "checkpoints").exists()
    start = time.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S")
    end = time.strptime(info["EndTime"], "%Y-%m-%dT%H:%M:%S")
    assert time.mktime(end) - time.mktime(start) < 60, info


def test_run_dir_in_use_is_refused_by_the_preflight(cluster, tmp_path):
    """Submitted from another directory with a relative config and run.dir (found there:
    MEGASMOE_CALLER_DIR) whose run directory a live process holds: FAILED with exit 2
    and one line naming the holder, before any training."""
    import socket

    (tmp_path / "cfg.yaml").write_text((REPO / TINY).read_text())
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [str(REPO / ".venv/bin/python"), "-c",
         "import sys, time; from megasmoe.training.runlock import RunLock; "
         "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(300)",
         str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2",
             f"--output={tmp_path}/sbatch-%j.out", str(REPO / "launch/pretrain.sh"),
             "cfg.yaml", *FAST, "run.dir=run"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env={**_clean_env(), "MEGASMOE_ROOT": str(REPO)})
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        job = int(proc.stdout.strip().split(";")[0])
        info = wait_job(job, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    log = job_log(run_dir, job)
    assert info["JobState"] == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{log}"
    errors = [line for line in log.splitlines() if re.match(r"megasmoe: \w+ error:", line)]
    assert len(errors) == 1 and errors[0].startswith(
        f"megasmoe: config error: run.dir {run_dir} is in use by another job (host "
        f"{socket.gethostname()}, pid {holder.pid}, since "), log
    assert "megasmoe: training" not in log and "srun --nodes" not in log


def test_dry_run_prints_per_node_torchrun_commands(tmp_path):
    """`python -m megasmoe.launch --dry-run` for 2 nodes x 8 GPUs: one torchrun per node."""
    env = _clean_env()
    cmd = [str(REPO / ".venv/bin/python"), "-m", "megasmoe.launch", "--dry-run",
           "--nodes", "2", "--nproc-per-node", "8", "--nodelist", "gpu[07-08]",
           "--job-id", "31337", TINY, "parallel.world_size=16",
           "train.micro_batch_size=1", "train.global_batch_size=16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2 nodes x 8 processes per node = 16" in out
    endpoint = "gpu07:" + str(20000 + 31337 % 20000)
    assert f"c10d at {endpoint}" in out
    for i, host in enumerate(["gpu07", "gpu08"]):
        block = out.split(f"# node {i} ({host}):\n", 1)[1].splitlines()[0]
        assert "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d" in block
        assert f"--rdzv-endpoint={endpoint} --rdzv-id=31337" in block
        assert "SIGUSR1" in block  # torchrun forwards the time-limit signal
        assert block.endswith(f"-m megasmoe.cli pretrain {TINY} parallel.world_size=16 "
                              f"train.micro_batch_size=1 train.global_batch_size=16")
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in out
    # The same allocation with a layout that does not fit: plan printed, then one line, 2.
    bad = subprocess.run(cmd[:-3], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "megasmoe: launch error: the config needs 2 processes")


def test_dry_run_without_a_config_plans_the_default_config(capsys):
    """`megasmoe launch --dry-run` without a config plans what `sbatch launch/pretrain.sh`
    without one runs: configs/tiny-cpu.yaml on its 2 processes."""
    import argparse

    from megasmoe.launch import add_subcommand

    parser = argparse.ArgumentParser(prog="megasmoe")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", "--dry-run", "--nodes", "1"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "1 node x 2 processes per node = 2" in out, out
    assert f"-m megasmoe.cli pretrain {REPO / TINY}\n" in out, out


def test_plan_follows_the_slurm_environment():
    """plan() inside a (pretend) 2-node allocation: hosts, port, tasks, CPUs, ranks."""
    from megasmoe.launch import build_plan, expand_hostlist, parse_tasks_per_node, plan

    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                       "login1"]
    assert expand_hostlist("r[1-2]-n[8-9]") == ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]
    assert parse_tasks_per_node("8(x2),4") == [8, 8, 4]
    env = {"SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "gpu[01-02]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "8(x2)",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_CPUS_PER_NODE": "96(x2)"}
    nodes = plan(TINY, ["parallel.world_size=16"], env)
    assert [n.host for n in nodes] == ["gpu01", "gpu02"]
    for n in nodes:
        assert "--nnodes=2" in n.argv and "--nproc-per-node=8" in n.argv
        assert "--rdzv-endpoint=gpu01:20123" in n.argv and "--rdzv-id=123" in n.argv
    lp = build_plan(TINY, [], {**env, "MEGASMOE_LAUNCHER": "srun"})
    assert lp.srun[:5] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8",
                           "--cpus-per-task=12"]
    assert lp.env["OMP_NUM_THREADS"] == "12"
    task = lp.nodes[1].tasks[3]
    assert (task["RANK"], task["LOCAL_RANK"], task["WORLD_SIZE"], task["MASTER_ADDR"],
            task["MASTER_PORT"]) == ("11", "3", "16", "gpu01", "20123")
    uneven = {**env, "SLURM_TASKS_PER_NODE": "8,4"}
    with pytest.raises(Exception, match="different task counts per node"):
        plan(TINY, [], uneven)


def test_launch_subcommand_for_the_megasmoe_command(capsys):
    """add_subcommand() registers `launch` on an argparse subparsers object; its handler
    returns the exit code (what `megasmoe launch ...` will run)."""
    import argparse

    from megasmoe.launch import add_subcommand

    parser = argparse.ArgumentParser(prog="megasmoe")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", "--dry-run", "--nodes", "2", "--nproc-per-node", "1",
                              str(REPO / TINY)])
    assert args.fn(args) == 0
    assert "torchrun --nnodes=2 --nproc-per-node=1" in capsys.readouterr().out
    args = parser.parse_args(["launch", "--dry-run", "--nodes", "3", str(REPO / TINY)])
    assert args.fn(args) == 2
    assert "megasmoe: launch error: the config needs 2 processes" in capsys.readouterr().err
