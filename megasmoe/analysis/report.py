"""The markdown report of ``megasmoe analyze``: the runs side by side, with the plots."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from megasmoe.analysis.runs import Run, last, tokens_per_sec

__all__ = ["summary", "markdown"]


def _last_collapse(run: Run) -> dict:
    """The collapse scalars of the last evaluation that logged them (means over layers;
    dead experts summed)."""
    for record in reversed(run.records):
        keys = [k for k in record if k.startswith("collapse/") and "/layer_" in k]
        if not keys:
            continue
        out: dict[str, list] = {}
        for k in keys:
            out.setdefault(k.split("/")[1], []).append(float(record[k]))
        merged = {name: (sum(v) if name == "dead_experts" else sum(v) / len(v))
                  for name, v in out.items()}
        merged["step"] = int(record["step"])
        return merged
    return {}


def summary(run: Run) -> dict:
    """The report's numbers for one run (None where the run did not log them)."""
    loss = last(run, "valid/loss")
    row = {
        "router": run.router,
        "steps": max(int(r["step"]) for r in run.records),
        "train_loss": last(run, "train/loss"),
        "valid_loss": loss,
        "valid_ppl": last(run, "valid/ppl"),
        "tokens_per_sec": tokens_per_sec(run),
    }
    row.update({f"collapse_{k}": v for k, v in _last_collapse(run).items()})
    return row


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


_COLUMNS = (  # (header, summary key, format)
    ("run", None, ""), ("router", "router", ""), ("steps", "steps", "d"),
    ("train loss", "train_loss", ".4f"), ("valid loss", "valid_loss", ".4f"),
    ("valid ppl", "valid_ppl", ",.2f"), ("tokens/s", "tokens_per_sec", ",.0f"),
    ("CKA (mean off-diag)", "collapse_cka_mean_offdiag", ".3f"),
    ("CKA max", "collapse_cka_max_offdiag", ".3f"),
    ("output cosine", "collapse_cosine_mean_offdiag", ".3f"),
    ("router-weight cosine", "collapse_router_cosine_mean_offdiag", ".3f"),
    ("effective experts", "collapse_effective_experts", ".2f"),
    ("router entropy", "collapse_router_entropy", ".3f"),
    ("dead experts", "collapse_dead_experts", ".0f"),
)


def markdown(runs: list[Run], images: dict[str, list[str]], command: str) -> str:
    """The report: a table of the runs, then the shared plots and each run's plots.

    ``images`` maps "" (plots of all runs) and each run label to PNG file names relative
    to the report.
    """
    rows = {run.label: summary(run) for run in runs}
    lines = [
        f"# megasmoe analyze: {', '.join(run.label for run in runs)}",
        "",
        f"`{command}`",
        "",
        "Runs: " + "; ".join(f"**{run.label}** (`{run.path}`)" for run in runs) + ".",
        "",
        "Last logged values. Collapse columns: the last evaluation's collapse telemetry "
        "(docs/analysis.md), means over the MoE layers (dead experts: summed over layers); "
        "effective experts out of E (moe.num_experts). tokens/s: median over the run's "
        "logs, the first left out.",
        "",
        "| " + " | ".join(c[0] for c in _COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for run in runs:
        row = rows[run.label]
        cells = [run.label]
        for _, key, spec in _COLUMNS[1:]:
            value = row.get(key)
            cell = _fmt(value, spec)
            if key == "collapse_effective_experts" and value is not None and run.num_experts:
                cell += f" / {run.num_experts}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## All runs", ""]
    lines += [f"![{name}]({name})" for name in images.get("", [])]
    for run in runs:
        lines += ["", f"## {run.label}", ""]
        if not images.get(run.label):
            lines.append("No collapse telemetry in this run (logging.collapse_probe_tokens=0, "
                         "or no evaluation yet): no load heatmap or CKA matrices.")
        lines += [f"![{name}]({name})" for name in images.get(run.label, [])]
        if run.collapse:
            final = run.collapse[-1]
            off = [float(np.mean(c[~np.eye(len(c), dtype=bool)])) for c in final["cka"]]
            worst = int(final["layers"][int(np.argmax(off))])
            lines += ["", f"Most collapsed layer at step {int(final['step'])}: layer {worst} "
                          f"(mean off-diagonal CKA {max(off):.3f})."]
    return "\n".join(lines) + "\n"
