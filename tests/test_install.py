"""The README's two commands work on a fresh checkout: set-up from nothing, idempotent
re-run, and the default pretraining command (with fewer steps to keep CI short).

Copies the repository (tracked and untracked-but-not-ignored files, i.e. what a clone
plus local edits would hold) into a temporary directory without `.venv/`, then runs
`bash launch/setup.sh` there: a fresh virtual environment, torch==2.13.0 (CPU) and
megasmoe installed. A second run must be fast and change nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from conftest import REPO, repo_files, read_metrics


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory):
    dest = tmp_path_factory.mktemp("fresh") / "megasmoe"
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    return dest


def _run(cmd: str, cwd, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _freeze(venv) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"],
                          capture_output=True, text=True, check=True).stdout


def test_setup_from_nothing_is_idempotent_and_pretraining_runs(fresh_checkout):
    assert not (fresh_checkout / ".venv").exists()
    first = _run("bash launch/setup.sh", fresh_checkout, timeout=1200)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    venv = fresh_checkout / ".venv"
    frozen = _freeze(venv)
    assert "torch==2.13.0" in frozen and "megatron-core==0.16.1" in frozen
    # The PyPI package named "apex" is an unrelated project and must never come in.
    assert not any(line.lower().startswith("apex==") for line in frozen.splitlines())

    start = time.perf_counter()
    second = _run("bash launch/setup.sh", fresh_checkout, timeout=120)
    elapsed = time.perf_counter() - start
    assert second.returncode == 0 and second.stdout == "" and elapsed < 5, (elapsed, second.stdout)
    assert _freeze(venv) == frozen


def test_default_pretraining_command_learns_real_text(fresh_checkout, tmp_path):
    """The README's first command, verbatim, with an empty corpus cache (first use builds
    the tokenizer and the indexed dataset): validation loss ends clearly below ln V."""
    env_cache = f"MEGASMOE_CACHE={tmp_path / 'cache'}"
    run = _run(f"{env_cache} bash launch/setup.sh && {env_cache} bash launch/pretrain.sh",
               fresh_checkout, timeout=1500)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "tensorboard --logdir" in run.stdout
    run_dir = fresh_checkout / "runs" / "tiny-cpu"
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps[-1] == 200
    valid = [r["valid/loss"] for r in records if "valid/loss" in r]
    import math

    assert valid[-1] < math.log(4096) - 2.0, valid
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert list((run_dir / "plots").glob("expert_load_step_*.png"))
