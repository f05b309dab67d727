"""``megasmoe analyze`` on two real short runs, typed as docs/analysis.md shows it."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, REPO, pretrain


def _analyze(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([str(BIN / "megasmoe"), "analyze", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def xmoe_run(tmp_path_factory):
    """A second router, 4 steps at world size 1 with two evaluations."""
    return pretrain(tmp_path_factory.mktemp("analyze"), "xmoe",
                    ["train.steps=4", "train.eval_interval=2", "moe.router.name=xmoe",
                     "parallel.world_size=1", "parallel.ep=1"], nproc=1)


def test_documented_command_is_the_tested_one(repo):
    text = (repo / "docs" / "analysis.md").read_text()
    assert re.search(r"^megasmoe analyze runs/\S+ runs/\S+ --out \S+$", text, re.M)


def test_analyze_two_runs_writes_pngs_and_report(trained_tiny_run, xmoe_run, tmp_path):
    out = tmp_path / "analysis"
    proc = _analyze(str(trained_tiny_run), str(xmoe_run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiny, xmoe = trained_tiny_run.name, xmoe_run.name
    expected = {"loss.png": None, "collapse.png": None,
                f"{tiny}_expert_load.png": None, f"{tiny}_cka.png": None,
                f"{xmoe}_expert_load.png": None, f"{xmoe}_cka.png": None}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    for name in expected:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 200, name
            pixels = np.asarray(image.convert("RGB"))
        # Not a blank canvas: drawn lines, text and colour maps.
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, name
    report = (out / "report.md").read_text()
    assert str(trained_tiny_run) in report and str(xmoe_run) in report
    rows = [line for line in report.splitlines() if line.startswith(f"| {tiny} |")
            or line.startswith(f"| {xmoe} |")]
    assert len(rows) == 2
    assert "| topk | 30 |" in rows[0] and "| xmoe | 4 |" in rows[1]
    assert " / 8 |" in rows[0] and " / 8 |" in rows[1]  # effective experts out of E
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
    assert len(re.findall(r"!\[", report)) == 6


def test_a_path_that_is_not_a_run_is_refused(trained_tiny_run, tmp_path):
    out = tmp_path / "analysis"
    proc = _analyze(str(trained_tiny_run), str(tmp_path), "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"megasmoe: analyze error: {tmp_path} is not a megasmoe run directory (no "
        f"metrics.jsonl); pass the run.dir of a training run (default runs/<run.name>)")
    assert not out.exists()  # nothing written
    proc = _analyze(str(tmp_path / "missing"), "--out", str(out))
    assert proc.returncode == 2 and "no such run directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
