"""Expert-load heatmaps: MoE layers x experts, the share of its tokens each expert received.

``counts`` is the [layers, experts] matrix of routed (token, expert) assignments that
``telemetry.collect`` returns; the trainer sums it over the training steps since the
previous evaluation and draws it at every evaluation (rank 0 only) to
``<run dir>/plots/expert_load_step_<N>.png`` and to TensorBoard (images tab,
``router/expert_load``) -- the same RGB uint8 picture in both places.

The picture (matplotlib, Agg canvas, ~800 px wide) has one row per MoE layer (rows of
dense layers, all zero, are left out; rows keep the layer index of the
``router/*/layer_i`` scalars) and one column per expert. A cell's value is the expert's
share of the layer's routed assignments, ``count / row sum``, in percent: it is *not*
normalised to the row's maximum, so every colour means the same share in every layer and
at every step. The colour scale is logarithmic and centred on the uniform share 1/E:
grey = uniform, red = overloaded (up to 8 x 1/E, or 100 %), blue = underloaded (down to
1/8 x 1/E; smaller shares are clipped to the darkest blue), black = no token at all (a
dead expert). The colour bar at the bottom is labelled in percent and marks 1/E. Axes
are labelled (ticks thinned to stay legible from 4 to 256 experts and 1 to 200 layers),
the title states the step (``step=``) and the number of routed assignments per layer
(and the token count when the caller passes ``tokens=``), and small matrices (up to 128
cells) print the percentage in each cell. The max/mean load and load entropy of each layer are in
metrics.jsonl as ``router/max_over_mean_load`` and ``router/load_entropy``.

matplotlib is imported inside the functions (it costs ~0.3 s at import; the CLI does not
pay it unless a picture is drawn). Drawing one picture takes ~0.1 s on one CPU core.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["figure", "load_heatmap", "save_png"]

_WIDTH_PX = 800
_DPI = 100
# Layout in pixels (the figure is placed by hand: constrained layout is slow).
_LEFT, _RIGHT, _TOP = 64, 18, 60
_BELOW_AXES = 46          # x tick labels and the x label
_CBAR_GAP, _CBAR_H, _CBAR_BELOW = 12, 12, 50
_BOTTOM = 6
_OCTAVES = 3              # colour range: 1/E * 2**-3 .. 1/E * 2**3
_ANNOTATE_MAX = 128       # print the share in each cell up to 128 cells


def _nice_step(n: int, max_labels: int) -> int:
    """Smallest step from 1, 2, 4, 5, 8, 10, 16, 20, 25, 32, ... giving <= max_labels ticks."""
    max_labels = max(max_labels, 1)
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 256):
        if math.ceil(n / step) <= max_labels:
            return step
    return math.ceil(n / max_labels)


def _fmt_pct(value: float, digits: int = 3) -> str:
    """A percentage to ``digits`` significant figures, without exponent: 12.5, 0.195, 100."""
    if value == 0:
        return "0"
    if value >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def figure(counts: np.ndarray, step: Optional[int] = None, tokens: Optional[int] = None):
    """The matplotlib Figure (Agg canvas, not drawn yet) for a [layers, experts] count matrix.

    ``step`` and ``tokens`` (tokens routed since the previous picture) go into the title
    when given. The figure is not registered with pyplot: no global state, no GUI.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [layers, experts], got shape {counts.shape}")
    num_experts = counts.shape[1]
    totals = counts.sum(axis=1)
    layers = np.flatnonzero(totals > 0)
    rows = counts[layers]
    num_rows = len(layers)

    row_px = int(np.clip(640 // max(num_rows, 1), 5, 40))
    row_px = max(row_px, 80 // max(num_rows, 1))  # room for the y label with 1 or 2 rows
    axes_h = max(num_rows, 1) * row_px
    height = _TOP + axes_h + _BELOW_AXES + _CBAR_GAP + _CBAR_H + _CBAR_BELOW + _BOTTOM
    axes_w = _WIDTH_PX - _LEFT - _RIGHT

    fig = Figure(figsize=(_WIDTH_PX / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def box(left_px, bottom_px, w_px, h_px):
        return [left_px / _WIDTH_PX, bottom_px / height, w_px / _WIDTH_PX, h_px / height]

    title = "Expert load" + (f" at step {step:,}" if step is not None else "")
    if num_rows:
        lo, hi = int(totals[layers].min()), int(totals[layers].max())
        routed = f"{hi:,}" if lo == hi else f"{lo:,}-{hi:,}"
        detail = (f"{num_rows} MoE layer{'s' if num_rows != 1 else ''} x {num_experts} "
                  f"experts, {routed} routed token-expert assignments per layer")
        if tokens is not None:
            detail += f" ({tokens:,} tokens)"
    else:
        detail = "no tokens routed"
    fig.text(0.5, 1 - 8 / height, title, ha="center", va="top", fontsize=13,
             fontweight="bold")
    fig.text(0.5, 1 - 32 / height, detail, ha="center", va="top", fontsize=9.5)

    ax_bottom = _BOTTOM + _CBAR_BELOW + _CBAR_H + _CBAR_GAP + _BELOW_AXES
    ax = fig.add_axes(box(_LEFT, ax_bottom, axes_w, axes_h))
    ax.set_xlabel("expert", fontsize=10, labelpad=2)
    ax.set_ylabel("MoE layer", fontsize=10)
    if not num_rows or num_experts == 0:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no tokens routed", ha="center", va="center",
                transform=ax.transAxes)
        return fig

    uniform = 100.0 / num_experts
    share = 100.0 * rows / totals[layers][:, None]
    top = min(_OCTAVES, math.log2(num_experts)) if num_experts > 1 else 0.0
    # log2(share / uniform); zero shares masked ("bad" colour = black).
    with np.errstate(divide="ignore"):
        ratio = np.log2(share / uniform)
    data = np.ma.masked_invalid(np.where(share > 0, ratio, np.nan))
    cmap = colormaps["coolwarm"].with_extremes(bad="black")
    norm = TwoSlopeNorm(vmin=-_OCTAVES, vcenter=0.0, vmax=max(top, 1e-6))
    image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")

    # Ticks: at most one label per ~28 px across, ~16 px down.
    xstep = _nice_step(num_experts, axes_w // 28)
    ax.set_xticks(np.arange(0, num_experts, xstep))
    ystep = _nice_step(num_rows, axes_h // 16)
    ypos = np.arange(0, num_rows, ystep)
    ax.set_yticks(ypos, [str(int(layers[i])) for i in ypos])
    ax.tick_params(labelsize=8.5, length=3)
    cell_w, cell_h = axes_w / num_experts, row_px
    # Cell borders where cells are big enough (lines, not minor ticks: those are slow).
    if cell_w >= 8:
        ax.vlines(np.arange(0.5, num_experts - 1, 1), -0.5, num_rows - 0.5, color="white",
                  linewidth=0.6)
    if cell_h >= 8:
        ax.hlines(np.arange(0.5, num_rows - 1, 1), -0.5, num_experts - 0.5, color="white",
                  linewidth=0.6)
    if num_rows * num_experts <= _ANNOTATE_MAX and cell_h >= 14 and cell_w >= 28:
        rgba = cmap(norm(data.filled(-_OCTAVES)))
        for i in range(num_rows):
            for j in range(num_experts):
                r, g, b = rgba[i, j, :3]
                dark = share[i, j] == 0 or 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, _fmt_pct(share[i, j]), ha="center", va="center",
                        fontsize=8 if cell_w >= 34 else 6.5,
                        color="white" if dark else "black")

    cax = fig.add_axes(box(_LEFT, _BOTTOM + _CBAR_BELOW, axes_w, _CBAR_H))
    # Shares under 1/E / 8 are clipped (arrow at the left); over 8/E too when that is < 100 %.
    extend = "both" if uniform * 2 ** _OCTAVES < 100 - 1e-9 else "min"
    cbar = fig.colorbar(image, cax=cax, orientation="horizontal", extend=extend,
                        extendfrac=0.025)
    ticks = np.arange(-_OCTAVES, math.floor(top) + 1)
    if top - math.floor(top) > 0.25:
        ticks = np.append(ticks, top)
    cbar.set_ticks(ticks, labels=[_fmt_pct(uniform * 2.0 ** t) + (" = 1/E" if t == 0 else "")
                                  for t in ticks])
    cbar.ax.tick_params(labelsize=8.5)
    cbar.ax.axvline(0.0, color="black", linewidth=1.2)
    cbar.set_label(f"share of the layer's routed tokens (%, log scale); uniform 1/E = "
                   f"{_fmt_pct(uniform)} % (grey), black = no tokens", fontsize=9.5,
                   labelpad=3)
    return fig


def load_heatmap(counts: np.ndarray, step: Optional[int] = None,
                 tokens: Optional[int] = None) -> np.ndarray:
    """RGB uint8 image [H, W, 3] of ``figure(counts, step, tokens)`` (800 px wide)."""
    fig = figure(counts, step=step, tokens=tokens)
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an RGB uint8 image as PNG (Pillow comes with matplotlib)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
