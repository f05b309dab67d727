"""Run the arena's cells: each one a normal megasmoe training run, then its evaluation.

A cell is trained by ``bash launch/pretrain.sh CONFIG <overrides>`` (the path every user
run takes: pre-flight, torchrun, run lock) and evaluated by ``megasmoe eval RUN --name
arena`` (valid and test splits, the embedded held-out sets). Its output goes to
``<out>/logs/<cell>.log``; the console gets one progress line per cell. A cell whose run
reached train.steps with its final evaluation is not trained again; a run that stopped
part-way resumes from its checkpoint (megasmoe runs resume when launched on their run
directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from megasmoe.arena.plan import ArenaError, Cell

__all__ = ["REPO", "EVAL_NAME", "trained_step", "evaluated", "cell_state", "record_plan",
           "run_cells", "submit_slurm", "fmt_duration"]

REPO = Path(__file__).resolve().parents[2]
EVAL_NAME = "arena"
"""``megasmoe eval --name``: each cell's report is ``<run>/eval/arena.json``."""


def fmt_duration(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def trained_step(cell: Cell) -> int:
    """The last step of the cell's run that has a valid evaluation (0: none)."""
    path = cell.run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    best = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if "valid/loss" in rec:
            best = max(best, int(rec["step"]))
    return best


def _checkpointed(cell: Cell) -> bool:
    # ``latest`` moves last, atomically, once the checkpoint is complete
    # (megasmoe.checkpoint.store).
    try:
        latest = (cell.run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return False
    return latest == f"iter_{cell.steps:07d}"


def evaluated(cell: Cell) -> Optional[dict]:
    """The cell's ``megasmoe eval`` report at its last step, or None."""
    path = cell.run_dir / "eval" / f"{EVAL_NAME}.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if int(report.get("step", -1)) == cell.steps else None


def cell_state(cell: Cell) -> str:
    """``done`` (trained and evaluated), ``trained``, ``partial`` (resumable) or ``new``."""
    if trained_step(cell) >= cell.steps and _checkpointed(cell):
        return "done" if evaluated(cell) is not None else "trained"
    return "partial" if (cell.run_dir / "checkpoints").is_dir() else "new"


def record_plan(out: Path, config: Optional[str], cells: list) -> None:
    """Write ``<out>/arena.json`` (each cell's command line), refusing a directory whose
    cells of the same name were planned with other overrides (they would be mixed)."""
    path = out / "arena.json"
    known: dict = {}
    if path.is_file():
        try:
            known = json.loads(path.read_text()).get("cells", {})
        except ValueError:
            known = {}
    for c in cells:
        if c.name in known and known[c.name]["overrides"] != c.overrides:
            raise ArenaError(
                f"--out {out}: cell {c.name} was run there with other settings "
                f"({' '.join(known[c.name]['overrides'])}); use another --out or the same "
                "config and overrides")
    known.update({c.name: {"router": c.router, "seed": c.seed, "run_dir": str(c.run_dir),
                           "steps": c.steps, "overrides": c.overrides} for c in cells})
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": str(Path(config).resolve()) if config else None,
                               "cells": known}, indent=1))
    tmp.replace(path)


def _run_logged(cmd: list, log: Path, env: dict) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        t0 = time.monotonic()
        # Same process group as the arena: killing the arena's group ends the cell too.
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
        f.write(f"[arena: exit code {rc} after {time.monotonic() - t0:.1f} s]\n")
        return rc


def _env() -> dict:
    env = dict(os.environ)
    # The arena may run from any directory; the cell's paths are absolute already.
    env["MEGASMOE_CALLER_DIR"] = os.getcwd()
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_command(config: Optional[str], cell: Cell) -> list:
    """``bash launch/pretrain.sh CONFIG <overrides>`` for the cell."""
    return ["bash", str(REPO / "launch" / "pretrain.sh"),
            *([str(Path(config).resolve())] if config else []), *cell.overrides]


def eval_command(cell: Cell) -> list:
    """``megasmoe eval RUN --name arena --batches <eval_iters>``: the valid numbers equal
    the run's final validation; test and the embedded sets on the same number of batches."""
    return [sys.executable, "-m", "megasmoe.cli", "eval", str(cell.run_dir),
            "--name", EVAL_NAME, "--batches", str(cell.eval_iters), "--limit", str(cell.mc_limit)]


