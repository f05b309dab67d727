"""The README's first command on a fresh copy of the repository, done once per session.

Shared by tests/test_install.py (set-up from nothing, idempotence, the default run learns)
and tests/test_fp8.py (whose FP8 training gate compares against this fp32 default run,
the same configs/tiny-cpu.yaml 200 steps, instead of training a second one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, repo_files


@dataclass
class FreshInstall:
    """What the README's commands did in a fresh checkout."""

    checkout: Path
    first_setup: subprocess.CompletedProcess
    frozen: str
    """``pip freeze`` after the first set-up."""
    second_setup: subprocess.CompletedProcess
    second_setup_s: float
    frozen_again: str
    """``pip freeze`` after the second set-up (must equal ``frozen``)."""
    default_run: subprocess.CompletedProcess
    """``bash launch/setup.sh && bash launch/pretrain.sh`` with an empty corpus cache."""

    @property
    def run_dir(self) -> Path:
        """The default run's directory (runs/tiny-cpu of the checkout)."""
        return self.checkout / "runs" / "tiny-cpu"


def run_bash(cmd: str, cwd, timeout: int) -> subprocess.CompletedProcess:
    """``bash -c cmd`` as a user's shell would run it: no virtualenv, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _freeze(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"],
                          capture_output=True, text=True, check=True).stdout


def fresh_install(root: Path) -> FreshInstall:
    """Copy the repository (what a clone plus local edits holds) to ``root`` and run the
    README's commands there: set-up, set-up again, then the first command verbatim."""
    dest = root / "megasmoe"
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    assert not (dest / ".venv").exists()
    first = run_bash("bash launch/setup.sh", dest, timeout=1200)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    frozen = _freeze(dest / ".venv")
    start = time.perf_counter()
    second = run_bash("bash launch/setup.sh", dest, timeout=120)
    second_s = time.perf_counter() - start
    frozen_again = _freeze(dest / ".venv")
    cache = f"MEGASMOE_CACHE={root / 'cache'}"
    default_run = run_bash(f"{cache} bash launch/setup.sh && {cache} bash launch/pretrain.sh",
                           dest, timeout=1500)
    return FreshInstall(dest, first, frozen, second, second_s, frozen_again, default_run)
