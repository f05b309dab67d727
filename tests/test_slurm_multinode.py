"""Two SLURM nodes on this machine (tests/slurm/two_nodes.sh): `sbatch --nodes=2
--ntasks-per-node=1 launch/pretrain.sh` trains EP=2 across them, one expert shard per
node, with both launchers; a lost node ends the job's survivors promptly and the job is
requeued and resumes; the time-limit requeue resumes on both nodes; the pre-flight's
per-node checks run on both nodes.

Each node is a slurmd in its own network + UTS namespace (hostnames msmoe1, msmoe2), so
the c10d rendezvous and gloo's traffic cross a (virtual) network between two hosts.

CI budget (the issue: at most 5 minutes for the 2-node tests on 2 cores): job starts
dominate (pre-flight on both nodes, torch imports, rendezvous), so few jobs do many
checks. One torchrun job (``torchrun_job``) loses node 2 twice, first its training
processes, then the whole node (slurmd too), is requeued twice and finishes its 20 steps:
it is the torchrun training test and both lost-node tests. One srun-launcher job
(``srun_job``) gets its time-limit signal, is requeued and finishes its 20 steps: the
srun training test and the time-limit test. The single-node reference runs beside them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, read_metrics, train_losses

SLURM_CONF = "/etc/slurm-2node/slurm.conf"
JOBCOMP = Path("/var/log/slurm-2node/jobcomp.log")
NODE_LOCAL = "/var/tmp/megasmoe-node-local"  # node 2 sees an empty tmpfs there
TINY = "configs/tiny-cpu.yaml"
STEPS = ["train.steps=20", "parallel.ep=2"]
COLLECTIVE_TIMEOUT_S = 5
LOST = [f"train.collective_timeout={COLLECTIVE_TIMEOUT_S}s", "checkpoint.interval=4",
        "checkpoint.keep_last=0"]
# What node 1's training processes may take beyond the collective timeout to be gone after
# node 2 was lost: the watchdog's heartbeat (1 s) and check (0.25 s), its exit, torchrun
# noticing its worker's exit and ending, on a loaded 2-core machine.
MARGIN_S = 15
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "SLURM_CONF": SLURM_CONF, **extra}


@pytest.fixture(scope="module")
def two_nodes():
    """The 2-node cluster, started here if it is not up (beside the single-node one)."""
    proc = subprocess.run(["bash", str(REPO / "tests/slurm/start_cluster.sh"), "--nodes", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"start_cluster.sh --nodes 2 failed:\n{proc.stderr}"


def submit(tmp: Path, *args: str, env: dict = None, opts: tuple = ()) -> int:
    """sbatch --nodes=2 --ntasks-per-node=1 launch/pretrain.sh ARGS on the 2-node cluster."""
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", *opts,
                           f"--output={tmp}/sbatch-%j.out", "launch/pretrain.sh", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_env(**(env or {})))
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def job_info(job: int) -> dict:
    """The job's record (scontrol while SLURM knows it, else the jobcomp log)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True,
                          text=True, env=_env())
    if proc.returncode == 0 and proc.stdout.strip():
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    if JOBCOMP.exists():
        recs = [r for r in JOBCOMP.read_text().splitlines() if r.startswith(f"JobId={job} ")]
        return dict(re.findall(r"(\w+)=(\S*)", recs[-1])) if recs else {}
    return {}


def until(what: str, check, timeout: float, job: int = None, poll: float = 0.2):
    """Poll ``check()`` until it is truthy (returned); fail naming ``what`` (and cancel
    ``job``) after ``timeout`` seconds or when the job ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if job is not None and job_info(job).get("JobState") in FINAL:
            value = check()
            if value:
                return value
            raise AssertionError(f"job {job} ended before {what}: {job_info(job)}")
        time.sleep(poll)
    if job is not None:
        subprocess.run(["scancel", str(job)], env=_env())
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def wait(job: int, timeout: float) -> dict:
    """The job's final record."""
    return until(f"job {job} done", lambda: (job_info(job).get("JobState") in FINAL
                                             and job_info(job)), timeout, poll=1)


