"""``megasmoe analyze RUN [RUN ...] --out DIR``: plots and a markdown report of runs.

Reads each run directory (``metrics.jsonl``, ``config.yaml``, the collapse telemetry of
``<run>/collapse/step_<N>.npz``; see docs/analysis.md) and writes into DIR:

- ``loss.png``: train/valid loss and valid perplexity of every run on shared axes;
- ``collapse.png``: router entropy, effective experts, mean off-diagonal CKA over the
  evaluations, every run;
- ``<run>_expert_load.png``: per MoE layer, each expert's share of the routed tokens at
  every evaluation;
- ``<run>_cka.png``: per MoE layer, the expert-output CKA matrix at the last evaluation;
- ``report.md``: a table of the runs side by side (final losses, perplexity, tokens/s,
  collapse scalars) and the pictures.

Every path is checked before anything is written: a path that is not a run is refused
in one line (``megasmoe: analyze error: ...``, exit code 2).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from megasmoe.analysis.runs import AnalyzeError, load_runs

__all__ = ["analyze", "add_subcommand", "AnalyzeError"]

EXIT_ERROR = 2


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def analyze(paths, out, command: str = "megasmoe analyze") -> Path:
    """Write the plots and report of the runs at ``paths`` into ``out``; the report's path.

    Raises AnalyzeError (nothing written) when a path is not a run or ``out`` is a file.
    """
    from megasmoe.analysis import plots
    from megasmoe.analysis.report import markdown

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnalyzeError(f"--out {out} is a file; pass a directory (created if missing)")
    runs = load_runs(paths)
    images: dict[str, list[str]] = {"": ["loss.png", "collapse.png"]}
    plots.save(plots.curves(runs), out / "loss.png")
    plots.save(plots.collapse_curves(runs), out / "collapse.png")
    for run in runs:
        images[run.label] = []
        if not run.collapse:
            continue
        for suffix, draw in (("expert_load", plots.load_over_training),
                             ("cka", plots.cka_matrices)):
            name = f"{_file_name(run.label)}_{suffix}.png"
            plots.save(draw(run), out / name)
            images[run.label].append(name)
    report = out / "report.md"
    report.write_text(markdown(runs, images, command))
    return report


def _cmd_analyze(args) -> int:
    command = "megasmoe analyze " + " ".join(
        [shlex.quote(p) for p in args.runs] + ["--out", shlex.quote(args.out)])
    try:
        report = analyze(args.runs, args.out, command)
    except AnalyzeError as e:
        print(f"megasmoe: analyze error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    print(f"wrote {report} and {len(list(report.parent.glob('*.png')))} PNGs in {report.parent}")
    return 0


def add_subcommand(subparsers):
    """Register ``megasmoe analyze`` on the ``megasmoe`` command's subparsers."""
    p = subparsers.add_parser(
        "analyze", help="plots and a markdown report comparing runs (docs/analysis.md)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (run.dir)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory for the PNGs and report.md (created if missing)")
    p.set_defaults(fn=_cmd_analyze)
    return p
