"""The expert-load picture explains itself: labelled axes, step in the title, a colour bar in
percent with 1/E marked, a readable size, shares (not row-max-normalised) in the cells."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from megasmoe.training import heatmap



def _draw(counts, **kwargs):
    """(figure, RGB array of exactly that figure)."""
    fig = heatmap.figure(counts, **kwargs)
    fig.canvas.draw()
    return fig, np.array(fig.canvas.buffer_rgba())[..., :3]


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]


def _pixel(fig, image, ax, x, y):
    """RGB of the pixel at data coordinates (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return image[int(round(image.shape[0] - py)), int(round(px))].astype(int)


def _hot_counts():
    """6 layers x 8 experts: layer 0 dense (no MoE), layer 1 uniform, layer 3 sends 91 % to
    expert 5, layer 4 never uses expert 2, the rest uniform."""
    counts = np.full((6, 8), 1000.0)
    counts[0] = 0
    counts[3] = 100.0
    counts[3, 5] = 8000 - 7 * 100
    counts[4, 2] = 0
    counts[4, 3] += 1000
    return counts


def _is_grey(rgb):
    return np.ptp(rgb) < 30 and 150 < rgb.mean() < 240


def _is_red(rgb):
    return rgb[0] > 150 and rgb[2] < 100


def _is_blue(rgb):
    return rgb[2] > 150 and rgb[0] < 120


def test_readable_size_and_same_picture_as_returned_image():
    fig, drawn = _draw(_hot_counts(), step=1200)
    image = heatmap.load_heatmap(_hot_counts(), step=1200)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert 700 <= image.shape[1] <= 1000 and 200 <= image.shape[0] <= 1200, image.shape
    assert np.array_equal(image, drawn)  # deterministic: the same picture twice
    big = heatmap.load_heatmap(np.random.default_rng(0).integers(1, 100, (100, 64)), step=1)
    assert 700 <= big.shape[1] <= 1000 and big.shape[0] <= 1200, big.shape


def test_not_blank():
    image = heatmap.load_heatmap(_hot_counts(), step=3)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50
    assert (image.min(axis=2) < 60).mean() > 0.01  # text, black cells
    assert (image.min(axis=2) > 250).mean() > 0.2  # white background


def test_labels_title_and_colour_bar_text():
    fig, _ = _draw(_hot_counts(), step=1200, tokens=409600)
    texts = _texts(fig)
    joined = "\n".join(texts)
    assert any("step 1,200" in t for t in texts), texts
    assert "409,600 tokens" in joined
    ax, cax = fig.axes
    assert ax.get_xlabel() == "expert" and "layer" in ax.get_ylabel().lower()
    # Rows keep their layer index (layer 0 is dense and left out).
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3", "4", "5"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(8)]
    label = cax.get_xlabel()
    assert "share" in label and "%" in label and "1/E = 12.5" in label, label
    ticks = [t.get_text() for t in cax.get_xticklabels()]
    assert "12.5 = 1/E" in ticks and "100" in ticks, ticks
    # Small matrices print the share (percent) in each cell.
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 5 * 8 and {"91.2", "12.5", "25", "0"} <= set(cells), cells


def test_cells_show_the_share_and_colour_bar_exists():
    counts = _hot_counts()
    fig, image = _draw(counts, step=7)
    ax, cax = fig.axes
    # rows: 0 -> layer 1, 2 -> layer 3, 3 -> layer 4
    hot = _pixel(fig, image, ax, 5.3, 2.3)
    assert _is_red(hot), hot
    for expert in (0, 3, 7):  # a uniform layer is grey (uniform), not the max colour
        assert _is_grey(_pixel(fig, image, ax, expert + 0.3, 0.3)), expert
    assert _is_blue(_pixel(fig, image, ax, 0.3, 2.3))  # 1.25 % of layer 3: under 1/E
    assert _pixel(fig, image, ax, 2.3, 3.3).max() < 30  # no tokens: black
    # The colour bar runs from blue (under 1/E) through grey (1/E) to red.
    y = 0.5
    left, mid, right = (_pixel(fig, image, cax, x, y) for x in (-2.9, 0.05, 2.9))
    assert _is_blue(left) and _is_red(right) and np.ptp(mid) < 60, (left, mid, right)


def test_tick_labels_do_not_overlap_for_many_layers_and_experts():
    counts = np.random.default_rng(0).integers(1, 1000, (100, 64)).astype(float)
    fig, _ = _draw(counts, step=1)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    for labels, axis in ((ax.get_xticklabels(), 0), (ax.get_yticklabels(), 1)):
        boxes = sorted((t.get_window_extent(renderer) for t in labels if t.get_text()),
                       key=lambda b: (b.x0, b.y0)[axis])
        assert 4 <= len(boxes) <= 40
        for a, b in zip(boxes, boxes[1:]):
            assert (a.x1 <= b.x0) if axis == 0 else (a.y1 <= b.y0), (a, b)


def test_no_routed_tokens_still_draws():
    fig, image = _draw(np.zeros((3, 8)), step=2)
    assert image.shape[1] >= 700
    assert "no tokens routed" in "\n".join(_texts(fig))


def test_save_png_round_trip(tmp_path):
    from PIL import Image

    image = heatmap.load_heatmap(_hot_counts(), step=4)
    path = tmp_path / "plots" / "expert_load_step_0000004.png"
    heatmap.save_png(image, path)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)


def test_matplotlib_is_imported_lazily():
    code = ("import sys, megasmoe.training.heatmap, megasmoe.training.trainer; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_heatmaps_false_draws_nothing(trained_tiny_run):
    """logging.heatmaps=false (in the tests' FAST overrides) skips the picture: no plots/
    directory. The default draws it: tests/test_install.py checks the README's run."""
    config = (trained_tiny_run / "config.yaml").read_text()
    assert "heatmaps: false" in config
    assert not (trained_tiny_run / "plots").exists()
