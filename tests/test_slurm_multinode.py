"""Two SLURM nodes on this machine (tests/slurm/two_nodes.sh): `sbatch --nodes=2
--ntasks-per-node=1 launch/pretrain.sh` trains EP=2 across them, one expert shard per
node, with both launchers, and the pre-flight's per-node checks run on both nodes.

Each node is a slurmd in its own network + UTS namespace (hostnames msmoe1, msmoe2), so
the c10d rendezvous and gloo's traffic cross a (virtual) network between two hosts.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, train_losses

SLURM_CONF = "/etc/slurm-2node/slurm.conf"
JOBCOMP = Path("/var/log/slurm-2node/jobcomp.log")
NODE_LOCAL = "/var/tmp/megasmoe-node-local"  # node 2 sees an empty tmpfs there
TINY = "configs/tiny-cpu.yaml"
STEPS = ["train.steps=20", "parallel.ep=2"]
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


def submit(tmp: Path, *args: str, env: dict = None) -> int:
    """sbatch --nodes=2 --ntasks-per-node=1 launch/pretrain.sh ARGS on the 2-node cluster."""
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                           f"--output={tmp}/sbatch-%j.out", "launch/pretrain.sh", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_env(**(env or {})))
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def wait(job: int, timeout: float) -> dict:
    """The job's final record (scontrol while SLURM knows it, else the jobcomp log)."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        proc = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True,
                              text=True, env=_env())
        if proc.returncode == 0 and proc.stdout.strip():
            info = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        elif JOBCOMP.exists():
            recs = [r for r in JOBCOMP.read_text().splitlines() if r.startswith(f"JobId={job} ")]
            info = dict(re.findall(r"(\w+)=(\S*)", recs[-1])) if recs else info
        if info.get("JobState") in FINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", str(job)], env=_env())
    raise AssertionError(f"job {job} not done in {timeout:.0f} s: {info}")


@pytest.fixture(scope="module")
def single_node_losses(tmp_path_factory):
    """The same training as one local 2-process run (torchrun --standalone): the reference."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    proc = subprocess.run(["bash", "launch/pretrain.sh", TINY, *FAST, *STEPS, f"run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_two_nodes_train_ep2_like_one_node(two_nodes, single_node_losses, tmp_path, launcher):
    """2 nodes x 1 task, EP=2 (one expert shard per node), 20 steps and a checkpoint: the
    losses equal the single-node 2-process run's within 1e-6, with either launcher."""
    run_dir = tmp_path / "run"
    job = submit(tmp_path, TINY, *FAST, *STEPS, f"run.dir={run_dir}",
                 env={"MEGASMOE_LAUNCHER": launcher})
    info = wait(job, timeout=420)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert "pre-flight ok: 2 nodes x 1 process per node = 2, launcher " + launcher in log
    assert "on msmoe1 at" in log and "nodes: msmoe[1-2] (2)" in log
    assert "ep=2" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 21))
    worst = max(abs(losses[s] - single_node_losses[s]) for s in losses)
    assert worst <= 1e-6, f"max |loss difference| = {worst}"


def test_preflight_refuses_a_node_that_cannot_see_the_run_dir(two_nodes, tmp_path):
    """run.dir on a directory node 2 does not share (its own tmpfs there): the job fails
    before training with exit 2 and one line naming node msmoe2."""
    run_dir = Path(NODE_LOCAL) / f"run-{os.getpid()}-{time.monotonic_ns()}"
    job = submit(tmp_path, TINY, *FAST, *STEPS, f"run.dir={run_dir}")
    info = wait(job, timeout=180)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{log}"
    errors = [line for line in log.splitlines() if re.match(r"megasmoe: \w+ error:", line)]
    assert len(errors) == 1 and errors[0].startswith(
        f"megasmoe: launch error: node msmoe2 does not see the run directory {run_dir}"), log
    assert "megasmoe: training" not in log
