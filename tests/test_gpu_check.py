"""The GPU check (bench/gpu/run.sh) without a GPU: it refuses in one line, its CPU smoke
mode runs every section end to end and writes the JSON docs/benchmarks.md documents, and
a failing section fails the run with its error in the JSON."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["device", "peaks", "experts", "routers", "training"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a CUDA machine runs the real check, not these")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGASMOE_GPU_CHECK")}
    env.pop("OUT", None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _smoke(tmp_path: Path, **extra) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu/run.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=500, env=_env(OUT=str(out), MEGASMOE_GPU_CHECK_CPU_SMOKE="1",
                                                MEGASMOE_GPU_CHECK_WORK=str(tmp_path / "work"),
                                                **extra))
    result = json.loads((out / "gpu_check.json").read_text())
    return proc, result, (out / "gpu_check.md").read_text()


def documented_fields() -> list[str]:
    """The field paths of the schema table in docs/benchmarks.md ("JSON schema")."""
    text = (REPO / "docs/benchmarks.md").read_text()
    table = text.split("### JSON schema (`gpu_check.json`", 1)[1]
    return re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE)


def _resolve(node, parts: list[str], path: str) -> list:
    """Every value at a documented path (``<section>``: each section; ``x[]``: each item)."""
    if not parts:
        return [node]
    head, rest = parts[0], parts[1:]
    if head == "<section>":
        assert set(node) == set(SECTIONS), path
        return [v for key in SECTIONS for v in _resolve(node[key], rest, path)]
    if head.endswith("[]"):
        items = node[head[:-2]]
        assert isinstance(items, list) and items, f"{path}: empty list"
        return [v for item in items for v in _resolve(item, rest, path)]
    assert isinstance(node, dict) and head in node, f"{path}: '{head}' missing"
    return _resolve(node[head], rest, path)


def _leaf_paths(node, prefix: str = "") -> set[str]:
    """The JSON's own leaf paths, written as the docs write them."""
    if isinstance(node, dict):
        out = set()
        for key, value in node.items():
            name = "<section>" if prefix == "sections." and key in SECTIONS else key
            if isinstance(value, dict) and value:
                out |= _leaf_paths(value, f"{prefix}{name}.")
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for item in value:
                    out |= _leaf_paths(item, f"{prefix}{name}[].")
            else:
                out.add(f"{prefix}{name}")
        return out
    return {prefix.rstrip(".")}


def _numbers(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


def test_without_a_gpu_it_exits_non_zero_with_one_line():
    proc = subprocess.run("bash bench/gpu/run.sh", shell=True, cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no CUDA GPU" in lines[0] and "torch.cuda.is_available() is False" in lines[0]


def test_cpu_smoke_runs_every_section_and_writes_the_documented_json(tmp_path):
    proc, result, md = _smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert result["schema"] == 1 and result["mode"] == "cpu-smoke" and result["ok"] is True
    assert [s["status"] for s in result["sections"].values()] == ["ok"] * len(SECTIONS)
    for name in SECTIONS:  # progress, per section, with elapsed seconds
        assert re.search(rf"^\[ *[0-9.]+ s\] {name}: ok \(", proc.stdout, re.MULTILINE), name

    fields = documented_fields()
    assert len(fields) > 50 and "schema" in fields
    for path in fields:
        _resolve(result, path.split("."), path)
    assert _leaf_paths(result) <= set(fields), sorted(_leaf_paths(result) - set(fields))
    assert all(math.isfinite(x) for x in _numbers(result))

    rows = result["experts"]["rows"]
    assert {r["shape"] for r in rows} == {"mixtral", "fine_grained"}
    assert {r["candidate"] for r in rows} >= {"sequential fp32", "sequential bf16", "grouped bf16",
                                              "grouped fp8 tensorwise", "grouped fp8 rowwise"}
    assert result["experts"]["te"].startswith("not installed")
    fp8 = [r for r in rows if r["fp8"]]
    assert all(0.01 < r["max_rel_error"] < 0.15 for r in fp8)  # quantised, not garbage
    from megasmoe.routers import registered_routers

    assert [r["router"] for r in result["routers"]["rows"]] == registered_routers()
    runs = result["training"]["runs"]
    assert [(r["label"], r["fp8"]) for r in runs] == [("bf16", None), ("fp8 rowwise", "rowwise")]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in runs)

    assert "CPU smoke run" in md and "| section | status |" in md
    for word in [*SECTIONS, "grouped fp8 rowwise", "fine_grained", "spectral", "fp8 rowwise"]:
        assert word in md, word


def test_a_failing_section_fails_the_run_with_its_error_in_the_json(tmp_path):
    proc, result, md = _smoke(tmp_path, MEGASMOE_GPU_CHECK_FAIL="training")
    assert proc.returncode == 1, proc
    sec = result["sections"]
    assert sec["training"]["status"] == "failed"
    assert "injected failure" in sec["training"]["error"]
    assert all(sec[n]["status"] == "ok" for n in SECTIONS if n != "training")
    assert result["ok"] is False
    assert "FAILED" in proc.stderr and "training" in proc.stderr
    assert "| training | failed |" in md and "FAILED" in md