def _fail(cell: Cell, what: str, log: Path) -> ArenaError:
    tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    last = f": {tail[0]}" if tail else ""
    return ArenaError(f"cell {cell.name}: {what} failed (log {log}){last}")


def run_cells(config: Optional[str], cells: list, out: Path,
              say: Callable[[str], None] = print) -> None:
    """Train and evaluate every cell in order, skipping finished ones; one line per cell."""
    env = _env()
    start = time.monotonic()
    spent: list[float] = []
    n = len(cells)
    for i, cell in enumerate(cells, 1):
        head = f"arena [{i}/{n}] {cell.name}"
        state = cell_state(cell)
        if state == "done":
            say(f"{head}: skipped (finished: step {cell.steps}, evaluated) | elapsed "
                f"{fmt_duration(time.monotonic() - start)}")
            continue
        left = sum(1 for c in cells[i - 1:] if cell_state(c) != "done")
        eta = fmt_duration(sum(spent) / len(spent) * left) if spent else "?"
        what = {"new": "started", "partial": "resumed from its checkpoint",
                "trained": "evaluating (already trained)"}[state]
        say(f"{head}: {what} | elapsed {fmt_duration(time.monotonic() - start)}, ETA {eta}")
        t0 = time.monotonic()
        log = out / "logs" / f"{cell.name}.log"
        if state != "trained":
            if _run_logged(train_command(config, cell), log, env) != 0:
                raise _fail(cell, "training", log)
            if trained_step(cell) < cell.steps:
                raise _fail(cell, f"training (no evaluation at step {cell.steps})", log)
        if _run_logged(eval_command(cell), log, env) != 0 or evaluated(cell) is None:
            raise _fail(cell, "evaluation", log)
        spent.append(time.monotonic() - t0)
        left = sum(1 for c in cells[i:] if cell_state(c) != "done")
        sets = evaluated(cell)["datasets"]
        ppl = ", ".join(f"{k} ppl {sets[k]['ppl']:.2f}" for k in ("valid", "test") if k in sets)
        say(f"{head}: done in {fmt_duration(spent[-1])} ({ppl}) | elapsed "
            f"{fmt_duration(time.monotonic() - start)}, ETA "
            f"{fmt_duration(sum(spent) / len(spent) * left)}")


def submit_slurm(config: Optional[str], cells: list, out: Path, parallel: int,
                 sbatch_args: list, say: Callable[[str], None] = print) -> Optional[str]:
    """Submit the unfinished cells' training as one job array of slurm/router-sweep.sbatch.

    Each array task reads its overrides from line ``SLURM_ARRAY_TASK_ID`` of
    ``<out>/slurm-tasks.txt``. Returns the job id (None when nothing is left to train);
    ``megasmoe arena ... --collect`` evaluates the trained cells and writes the table.
    """
    import shlex

    todo = [c for c in cells if cell_state(c) in ("new", "partial")]
    if not todo:
        say("arena: every cell is trained; run the same command with --collect")
        return None
    tasks = out / "slurm-tasks.txt"
    out.mkdir(parents=True, exist_ok=True)
    tasks.write_text("".join(" ".join(shlex.quote(o) for o in c.overrides) + "\n"
                             for c in todo))
    cmd = ["sbatch", f"--array=0-{len(todo) - 1}%{parallel}", "--parsable",
           f"--output={out / 'logs' / 'slurm-%A_%a.out'}", *sbatch_args,
           str(REPO / "slurm" / "router-sweep.sbatch"),
           *([str(Path(config).resolve())] if config else [])]
    (out / "logs").mkdir(exist_ok=True)
    env = {**_env(), "SWEEP_TASKS": str(tasks), "MEGASMOE_ROOT": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ArenaError(f"sbatch failed: {proc.stderr.strip() or proc.stdout.strip()}")
    job = proc.stdout.strip().split(";")[0]
    for k, c in enumerate(todo):
        say(f"arena: {c.name}: submitted as array task {job}_{k}")
    return job
