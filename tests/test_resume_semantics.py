"""What a resumed run logs and which LR schedule it follows (README: Checkpoints and resume)."""

from __future__ import annotations

import math
import shutil

import pytest

from conftest import FAST, read_metrics, run_megasmoe

TINY = "configs/tiny-cpu.yaml"
# log every 4 steps: a stop at step 6 falls mid-window.
BASE = [*FAST, "parallel.world_size=1", "parallel.ep=1", "train.log_interval=4", "train.lr_schedule=cosine", "train.warmup_steps=1"]


def _records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def _train(run_dir, *overrides) -> str:
    proc = run_megasmoe(["pretrain", TINY, *BASE, f"run.dir={run_dir}", *overrides], nproc=1)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """10 steps in one go: the reference every resumed run is compared with."""
    run_dir = tmp_path_factory.mktemp("resume") / "straight"
    _train(run_dir, "train.steps=10")
    return _records(run_dir)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A finished 6-step run; tests continue copies of it."""
    run_dir = tmp_path_factory.mktemp("resume") / "six"
    _train(run_dir, "train.steps=6")
    return run_dir


def test_raising_train_steps_re_spans_the_lr_schedule(tmp_path, uninterrupted, six_steps):
    """A finished 6-step cosine run continued to 10 steps follows the 10-step schedule
    from step 6 on (megatron's default kept the 6-step span: min_lr for every new step)."""
    run_dir = shutil.copytree(six_steps, tmp_path / "raised")
    log = _train(run_dir, "train.steps=10")
    assert "LR schedule follows the config: train.steps 6 -> 10" in log, log
    got = _records(run_dir)
    min_lr = 1e-4  # configs/tiny-cpu.yaml train.min_lr
    assert got[8]["train/lr"] > 2 * min_lr
    assert math.isclose(got[8]["train/lr"], uninterrupted[8]["train/lr"], rel_tol=1e-9)
    assert math.isclose(got[10]["train/lr"], uninterrupted[10]["train/lr"], rel_tol=1e-9)


def test_mid_interval_resume_logs_the_same_loss(tmp_path, uninterrupted):
    """Stopped at step 6 (mid log window, checkpointed) and resumed: the step-8 train/loss
    averages steps 5-8 like the uninterrupted run's, bitwise."""
    run_dir = tmp_path / "stopped"
    _train(run_dir, "train.steps=10", "train.exit_at_step=6")
    assert 6 not in _records(run_dir), "a stop mid-window must leave the window to the checkpoint"
    _train(run_dir, "train.steps=10")
    got = _records(run_dir)
    assert sorted(got) == sorted(uninterrupted) == [4, 8, 10]
    for step in (4, 8, 10):
        assert got[step]["train/loss"] == uninterrupted[step]["train/loss"], step
        assert got[step]["train/lr"] == uninterrupted[step]["train/lr"], step


def test_changed_lr_and_min_lr_apply_after_resume(tmp_path, six_steps):
    """A 6-step run resumed to 10 steps with a new train.lr and train.min_lr follows the new
    schedule, as a 10-step run with those values does from the start. The optimizer's
    state used to bring the old values back with its param groups (megatron's scheduler
    reads max_lr / min_lr there), and the new lr was ignored for the rest of the run."""
    new = ["train.lr=3e-3", "train.min_lr=3e-4"]
    reference = tmp_path / "new_lr"
    _train(reference, "train.steps=10", *new)
    run_dir = shutil.copytree(six_steps, tmp_path / "changed")
    log = _train(run_dir, "train.steps=10", *new)
    assert "train.lr 0.001 -> 0.003" in log, log
    got, want = _records(run_dir), _records(reference)
    for step in (8, 10):
        assert math.isclose(got[step]["train/lr"], want[step]["train/lr"], rel_tol=1e-9), step
