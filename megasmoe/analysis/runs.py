"""Reading finished (or running) megasmoe runs for ``megasmoe analyze``.

A run directory is what ``megasmoe pretrain`` writes (``run.dir``, default
``runs/<run.name>``): ``metrics.jsonl`` (required), ``config.yaml`` (router, experts)
and ``collapse/step_<N>.npz`` (collapse telemetry, docs/analysis.md).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["AnalyzeError", "Run", "load_run", "load_runs", "series", "layer_series", "last",
           "tokens_per_sec"]


class AnalyzeError(ValueError):
    """A path that is not a readable run (one line: the path, the problem, the fix)."""


@dataclass
class Run:
    """One run's logged outputs."""

    path: Path
    """The run directory."""
    label: str
    """Short unique name in plots and the report (the directory name)."""
    config: dict
    """config.yaml as a dict ({} when absent)."""
    records: list[dict]
    """metrics.jsonl records in order."""
    collapse: list[dict] = field(default_factory=list)
    """The collapse npz files as dicts of arrays, by step."""

    @property
    def router(self) -> str:
        """moe.router.name from config.yaml ('?' when unknown)."""
        return str(self.config.get("moe", {}).get("router", {}).get("name", "?"))

    @property
    def num_experts(self) -> Optional[int]:
        """moe.num_experts from config.yaml."""
        return self.config.get("moe", {}).get("num_experts")


def _read_metrics(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AnalyzeError(f"{path} line {n}: not a JSON record; the file is damaged "
                               f"(remove the line, or rerun the training)") from None
        if not isinstance(record, dict) or "step" not in record:
            raise AnalyzeError(f"{path} line {n}: a record without 'step'; not a megasmoe "
                               f"metrics file")
        records.append(record)
    return records


def load_run(path, label: Optional[str] = None) -> Run:
    """Read one run directory; AnalyzeError when ``path`` is not a run."""
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise AnalyzeError(f"{path}: no such run directory; pass the run.dir of a training run "
                           f"(default runs/<run.name>)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise AnalyzeError(f"{path} is not a megasmoe run directory (no metrics.jsonl); pass "
                           f"the run.dir of a training run (default runs/<run.name>)")
    records = _read_metrics(metrics)
    if not records:
        raise AnalyzeError(f"{metrics} is empty: the run has logged nothing yet")
    config = {}
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    collapse = []
    for npz in sorted((path / "collapse").glob("step_*.npz")):
        if re.fullmatch(r"step_\d+\.npz", npz.name):
            with np.load(npz) as data:
                collapse.append({k: data[k] for k in data.files})
    collapse.sort(key=lambda d: int(d["step"]))
    return Run(path=path, label=label or path.name, config=config, records=records,
               collapse=collapse)


def load_runs(paths) -> list[Run]:
    """Read every run (all are checked before anything is drawn); labels made unique."""
    paths = [Path(p) for p in paths]
    labels = [p.resolve().name for p in paths]
    for i, p in enumerate(paths):
        if labels.count(labels[i]) > 1:
            labels[i] = "_".join(p.resolve().parts[-2:])
    seen: dict[str, int] = {}
    for i, name in enumerate(labels):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            labels[i] = f"{name}_{seen[name]}"
    return [load_run(p, label) for p, label in zip(paths, labels)]


def series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar over the run's records."""
    steps, values = [], []
    for r in run.records:
        if key in r and r[key] is not None:
            steps.append(int(r["step"]))
            values.append(float(r[key]))
    return steps, values


def layer_series(run: Run, name: str) -> tuple[list[int], list[float]]:
    """(steps, mean over layers) of a per-layer scalar ``<name>/layer_<i>``."""
    prefix = name + "/layer_"
    steps, values = [], []
    for r in run.records:
        vals = [float(v) for k, v in r.items() if k.startswith(prefix) and v == v]
        if vals:
            steps.append(int(r["step"]))
            values.append(sum(vals) / len(vals))
    return steps, values


def last(run: Run, key: str) -> Optional[float]:
    """The last logged value of a scalar, or None."""
    _, values = series(run, key)
    return values[-1] if values else None


def tokens_per_sec(run: Run) -> Optional[float]:
    """Median train/tokens_per_sec, the first log left out (start-up) when there are more."""
    _, values = series(run, "train/tokens_per_sec")
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None