def job_log(run_dir: Path, job: int) -> str:
    path = run_dir / "logs" / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def last_step(run_dir: Path, skip: int = 0) -> int:
    """The last trained step in metrics.jsonl after its first ``skip`` train records."""
    try:
        steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0
    return steps[-1] if len(steps) > skip else 0


def train_records(run_dir: Path) -> int:
    try:
        return sum("train/loss" in r for r in read_metrics(run_dir))
    except (OSError, ValueError):
        return 0


def training_pids(node: int, job: int) -> list[int]:
    """The job's training processes on node ``node`` (torchrun, its workers, their
    helpers; not slurmd, slurmstepd, srun or the batch script)."""
    out = subprocess.run(["ip", "netns", "pids", f"msmoe-n{node}"], capture_output=True,
                         text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() not in env:
            continue
        exe = os.path.basename(argv[0].decode())
        line = b" ".join(argv).decode(errors="replace")
        if exe not in ("srun", "bash", "sh", "slurmstepd") and (
                "megasmoe.cli" in line or "torchrun" in line or "srun-task" in line):
            pids.append(pid)
    return pids


def node_pids(node: int) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", f"msmoe-n{node}"], capture_output=True,
                         text=True).stdout.split()
    return list(map(int, out))


def kill_and_time(job: int, pids: list[int]) -> float:
    """kill -9 ``pids``; seconds until none of the job's training processes on node 1 is left."""
    assert pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = time.monotonic()
    until("node 1's training processes gone after node 2 was lost",
          lambda: not training_pids(1, job), COLLECTIVE_TIMEOUT_S + MARGIN_S + 60, poll=0.1)
    return time.monotonic() - killed


def checkpoint_state(run_dir: Path) -> tuple[str, str]:
    """(what ``latest`` names, why that checkpoint is incomplete or '' if it is complete)."""
    from megasmoe.checkpoint import verify_checkpoint

    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return name, verify_checkpoint(run_dir / "checkpoints" / name) or ""


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training as one local 2-process run (torchrun --standalone): started at
    once, beside the SLURM jobs; call it for its losses."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    proc = subprocess.Popen(["bash", "launch/pretrain.sh", TINY, *FAST, *STEPS,
                             f"run.dir={run_dir}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    losses: dict = {}

    def get() -> dict:
        if not losses:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-3000:]
            losses.update(train_losses(run_dir))
        return losses

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_like_reference(run_dir: Path, reference) -> None:
    losses, ref = train_losses(run_dir), reference()
    assert sorted(losses) == list(range(1, 21))
    worst = max(abs(losses[s] - ref[s]) for s in losses)
    assert worst <= 1e-6, f"max |loss difference| = {worst}"


# --------------------------------------------------------------------------- the torchrun job


