"""`megasmoe arena --slurm`, then `--collect`, on the real single-node SLURM test cluster.

The arena submits its cells' training as one job array of slurm/router-sweep.sbatch
(docs/arena.md); each array task is a real `bash launch/pretrain.sh` job step (srun +
torchrun, 2 tasks). Once the array has ended, the same command with `--collect` evaluates
the trained cells here and writes the table. Two routers, one seed, 4 steps each (the
quick preset warms up for 3): the test is about the path through SLURM, not about the
numbers (tests/test_arena.py checks those on a local arena).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import BIN, REPO
from test_slurm import _clean_env, wait_job


def test_arena_array_trains_every_cell_and_collect_writes_the_table(cluster, tmp_path):
    out = tmp_path / "arena"
    arena = [str(BIN / "megasmoe"), "arena", "configs/tiny-cpu.yaml", "--routers", "topk,xmoe",
             "--seeds", "1", "--quick", "train.steps=4", "--out", str(out)]
    env = {**_clean_env(), "OMP_NUM_THREADS": "1"}
    submit = subprocess.run([*arena, "--slurm", "--parallel", "2"], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    tasks = dict(re.findall(r"arena: (\S+): submitted as array task (\d+_\d+)", submit.stdout))
    assert set(tasks) == {"topk-s1234", "xmoe-s1234"}, submit.stdout

    # Collecting while the array still trains is refused in one line (whether a cell is
    # done by now depends on the cluster, so only a refusal is checked, never a result).
    early = subprocess.run([*arena, "--collect"], cwd=REPO, capture_output=True, text=True,
                           env=env, timeout=120)
    if early.returncode != 0:
        assert early.returncode == 2 and "--collect:" in early.stderr, early.stderr

    for cell, task in tasks.items():
        info = wait_job(task, timeout=600)
        log = out / "logs" / f"slurm-{task}.out"
        text = log.read_text() if log.exists() else "(no log)"
        assert info["JobState"] == "COMPLETED", f"{cell}: {info}\n{text[-4000:]}"
        assert f"moe.router.name={cell.split('-s')[0]}" in text, text[-3000:]
        # launch/pretrain.sh moves the job's output into the cell's run directory.
        moved = re.search(r"logs to (\S+)", text)
        assert moved, text[-3000:]
        job_log = Path(moved.group(1)).read_text()
        assert "srun" in job_log and "torchrun" in job_log, job_log[-3000:]  # a job step ran
        assert Path(moved.group(1)).parent.parent == out / "runs" / cell

    collect = subprocess.run([*arena, "--collect"], cwd=REPO, capture_output=True, text=True,
                             env=env, timeout=600)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    # --collect evaluates; it trains nothing (each cell was trained once, by its array task).
    assert ": started" not in collect.stdout, collect.stdout
    assert collect.stdout.count("evaluating (already trained)") == 2, collect.stdout
    for cell in tasks:
        run = out / "runs" / cell
        assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
        logs = "".join(p.read_text() for p in (run / "logs").glob("slurm-*.out"))
        assert logs.count("megasmoe: training") == 1, logs[-3000:]  # trained once, by SLURM
    table = [line for line in (out / "results.md").read_text().splitlines()
             if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in table] == ["topk", "xmoe"]
    data = json.loads((out / "results.json").read_text())
    assert {c["cell"]: c["steps"] for c in data["cells"]} == {"topk-s1234": 4, "xmoe-s1234": 4}
