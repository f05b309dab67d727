"""`sbatch launch/eval.sh RUN ...` on the real single-node SLURM test cluster (docs/evaluation.md).

The batch script plans the job step like launch/pretrain.sh (srun + one torchrun per
node) and evaluates the shared trained run (EP=2, 2 tasks) at its own layout: the job
completes, the report says world size 2, and the valid loss over the trainer's own
validation batches (--batches = train.eval_iters) equals the trainer's logged valid/loss.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, TRAINED_TINY_STEPS, read_metrics
from test_slurm import _clean_env, wait_job


def test_sbatch_eval_evaluates_at_the_runs_layout(cluster, trained_tiny_run, tmp_path):
    run = trained_tiny_run
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2",
           f"--output={tmp_path}/eval-%j.out", "launch/eval.sh", str(run),
           "--batches", "2", "--limit", "5", "--name", "slurm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    job = int(proc.stdout.strip().split(";")[0])
    info = wait_job(job, timeout=600)
    log = (tmp_path / f"eval-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    assert "srun" in log and "torchrun" in log, log[-3000:]  # the planned job step ran
    report = json.loads((run / "eval" / "slurm.json").read_text())
    assert report["world_size"] == 2 and report["step"] == TRAINED_TINY_STEPS
    trainer = [r["valid/loss"] for r in read_metrics(run) if "valid/loss" in r][-1]
    assert report["datasets"]["valid"]["loss"] == pytest.approx(trainer, rel=1e-5, abs=0)
    assert set(report["datasets"]) >= {"valid", "test", "austen", "python"}
    assert all(m["items"] == 5 for m in report["mc"].values()), report["mc"]
