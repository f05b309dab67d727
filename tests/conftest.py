"""Shared test helpers: run real megasmoe jobs (gloo ranks; tests/warm_launcher.py or torchrun)
and read their outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import warm_launcher

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

# The embedded corpus is tokenized once per machine into this cache (gitignored) and
# shared by every test run; tests of the first-use path point MEGASMOE_CACHE elsewhere.
os.environ.setdefault("MEGASMOE_CACHE", str(REPO / ".megasmoe-cache"))

# A small, fast model for multi-process tests (the default config's shape, fewer steps).
FAST = [
    "train.warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.eval_iters=1",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "logging.progress=false",
    "logging.heatmaps=false",  # drawn in the README's default run (tests/test_install.py)
]


free_port = warm_launcher.free_port
"""A TCP port free on 127.0.0.1 now (the launcher's own, shared by the test files)."""

LAUNCHER = os.environ.get("MEGASMOE_TEST_LAUNCHER", "warm")
"""How ``launch`` starts processes: "warm" (tests/warm_launcher.py: forked from one
interpreter that imported torch, megatron-core and megasmoe once) or "torchrun"."""


def launch(argv: list[str], nproc: int = 1, timeout: float = 600, env: dict | None = None,
           launcher: str | None = None, rank_env: bool = False) -> subprocess.CompletedProcess:
    """``python ARGV`` (``-m MODULE ...`` or ``SCRIPT ...``) as ``nproc`` gloo ranks from the
    repository root, OMP_NUM_THREADS=1. One process gets the launcher's rank variables
    (RANK, WORLD_SIZE, MASTER_ADDR, ...) only with ``rank_env``, as torchrun would give them
    (scripts that start torch.distributed themselves); without, it runs as a command typed
    alone. ``launcher`` (default LAUNCHER): "torchrun" for tests of what torchrun itself
    does (its exit codes and reports on failure)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if (launcher or LAUNCHER) == "warm":
        return warm_launcher.run(argv, nproc, full_env, REPO, timeout, rank_env)
    if nproc == 1 and not rank_env:
        return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, env=full_env)
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", *argv]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def run_megasmoe(args: list[str], nproc: int = 1, timeout: int = 600,
                 env: dict | None = None, check: bool = True,
                 launcher: str | None = None) -> subprocess.CompletedProcess:
    """Run ``megasmoe <args>`` with ``nproc`` gloo processes (``launch``)."""
    proc = launch(["-m", "megasmoe.cli", *args], nproc, timeout, env, launcher)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"megasmoe {' '.join(args)} failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """{step: train/loss} from metrics.jsonl (log_interval=1 gives every step)."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def pretrain(tmp_path: Path, name: str, overrides: list[str], nproc: int,
             config: str = "configs/tiny-cpu.yaml") -> Path:
    """Train a run in ``tmp_path/name``; returns its run directory."""
    run_dir = tmp_path / name
    run_megasmoe(["pretrain", config, *FAST, f"run.dir={run_dir}", *overrides], nproc=nproc)
    return run_dir


def repo_files() -> list[str]:
    """What a clone plus local edits holds: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f and (REPO / f).is_file()]


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO


# The tiny default model trained a little (EP=2 over 2 processes, the default layout),
# shared by the evaluation, steering and training-free tests: one training, many readers.
# Readers must not write into it except under <run>/eval/ with their own --name, and must
# copy it (shutil.copytree) before anything that changes checkpoints.
TRAINED_TINY_STEPS = 30
TRAINED_TINY_OVERRIDES = [
    f"train.steps={TRAINED_TINY_STEPS}",
    f"train.eval_interval={TRAINED_TINY_STEPS}",
    "train.eval_iters=2",
]


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory) -> Path:
    """Run directory of configs/tiny-cpu.yaml (FAST) trained TRAINED_TINY_STEPS steps at EP=2,
    with a final checkpoint and one valid/loss record at the last step."""
    return pretrain(tmp_path_factory.mktemp("shared_trained"), "tiny", TRAINED_TINY_OVERRIDES,
                    nproc=2)


@pytest.fixture(scope="session")
def fresh_install(tmp_path_factory):
    """The README's set-up and first command on a fresh copy (tests/fresh_install.py)."""
    from fresh_install import fresh_install as run

    return run(tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="module")
def cluster():
    """A running single-node SLURM cluster (started here if it is not up); its node name."""
    proc = subprocess.run(["bash", str(REPO / "tests/slurm/start_cluster.sh")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"start_cluster.sh failed:\n{proc.stdout}\n{proc.stderr}"
    info = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t %c"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert int(info[2]) >= 2, f"the test node needs 2 CPUs, sinfo says {info}"
    return info[0]
