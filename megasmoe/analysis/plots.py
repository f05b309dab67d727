"""The PNGs of ``megasmoe analyze``: matplotlib figures on an Agg canvas (no pyplot, no GUI).

- ``curves``: train loss, valid loss and valid perplexity of every run on shared axes;
- ``collapse_curves``: router entropy, effective experts and mean off-diagonal CKA over
  the evaluations (means over the MoE layers), every run on shared axes;
- ``load_over_training``: one run, one panel per MoE layer: experts x evaluations, the
  share of the evaluation's routed tokens each expert got, coloured like the trainer's
  expert-load heatmap (log scale centred on 1/E, black = no token);
- ``cka_matrices``: one run, one E x E CKA panel per MoE layer at its last evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from megasmoe.analysis.runs import Run, layer_series, series

__all__ = ["curves", "collapse_curves", "load_over_training", "cka_matrices", "save"]

_DPI = 100
_OCTAVES = 3


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, facecolor="white",
                 layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> Path:
    """Write a figure as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _grid(fig, n: int, ncols_max: int = 4):
    ncols = max(1, min(ncols_max, n))
    nrows = max(1, math.ceil(n / ncols))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _colour(i: int, n: int):
    """Run ``i``'s colour among ``n``: matplotlib's 10 defaults, tab20 up to 20 runs, then
    evenly spaced hues (colours never repeat within one figure)."""
    from matplotlib import colormaps

    if n <= 10:
        return f"C{i}"
    if n <= 20:
        return colormaps["tab20"](i)
    return colormaps["hsv"](i / n)


_LEGEND_ROWS = 24  # entries per legend column


def _legend_width_in(runs: int) -> float:
    """Inches the figure legend takes right of the panels: one column, or two past
    ``_LEGEND_ROWS`` runs."""
    return 1.5 if runs <= _LEGEND_ROWS else 3.0


def _legend(fig, axes) -> None:
    """One legend for the figure, right of the panels, one entry per label (deduplicated
    across panels): per-panel legends of a dozen runs cover the curves."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper",
                   fontsize=8, ncols=1 if len(handles) <= _LEGEND_ROWS else 2)


def curves(runs: list[Run]):
    """Loss and valid perplexity of every run (two panels, one colour per run)."""
    fig = _figure(12 + _legend_width_in(len(runs)), 4.2)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        colour = _colour(i, len(runs))
        # One legend entry per run (its colour); the line style says train or valid.
        steps, values = series(run, "train/loss")
        if steps:
            ax_loss.plot(steps, values, color=colour, lw=1.2, label=run.label)
        steps, values = series(run, "valid/loss")
        if steps:
            ax_loss.plot(steps, values, color=colour, lw=1.6, ls="--", marker="o", ms=4,
                         label=run.label)
        steps, values = series(run, "valid/ppl")
        if steps:
            ax_ppl.plot(steps, values, color=colour, lw=1.6, marker="o", ms=4, label=run.label)
    ax_loss.set(title="Loss (train solid, valid dashed)", xlabel="step",
                ylabel="loss (nats/token)")
    ax_ppl.set(title="Valid perplexity", xlabel="step", ylabel="perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
    _legend(fig, (ax_loss, ax_ppl))
    return fig


_COLLAPSE_PANELS = (
    ("collapse/router_entropy", "router/entropy", "Router entropy (nats, mean over layers)"),
    ("collapse/effective_experts", None, "Effective experts exp(H(load))"),
    ("collapse/cka_mean_offdiag", None, "Expert-output CKA, mean off-diagonal"),
)


def collapse_curves(runs: list[Run]):
    """Entropy, effective experts and CKA over the evaluations, every run per panel.

    Router entropy falls back to the training-time ``router/entropy`` scalars for runs
    without collapse telemetry.
    """
    fig = _figure(15 + _legend_width_in(len(runs)), 4.2)
    axes = fig.subplots(1, len(_COLLAPSE_PANELS))
    for ax, (name, fallback, title) in zip(axes, _COLLAPSE_PANELS):
        for i, run in enumerate(runs):
            steps, values = layer_series(run, name)
            label = run.label
            if not steps and fallback:
                steps, values = layer_series(run, fallback)
                label += " (train)"
            if steps:
                ax.plot(steps, values, color=_colour(i, len(runs)), marker="o", ms=4,
                        label=label)
        if name.endswith("effective_experts"):
            for i, run in enumerate(runs):
                if run.num_experts:
                    ax.axhline(run.num_experts, color=_colour(i, len(runs)), lw=0.8, ls=":")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "no collapse telemetry", ha="center", va="center",
                    transform=ax.transAxes)
    _legend(fig, axes)
    return fig


def load_over_training(run: Run):
    """Per MoE layer: experts x evaluation steps, each expert's share of the routed tokens."""
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    layers = run.collapse[-1]["layers"].tolist()
    steps = [int(d["step"]) for d in run.collapse]
    E = run.collapse[-1]["load"].shape[1]
    fig = _figure(min(4 * len(layers), 16), 3.2 * math.ceil(len(layers) / 4) + 0.6)
    cmap = colormaps["coolwarm"].with_extremes(bad="black")
    top = min(_OCTAVES, math.log2(E)) if E > 1 else 1e-6
    norm = TwoSlopeNorm(vmin=-_OCTAVES, vcenter=0.0, vmax=max(top, 1e-6))
    image = None
    for ax, layer in zip(_grid(fig, len(layers)), layers):
        cols = []
        for d in run.collapse:
            where = np.flatnonzero(d["layers"] == layer)
            row = d["load"][where[0]] if len(where) else np.full(E, np.nan)
            total = np.nansum(row)
            cols.append(row / total if total > 0 else np.full(E, np.nan))
        share = np.stack(cols, axis=1)  # [E, evaluations]
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.ma.masked_invalid(np.where(share > 0, np.log2(share * E), np.nan))
        image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("evaluation step", fontsize=9)
        ax.set_ylabel("expert", fontsize=9)
        every = max(1, math.ceil(len(steps) / 8))
        ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], fontsize=8)
        ax.set_yticks(range(0, E, max(1, math.ceil(E / 16))))
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{run.label}: expert load over training (share of each evaluation's "
                 f"routed tokens; grey = 1/E, red = more, blue = less, black = none)",
                 fontsize=11)
    if image is not None:
        cbar = fig.colorbar(image, ax=fig.axes, shrink=0.8, extend="both")
        ticks = np.arange(-_OCTAVES, math.floor(top) + 1)
        cbar.set_ticks(ticks, labels=[f"{2.0 ** t:g}/E" for t in ticks])
    return fig


def cka_matrices(run: Run):
    """Per MoE layer: the E x E linear CKA of the experts' outputs at the last evaluation."""
    last = run.collapse[-1]
    layers = last["layers"].tolist()
    fig = _figure(min(3.6 * len(layers), 15), 3.3 * math.ceil(len(layers) / 4) + 0.6)
    image = None
    for ax, layer, cka in zip(_grid(fig, len(layers)), layers, last["cka"]):
        image = ax.imshow(cka, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        off = cka[~np.eye(len(cka), dtype=bool)]
        ax.set_title(f"layer {layer}: mean off-diag {off.mean():.2f}", fontsize=10)
        ax.set_xlabel("expert", fontsize=9)
        ax.set_ylabel("expert", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{run.label}: expert-output linear CKA at step {int(last['step'])} "
                 f"({int(last['probe_tokens'])} probe tokens)", fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="linear CKA")
    return fig
