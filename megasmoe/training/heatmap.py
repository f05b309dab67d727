"""Expert-load heatmaps: layers x experts, the share of tokens each expert received.

Rendered with numpy (no plotting library) into an RGB image: one row per MoE layer, one
column per expert, colour from dark purple (no tokens) to yellow (the layer's busiest
expert); rows are normalised per layer so imbalance within a layer is what one sees
(the numbers are in metrics.jsonl as router/max_over_mean_load). Written to
TensorBoard (images tab, ``router/expert_load``) and as
``<run dir>/plots/expert_load_step_<N>.png`` at every evaluation, covering the tokens
routed since the previous one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["load_heatmap", "save_png"]

# A perceptually ordered ramp (approximates viridis at five anchors).
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                     [253, 231, 37]], dtype=np.float64)


def _colour(values: np.ndarray) -> np.ndarray:
    pos = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(_ANCHORS) - 1)
    frac = (pos - lo)[..., None]
    return (_ANCHORS[lo] * (1 - frac) + _ANCHORS[hi] * frac).astype(np.uint8)


def load_heatmap(counts: np.ndarray, cell: int = 16) -> np.ndarray:
    """RGB image [H, W, 3] uint8 of a [layers, experts] count matrix (MoE rows only).

    Each row is divided by its maximum, so the busiest expert of every layer is yellow.
    Rows of dense layers (all zero) are dropped.
    """
    counts = np.asarray(counts, dtype=np.float64)
    rows = counts[counts.sum(axis=1) > 0]
    if rows.size == 0:
        return np.zeros((cell, cell, 3), dtype=np.uint8)
    norm = rows / rows.max(axis=1, keepdims=True)
    image = _colour(norm)
    return np.repeat(np.repeat(image, cell, axis=0), cell, axis=1)


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an RGB uint8 image as PNG (Pillow comes with TensorBoard)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
