"""``megasmoe arena``: the quick arena end to end, killed after its first cell and re-run.

The command is the one docs/arena.md shows (checked below), with ``--out`` in a scratch
directory. Real runs: each cell is ``bash launch/pretrain.sh`` (torchrun, 2 gloo
processes) and ``megasmoe eval``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO

ARGS = ["configs/tiny-cpu.yaml", "--routers", "topk,xmoe", "--seeds", "1", "--quick",
        "train.steps=4"]
DOC_COMMAND = "megasmoe arena " + " ".join(ARGS)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _arena(out: Path, extra=()) -> list:
    return [str(BIN / "megasmoe"), "arena", *ARGS, "--out", str(out), *extra]


def _digest(run_dir: Path) -> dict:
    """Hash and mtime of every file the training wrote (metrics, checkpoints, events)."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                          p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "eval" not in p.relative_to(run_dir).parts}


def test_docs_show_the_tested_command(repo):
    assert DOC_COMMAND in (repo / "docs" / "arena.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--routers", "topk,xmoee"], "--routers: 'xmoee' is not a registered router (did you "
                                  "mean 'xmoe'?)"),
    (["--routers", "topk", "--seeds", "0"], "--seeds 0: give at least 1 seed"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "arena"
    proc = subprocess.run([str(BIN / "megasmoe"), "arena", "configs/tiny-cpu.yaml", *args,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megasmoe: arena error: {message}"), lines
    assert not out.exists()


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    """The arena killed (SIGKILL to its process group) once its first cell is done, then
    the same command again: (first output, second run, topk digest before, out dir)."""
    out = tmp_path_factory.mktemp("arena") / "quick"
    proc = subprocess.Popen(_arena(out), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    first = []
    deadline = time.monotonic() + 400
    try:
        for line in proc.stdout:
            first.append(line)
            if "topk-s1234: done" in line or time.monotonic() > deadline:
                break
        time.sleep(3)  # the second cell's training has started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any("topk-s1234: done" in line for line in first), "".join(first)
    topk = out / "runs" / "topk-s1234"
    before = _digest(topk)
    again = subprocess.run(_arena(out), cwd=REPO, capture_output=True, text=True,
                           env=_env(), timeout=600)
    return "".join(first), again, before, out


def test_killed_arena_continues_without_retraining(killed_then_rerun):
    first, again, before, out = killed_then_rerun
    assert not (out / "results.md").exists() or "xmoe" in (out / "results.md").read_text()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert any(line.startswith("arena [1/2] topk-s1234: skipped") for line in lines), lines
    assert any(line.startswith("arena [2/2] xmoe-s1234: ")
               and ("started" in line or "resumed" in line) for line in lines), lines
    assert any(line.startswith("arena [2/2] xmoe-s1234: done") for line in lines), lines
    # The finished cell was not touched: same metrics, checkpoint and event files.
    assert _digest(out / "runs" / "topk-s1234") == before
    assert sum("megasmoe: training" in line
               for line in (out / "logs" / "topk-s1234.log").read_text().splitlines()) == 1


def test_table_has_one_row_per_router(killed_then_rerun):
    _, _, _, out = killed_then_rerun
    text = (out / "results.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in table] == ["topk", "xmoe"]
    assert DOC_COMMAND.split(" --quick")[0].replace("megasmoe arena ", "") in text
    data = json.loads((out / "results.json").read_text())
    assert list(data["routers"]) == ["topk", "xmoe"]
    for router, row in data["routers"].items():
        for key in ("valid_ppl", "test_ppl", "tokens_per_sec", "cka_mean_offdiag",
                    "effective_experts"):
            assert row[key]["n"] == 1 and math.isfinite(row[key]["mean"]), (router, key)
        assert row["matching"]
    assert data["routers"]["topk"]["overhead_vs_topk"] == 0
    cells = {c["cell"]: c for c in data["cells"]}
    assert set(cells) == {"topk-s1234", "xmoe-s1234"} and all(c["steps"] == 4
                                                              for c in cells.values())
    # valid perplexity from megasmoe eval equals the run's own final validation
    for name, cell in cells.items():
        records = [json.loads(x) for x in
                   (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        logged = [r["valid/ppl"] for r in records if "valid/ppl" in r][-1]
        assert cell["valid_ppl"] == pytest.approx(logged, rel=1e-4)
    for png in ("loss.png", "collapse.png"):
        assert (out / "analysis" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slurm_array_tasks_run_each_cells_command(tmp_path):
    """--slurm without a cluster: a stand-in sbatch records what the arena submits, then
    slurm/router-sweep.sbatch runs array task 1 against a stand-in launch/pretrain.sh."""
    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    (bin_dir).mkdir()
    (root / "launch").mkdir(parents=True)
    (bin_dir / "sbatch").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$@" > "$SBATCH_LOG"\necho "SWEEP_TASKS=$SWEEP_TASKS" '
        '>> "$SBATCH_LOG"\necho "4242;cluster"\n')
    (root / "launch" / "pretrain.sh").write_text('printf "%s\\n" "$@"\n')
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "arena"
    env = {**_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SBATCH_LOG": str(tmp_path / "sbatch.log")}
    proc = subprocess.run([str(BIN / "megasmoe"), "arena", *ARGS, "--out", str(out),
                           "--slurm", "--parallel", "3", "--sbatch=--time=00:30:00"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "xmoe-s1234: submitted as array task 4242_1" in proc.stdout
    sbatch = (tmp_path / "sbatch.log").read_text().splitlines()
    assert "--array=0-1%3" in sbatch and "--time=00:30:00" in sbatch
    assert sbatch[-3].endswith("slurm/router-sweep.sbatch")
    assert sbatch[-1] == f"SWEEP_TASKS={out / 'slurm-tasks.txt'}"
    task = subprocess.run(["bash", str(REPO / "slurm" / "router-sweep.sbatch"),
                           str(REPO / "configs" / "tiny-cpu.yaml"), "logging.progress=false"],
                          capture_output=True, text=True, timeout=60,
                          env={**env, "MEGASMOE_ROOT": str(root), "SLURM_ARRAY_TASK_ID": "1",
                               "SWEEP_TASKS": str(out / "slurm-tasks.txt")})
    assert task.returncode == 0, task.stderr
    argv = task.stdout.splitlines()[1:]
    assert argv[0].endswith("configs/tiny-cpu.yaml") and argv[-1] == "logging.progress=false"
    assert "moe.router.name=xmoe" in argv and f"run.dir={out}/runs/xmoe-s1234" in argv
    assert "train.steps=4" in argv


def test_router_sweep_lists_every_registered_router():
    """slurm/router-sweep.sbatch's ROUTERS and its --array cover the whole registry."""
    from megasmoe.routers import registered_routers

    script = (REPO / "slurm" / "router-sweep.sbatch").read_text()
    listed = subprocess.run(
        ["bash", "-c", 'eval "$(sed -n "/^ROUTERS=(/,/^)/p" slurm/router-sweep.sbatch)"; '
                       'for r in "${ROUTERS[@]}"; do echo "${r%% *}"; done'],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listed) == sorted(registered_routers())
    assert f"#SBATCH --array=0-{len(listed) - 1}%" in script


@pytest.mark.parametrize("extra,seeds", [(["--quick"], 1), (["--quick", "--seeds", "2"], 2),
                                         ([], 3)])
def test_quick_means_one_seed_unless_told(tmp_path, extra, seeds):
    """The plan line comes first; --collect then refuses (nothing trained), training nothing."""
    proc = subprocess.run([str(BIN / "megasmoe"), "arena", "configs/tiny-cpu.yaml", "--routers",
                           "topk", *extra, "--collect", "--out", str(tmp_path / "a")],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith(f"arena: 1 routers x {seeds} seeds = {seeds} cells"), proc.stdout
    assert "--collect:" in proc.stderr and not (tmp_path / "a" / "runs").exists()
