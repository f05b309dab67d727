"""The arena's table: per router, the mean and spread over seeds of every cell's numbers.

Per cell: valid and test perplexity from its ``megasmoe eval`` report (``<run>/eval/
arena.json``), tokens/s and the last collapse scalars from its ``metrics.jsonl`` (read by
megasmoe.analysis). Per router: mean and sample standard deviation over seeds, tokens/s
overhead relative to ``topk``. Written as ``<out>/results.md`` (docs/results.md style)
and ``<out>/results.json``, with ``megasmoe analyze`` plots of one seed per router in
``<out>/analysis/``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Optional

from megasmoe.arena.plan import matching_for
from megasmoe.arena.runner import REPO, evaluated

__all__ = ["cell_numbers", "spread", "router_rows", "environment", "markdown", "write_results"]

COLLAPSE = ("cka_mean_offdiag", "effective_experts", "router_entropy", "dead_experts")
"""Collapse scalars the table shows (docs/analysis.md; means over layers, dead summed)."""


def cell_numbers(cell) -> dict:
    """One cell's numbers (None where missing)."""
    from megasmoe.analysis.report import summary
    from megasmoe.analysis.runs import load_run

    row = summary(load_run(cell.run_dir, label=cell.name))
    sets = (evaluated(cell) or {}).get("datasets", {})
    mc = (evaluated(cell) or {}).get("mc", {})
    out = {"cell": cell.name, "router": cell.router, "seed": cell.seed,
           "run_dir": str(cell.run_dir), "steps": row.get("steps"),
           "valid_ppl": sets.get("valid", {}).get("ppl", row.get("valid_ppl")),
           "test_ppl": sets.get("test", {}).get("ppl"),
           "tokens_per_sec": row.get("tokens_per_sec")}
    for name in ("austen", "python"):
        out[f"{name}_ppl"] = sets.get(name, {}).get("ppl")
    for name, score in mc.items():
        out[f"{name}_acc"] = score.get("acc")
    out.update({k: row.get(f"collapse_{k}") for k in COLLAPSE})
    return out


def spread(values: list) -> dict:
    """{"mean", "std" (sample, n - 1; None for one value), "n", "values"} of the non-None."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def router_rows(cells: list) -> dict:
    """router -> {metric: spread over its seeds}, plus overhead vs topk and matching."""
    per_cell = [cell_numbers(c) for c in cells]
    rows: dict = {}
    for router in dict.fromkeys(c.router for c in cells):
        mine = [n for n in per_cell if n["router"] == router]
        keys = [k for k in mine[0] if k not in ("cell", "router", "seed", "run_dir", "steps")]
        rows[router] = {k: spread([n.get(k) for n in mine]) for k in keys}
        rows[router]["seeds"] = [n["seed"] for n in mine]
        rows[router]["matching"] = matching_for(router).note
        rows[router]["matching_overrides"] = list(matching_for(router).overrides)
    ref = rows.get("topk", {}).get("tokens_per_sec", {}).get("mean")
    for row in rows.values():
        tps = row["tokens_per_sec"]["mean"]
        # Extra time per token relative to topk: topk's tokens/s over this router's, - 1.
        row["overhead_vs_topk"] = ref / tps - 1 if ref and tps else None
    return {"routers": rows, "cells": per_cell}


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """Versions, date and machine of this arena."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "megasmoe": _version("megasmoe"),
            "commit": (commit or "unknown") + ("-dirty" if dirty else ""),
            "torch": _version("torch"), "megatron_core": _version("megatron-core"),
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                       f"load average {os.getloadavg()[0]:.1f} at the end",
            "processor": platform.processor() or "unknown"}


def _ms(s: dict, spec: str) -> str:
    if s is None or s.get("mean") is None:
        return "-"
    text = format(s["mean"], spec)
    return text + (f" ± {format(s['std'], spec)}" if s.get("std") is not None else "")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 100:+.0f}%"


def _noise_note(rows: dict) -> list:
    """domain_steer without a steering file computes what topk computes: its measured
    overhead is this arena's timing noise."""
    same = rows.get("domain_steer", {}).get("overhead_vs_topk")
    if same is None:
        return []
    return [f"- `domain_steer` (no steering file) computes exactly what `topk` does; its "
            f"overhead here, {_pct(same)}, is the timing noise of this arena."]


