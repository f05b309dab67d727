"""The README's two commands work on a fresh checkout: set-up from nothing, idempotent
re-run, and the default pretraining command, verbatim (200 steps).

The work is done once per session by the ``fresh_install`` fixture (tests/fresh_install.py):
it copies the repository (tracked and untracked-but-not-ignored files, i.e. what a clone
plus local edits would hold) into a temporary directory without `.venv/`, runs
`bash launch/setup.sh` there (a fresh virtual environment, torch==2.13.0 (CPU) and
megasmoe installed), runs it again (must be fast and change nothing), then the README's
first command with an empty corpus cache. tests/test_fp8.py reuses that default run as
its fp32 reference.
"""

from __future__ import annotations

import math

from conftest import read_metrics


def test_setup_from_nothing_is_idempotent(fresh_install):
    frozen = fresh_install.frozen
    assert "torch==2.13.0" in frozen and "megatron-core==0.16.1" in frozen
    # The PyPI package named "apex" is an unrelated project and must never come in.
    assert not any(line.lower().startswith("apex==") for line in frozen.splitlines())
    second = fresh_install.second_setup
    assert second.returncode == 0 and second.stdout == "", second.stdout
    assert fresh_install.second_setup_s < 5, fresh_install.second_setup_s
    assert fresh_install.frozen_again == frozen


def test_default_pretraining_command_learns_real_text(fresh_install):
    """The README's first command, verbatim, with an empty corpus cache (first use builds
    the tokenizer and the indexed dataset): validation loss ends clearly below ln V."""
    run = fresh_install.default_run
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "tensorboard --logdir" in run.stdout
    run_dir = fresh_install.run_dir
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps[-1] == 200
    valid = [r["valid/loss"] for r in records if "valid/loss" in r]
    assert valid[-1] < math.log(4096) - 2.0, valid
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert list((run_dir / "plots").glob("expert_load_step_*.png"))