@pytest.fixture(scope="module")
def torchrun_job(two_nodes, reference, tmp_path_factory):
    """2 nodes x 1 task, torchrun, EP=2, 20 steps, a checkpoint every 4 steps. Start 1:
    after step 6 (checkpoint 4 complete, 8 not begun) every training process of node 2
    gets kill -9. Start 2 (requeued): after step 10 (checkpoint 8), node 2 dies whole
    (its slurmd, slurmstepd and training processes: kill -9 of everything in its
    namespace), then "reboots" (its slurmd starts again). Start 3 finishes."""
    tmp = tmp_path_factory.mktemp("torchrun_job")
    run_dir = tmp / "run"
    t0 = time.monotonic()
    # The batch script kills a step that still runs 5 s after the loss (default 30 s).
    job = submit(tmp, TINY, *FAST, *STEPS, *LOST, f"run.dir={run_dir}",
                 env={"MEGASMOE_LOST_GRACE_S": "5"})
    events = []
    for start, after_step in ((1, 5), (2, 9)):
        skip = train_records(run_dir)
        until(f"start {start} trained past step {after_step}",
              lambda: (f"job {job} start {start} " in job_log(run_dir, job)
                       and last_step(run_dir, skip) > after_step), 300, job=job)
        pids = training_pids(2, job) if start == 1 else node_pids(2)
        took = kill_and_time(job, pids)
        latest, incomplete = checkpoint_state(run_dir)
        events.append({"took": took, "latest": latest, "incomplete": incomplete,
                       "killed": len(pids)})
        if start == 2:
            proc = subprocess.run(["bash", str(REPO / "tests/slurm/two_nodes.sh"), "start"],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
    info = wait(job, 400)
    log = job_log(run_dir, job)
    print(f"torchrun job {job}: {time.monotonic() - t0:.0f} s, {events}", file=sys.stderr)
    return {"job": job, "run_dir": run_dir, "info": info, "log": log, "events": events}


def test_torchrun_two_nodes_train_ep2_like_one_node(torchrun_job, reference):
    """2 nodes x 1 task, EP=2 (one expert shard per node), 20 steps and a checkpoint with
    the torchrun launcher: the losses equal the single-node 2-process run's within 1e-6
    (steps 1-20; those trained again after a requeue: the last time)."""
    run_dir, log = torchrun_job["run_dir"], torchrun_job["log"]
    assert torchrun_job["info"]["JobState"] == "COMPLETED", f"{torchrun_job['info']}\n{log[-6000:]}"
    assert "pre-flight ok: 2 nodes x 1 process per node = 2, launcher torchrun" in log
    assert "on msmoe1 at" in log and "nodes: msmoe[1-2] (2)" in log
    assert "ep=2" in log and "--kill-on-bad-exit" not in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    assert_like_reference(run_dir, reference)


@pytest.mark.parametrize("start, what", [(1, "training processes"), (2, "whole node")])
def test_lost_node_ends_the_survivors_and_the_job_resumes(torchrun_job, reference, start, what):
    """kill -9 of node 2's training processes (start 1), of everything on node 2, slurmd
    included (start 2): node 1's training processes are gone within collective_timeout +
    MARGIN_S, with one line naming the lost rank on msmoe2 and the last complete
    checkpoint, which is what `latest` names (never a half-written one); the batch script
    requeues the job, which resumes from it with the next-step loss of an uninterrupted
    run."""
    job, run_dir, log = torchrun_job["job"], torchrun_job["run_dir"], torchrun_job["log"]
    event = torchrun_job["events"][start - 1]
    this, _, rest = log.partition(f"==== megasmoe job {job} start {start} ")[2].partition(
        f"==== megasmoe job {job} start {start + 1} ")
    assert rest, log[-6000:]
    assert event["took"] < COLLECTIVE_TIMEOUT_S + MARGIN_S, (event, this[-4000:])
    lost = re.findall(r"megasmoe: lost rank \d \(node msmoe2\): .*", this)
    assert lost, this[-4000:]
    assert "(seen by rank" in lost[0] and "on msmoe1)" in lost[0], lost
    m = re.search(r"last complete checkpoint: \S*/(iter_\d+)", lost[0])
    assert m, lost[0]
    assert event["latest"] == m.group(1) and not event["incomplete"], event
    assert f"megasmoe: lost a node: requeueing job {job} ({start} of at most 3)" in this
    saved = int(m.group(1)[5:])
    assert re.search(rf"resumed from \S*{m.group(1)} at step {saved}\b", rest), rest[-4000:]
    assert train_losses(run_dir)[saved + 1] == pytest.approx(reference()[saved + 1], abs=1e-6)


# --------------------------------------------------------------------------- the srun job


@pytest.fixture(scope="module")
def srun_job(two_nodes, tmp_path_factory):
    """2 nodes x 1 task, MEGASMOE_LAUNCHER=srun, 20 steps, given its time-limit signal
    once training runs, checkpointed, requeued, finished.

    The signal is the one `--signal=B:USR1@N` makes SLURM send the batch script near the
    time limit, sent by the test (`scancel --batch --signal=USR1`) after step 3: slurmctld
    checks time limits only every 30 s, so a real limit cannot be placed inside a 20-step
    run that takes ~20 s (a `--time=1 --signal=B:USR1@30` job finished before its signal
    once training got faster). tests/test_slurm.py covers the real limit on one node.
    """
    tmp = tmp_path_factory.mktemp("srun_job")
    run_dir = tmp / "run"
    t0 = time.monotonic()
    # --signal: launch/pretrain.sh asks for USR1 300 s before the limit, which with a
    # 5-minute limit is at once: every start was signalled within slurmctld's 30 s check,
    # and the job went through ~8 requeues (340 s) instead of one.
    job = submit(tmp, TINY, *FAST, *STEPS, f"run.dir={run_dir}",
                 env={"MEGASMOE_LAUNCHER": "srun"}, opts=("--time=5", "--signal=B:USR1@30"))
    until("start 1 trained past step 3", lambda: last_step(run_dir) > 3, 300, job=job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True, env=_env())
    until("requeued", lambda: int(job_info(job).get("Restarts", 0)) >= 1, 300, job=job, poll=1)
    info = wait(job, 300)
    print(f"srun job {job}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return {"job": job, "run_dir": run_dir, "info": info, "log": job_log(run_dir, job)}


def test_srun_two_nodes_train_ep2_like_one_node(srun_job, reference):
    """The same with MEGASMOE_LAUNCHER=srun (one `megasmoe pretrain` per task)."""
    run_dir, log = srun_job["run_dir"], srun_job["log"]
    assert srun_job["info"]["JobState"] == "COMPLETED", f"{srun_job['info']}\n{log[-6000:]}"
    assert "pre-flight ok: 2 nodes x 1 process per node = 2, launcher srun" in log
    assert "megasmoe.launch srun-task" in log and "ep=2" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    assert_like_reference(run_dir, reference)


def test_time_limit_requeue_resumes_on_both_nodes(srun_job, reference):
    """The time-limit signal (SIGUSR1): checkpoint, exit 75, requeue; the second start runs
    on both nodes again and resumes from that checkpoint: the next step's loss is the
    uninterrupted run's (each node restored its own expert shard)."""
    job, run_dir, log = srun_job["job"], srun_job["run_dir"], srun_job["log"]
    first, _, rest = log.partition(f"==== megasmoe job {job} start 2 ")
    assert rest, log[-6000:]
    assert log.count(f"==== megasmoe job {job} start ") == 2, log[-6000:]  # one requeue
    assert "forwarding SIGUSR1 to the job step" in first
    m = re.search(r"saved step (\d+), exiting with code 75", first)
    assert m, first[-6000:]
    saved = int(m.group(1))
    assert f"checkpoint iter_{saved:07d} saved; requeueing job {job}" in first
    assert "nodes: msmoe[1-2] (2)" in rest and "pre-flight ok: 2 nodes" in rest
    assert re.search(rf"resumed from \S*iter_{saved:07d} at step {saved}\b", rest), rest
    assert train_losses(run_dir)[saved + 1] == pytest.approx(reference()[saved + 1], abs=1e-6)


# --------------------------------------------------------------------------- pre-flight


def test_preflight_refuses_a_node_that_cannot_see_the_run_dir(two_nodes, tmp_path):
    """run.dir on a directory node 2 does not share (its own tmpfs there): the job fails
    before training with exit 2 and one line naming node msmoe2."""
    run_dir = Path(NODE_LOCAL) / f"run-{os.getpid()}-{time.monotonic_ns()}"
    job = submit(tmp_path, TINY, *FAST, *STEPS, f"run.dir={run_dir}")
    try:
        info = wait(job, timeout=180)
        log = job_log(run_dir, job)
    finally:  # its log is on the host's /var/tmp (node 1's view): do not leave it there
        shutil.rmtree(run_dir, ignore_errors=True)
    assert info["JobState"] == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{log}"
    errors = [line for line in log.splitlines() if re.match(r"megasmoe: \w+ error:", line)]
    assert len(errors) == 1 and errors[0].startswith(
        f"megasmoe: launch error: node msmoe2 does not see the run directory {run_dir}"), log
    assert "megasmoe: training" not in log