def markdown(data: dict, command: str, setting: dict, images: list) -> str:
    """results.md: command, versions, machine, the table, matching notes, the plots."""
    env, rows = data["environment"], data["routers"]
    lines = [
        "# Router arena results", "",
        f"Command: `{command}`", "",
        f"- date: {env['date']}",
        f"- versions: megasmoe {env['megasmoe']} (commit {env['commit']}), torch "
        f"{env['torch']}, megatron-core {env['megatron_core']}, Python {env['python']}",
        f"- machine: {env['machine']}",
        f"- setting: {setting['describe']}", "",
        "Values are mean ± sample standard deviation over seeds (no ± with one seed). "
        "Perplexities are `megasmoe eval` on the held-out splits "
        f"({setting['eval_batches']} global batches each; valid equals the run's final "
        "validation). Collapse columns are the runs' last `collapse/*` scalars (mean over "
        "MoE layers; dead experts summed over layers; docs/analysis.md). Overhead is the "
        "extra time per training token relative to `topk` (its tokens/s over the router's, "
        "- 1).", "",
        "| router | seeds | valid ppl | test ppl | tokens/s | overhead vs topk | "
        "CKA (mean off-diag) | effective experts | router entropy | dead experts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for router, r in rows.items():
        lines.append(
            f"| {router} | {len(r['seeds'])} | {_ms(r['valid_ppl'], ',.2f')} | "
            f"{_ms(r['test_ppl'], ',.2f')} | {_ms(r['tokens_per_sec'], ',.0f')} | "
            f"{_pct(r['overhead_vs_topk'])} | {_ms(r['cka_mean_offdiag'], '.3f')} | "
            f"{_ms(r['effective_experts'], '.2f')} | {_ms(r['router_entropy'], '.3f')} | "
            f"{_ms(r['dead_experts'], '.1f')} |")
    lines += ["", "## How each router is matched", "",
              "Equal active compute: every cell has the same model, moe.topk, expert size, "
              "data, steps, seeds and evaluation; a router that adds a branch is matched as "
              "its paper matches it:", ""]
    for router, r in rows.items():
        extra = (f" (overrides: `{' '.join(r['matching_overrides'])}`)"
                 if r["matching_overrides"] else "")
        lines.append(f"- `{router}`: {r['matching']}{extra}.")
    lines += ["", "## Caveats", "",
              "- tokens/s are measured while the cells run one after another on the same "
              "machine: other load on it (and CPU frequency) changes them by tens of "
              "percent or more between cells; trust an overhead only when it repeats over "
              "seeds and is well above the domain_steer row (below).",
              *_noise_note(rows),
              "- Each router uses its own default fields (`megasmoe routers`) except for the "
              "matching overrides above."]
    if not any(r["test_ppl"]["mean"] is not None for r in rows.values()):
        lines.append("- test perplexity is missing: the data has no test split "
                     "(data.split gives it 0).")
    if images:
        lines += ["", "## Plots (`megasmoe analyze`, first seed of each router)", ""]
        lines += [f"![{Path(i).stem}]({i})" for i in images]
        lines += ["", "Per-router expert load over training and CKA matrices: "
                  "[analysis/report.md](analysis/report.md)."]
    return "\n".join(lines) + "\n"


def write_results(cells: list, out: Path, command: str, setting: dict,
                  analyze: bool = True) -> Path:
    """Write results.json, results.md and the analyze plots; the path of results.md."""
    data = router_rows(cells)
    data["environment"] = environment()
    data["command"], data["setting"] = command, setting
    images: list = []
    if analyze:
        from megasmoe.analysis import analyze as run_analyze

        firsts = list({c.router: c for c in reversed(cells)}.values())[::-1]
        report = run_analyze([c.run_dir for c in firsts], out / "analysis",
                             command="megasmoe analyze " + " ".join(
                                 str(c.run_dir) for c in firsts))
        images = ["analysis/loss.png", "analysis/collapse.png"]
        data["analysis"] = str(report)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    path = out / "results.md"
    path.write_text(markdown(data, command, setting, images))
    return path
