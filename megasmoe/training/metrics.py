"""Run outputs: TensorBoard scalars, metrics.jsonl, console progress line.

Only global rank 0 writes. Every logged step becomes one JSON object in
``metrics.jsonl`` (with a ``"step"`` key) and the same scalars in TensorBoard under
``<run dir>/tensorboard``; the console gets one progress line (step, loss, lr,
tokens/s, ETA).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["MetricsWriter", "format_eta", "truncate_metrics"]


def format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsWriter:
    """Writes scalars to TensorBoard and metrics.jsonl and prints progress (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True,
                 progress: bool = True, total_steps: int = 0,
                 purge_step: Optional[int] = None):
        self.enabled = enabled
        self.progress = progress
        self.total_steps = total_steps
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged after its last checkpoint.
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (tag -> value) at ``step``."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for tag, value in clean.items():
                self._tb.add_scalar(tag, value, step)

    def image(self, tag: str, image, step: int) -> None:
        """An RGB uint8 image [H, W, 3] to TensorBoard's images tab."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def print_progress(self, step: int, loss: float, lr: float, tokens_per_sec: float,
                       step_time: float, extra: Optional[str] = None) -> None:
        """One console line: step/total, loss, lr, tokens/s, ETA."""
        if not (self.enabled and self.progress):
            return
        eta = format_eta((self.total_steps - step) * step_time)
        pct = 100.0 * step / max(self.total_steps, 1)
        line = (f"step {step:>6}/{self.total_steps} ({pct:5.1f}%) | loss {loss:.4f} | "
                f"lr {lr:.3e} | {tokens_per_sec:,.0f} tok/s | ETA {eta}")
        if extra:
            line += f" | {extra}"
        print(line, flush=True)

    def info(self, message: str) -> None:
        """Print a line on rank 0."""
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        """Flush and close the files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class Throughput:
    """Tokens/s over the steps since the last read."""

    def __init__(self):
        self._t = time.perf_counter()
        self._tokens = 0
        self._steps = 0

    def add(self, tokens: int) -> None:
        """Count one step of ``tokens`` global tokens."""
        self._tokens += tokens
        self._steps += 1

    def read(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the last read; resets."""
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = (self._tokens / dt, dt / max(self._steps, 1))
        self._t, self._tokens, self._steps = now, 0, 0
        return out


def truncate_metrics(path, step: int) -> None:
    """Drop metrics.jsonl records after ``step`` (logged before a crash, redone on resume)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
