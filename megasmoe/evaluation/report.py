"""Outputs of ``megasmoe eval``: ``<run>/eval/<name>.json``, a console table, TensorBoard.

JSON schema (docs/evaluation.md)::

    {"name", "run", "checkpoint", "step", "router", "overrides": [...], "world_size",
     "layout": {tp, pp, vpp, ep, etp, cp, dp, sp}, "date", "megasmoe_version",
     "datasets": {NAME: {"loss", "ppl", "tokens", "source"}},
     "mc": {NAME: {"acc", "acc_norm", "items", "chance", "source",
                   "per_item": [{"id"?, "loglik": [...], "pred", "pred_norm", "answer"}]}}}

TensorBoard: ``eval/<name>/<dataset>/loss|ppl`` and ``eval/<name>/<mc>/acc|acc_norm`` at
the checkpoint's step, in ``<run>/tensorboard/`` beside the training curves.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

__all__ = ["build_report", "write_json", "format_table", "write_tensorboard", "report_path"]


def report_path(run_dir: Path, name: str) -> Path:
    """``<run>/eval/<name>.json``."""
    return Path(run_dir) / "eval" / f"{name}.json"


def build_report(*, name: str, run_dir: Path, checkpoint: Path, step: int, cfg,
                 overrides: list, datasets: dict, mc: dict) -> dict:
    """The report object (schema in the module docstring)."""
    import megasmoe

    p = cfg.parallel
    return {
        "name": name,
        "run": str(Path(run_dir).resolve()),
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": step,
        "router": cfg.moe.router.name,
        "overrides": list(overrides),
        "world_size": p.world_size,
        "layout": {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "ep": p.ep, "etp": p.etp,
                   "cp": p.cp, "dp": p.dp, "sp": p.sp},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "megasmoe_version": megasmoe.__version__,
        "datasets": datasets,
        "mc": mc,
    }


def write_json(report: dict, path: Path) -> None:
    """Write the report atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def format_table(report: dict) -> str:
    """The console summary: one line per dataset (loss, perplexity, tokens) and per
    multiple-choice set (acc, acc_norm, items, chance)."""
    lines = [f"megasmoe eval {report['name']}: {report['checkpoint']} (step {report['step']}, "
             f"router {report['router']}, world size {report['world_size']})"]
    if report["datasets"]:
        width = max(12, *(len(n) for n in report["datasets"]))
        lines.append(f"{'dataset':<{width}}  {'loss':>8}  {'ppl':>10}  {'tokens':>10}")
        for n, d in report["datasets"].items():
            lines.append(f"{n:<{width}}  {d['loss']:>8.4f}  {d['ppl']:>10.2f}  "
                         f"{int(d['tokens']):>10,}")
    if report["mc"]:
        width = max(12, *(len(n) for n in report["mc"]))
        lines.append(f"{'multiple choice':<{width}}  {'acc':>8}  {'acc_norm':>10}  "
                     f"{'items':>10}  {'chance':>7}")
        for n, m in report["mc"].items():
            lines.append(f"{n:<{width}}  {m['acc']:>8.4f}  {m['acc_norm']:>10.4f}  "
                         f"{m['items']:>10,}  {m['chance']:>7.4f}")
    return "\n".join(lines)


def write_tensorboard(report: dict, run_dir: Path) -> None:
    """Add the report's scalars to ``<run>/tensorboard`` at the checkpoint's step."""
    from torch.utils.tensorboard import SummaryWriter

    prefix, step = f"eval/{report['name']}", report["step"]
    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
    try:
        for n, d in report["datasets"].items():
            writer.add_scalar(f"{prefix}/{n}/loss", d["loss"], step)
            writer.add_scalar(f"{prefix}/{n}/ppl", d["ppl"], step)
        for n, m in report["mc"].items():
            writer.add_scalar(f"{prefix}/{n}/acc", m["acc"], step)
            writer.add_scalar(f"{prefix}/{n}/acc_norm", m["acc_norm"], step)
    finally:
        writer.close()
