"""Circuits and modularity figures: a sane size, masked cells that have no score, a diverging OV map, no covered bar.

Read from the figure's axes data (the image's array and mask, its colormap and norm, the
legend's and bars' extents) just before it is saved, and from the PNG's size.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from uma_callbacks.metrics.base import MetricResult  # noqa: E402
from uma_callbacks.metrics.circuits import circuits_result  # noqa: E402
from uma_callbacks.plots import attention, core, render_result, weight_space  # noqa: E402

LAYERS, HEADS = 6, 12  # MiniLM's: the maps were 2720 x 2310 px


@pytest.fixture()
def saved(monkeypatch):
    """``{file name: figure}`` of each figure saved, seen just before it is rendered."""
    figures = {}
    real = core.save_figure

    def spy(fig, path, dpi=110):
        figures[path.name] = fig
        return real(fig, path, dpi)

    for module in (core, attention, weight_space):
        monkeypatch.setattr(module, "save_figure", spy)
    return figures


def _circuits(layers: int = LAYERS, heads: int = HEADS) -> MetricResult:
    rng = np.random.default_rng(0)
    later = np.kron(np.triu(np.ones((layers, layers)), 1), np.ones((heads, heads)))
    comps = {m: rng.uniform(0.05, 0.4, later.shape) * later for m in ("q", "k", "v")}  # 0 where no score
    return circuits_result(rng.uniform(-0.8, 0.9, (layers, heads)), comps, heads)


def test_composition_maps_are_small_readable_and_mask_the_cells_without_a_score(saved):
    pngs = render_result(_circuits())
    for mode in ("q", "k", "v"):
        name = f"circuits-{mode}_composition.png"
        height, width = matplotlib.image.imread(io.BytesIO(pngs[name])).shape[:2]
        assert width <= 800 and height <= 680
        ax = saved[name].axes[0]
        shown = ax.images[0].get_array()
        layer = np.arange(LAYERS * HEADS) // HEADS
        no_score = layer[:, None] >= layer[None, :]
        assert np.array_equal(np.ma.getmaskarray(shown), no_score)  # masked, not a measured 0
        assert shown.compressed().min() > 0
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"L{i}" for i in range(LAYERS)]
        assert min(t.get_fontsize() for t in ax.get_xticklabels() + ax.get_yticklabels()) >= 8
        assert "grey" in ax.get_title()


def test_ov_copying_uses_a_diverging_colormap_centred_at_zero(saved):
    render_result(_circuits(2, 3))
    image = saved["circuits-ov_copying.png"].axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (-1.0, 1.0)  # 0 in the middle
    cmap = image.get_cmap()
    assert cmap.name.startswith("RdBu")
    low, mid, high = (np.array(cmap(x)[:3]) for x in (0.0, 0.5, 1.0))
    assert mid.min() > 0.9  # white at 0
    assert low[2] > low[0] and high[0] > high[2]  # blue below, red above


def test_modularity_labels_fit_and_its_legend_covers_no_bar(saved):
    scalars = {}
    for i in range(12):
        scalars[f"layers/bert.encoder.layer.{i}.intermediate.dense/q"] = 0.05 + 0.01 * i
        scalars[f"layers/bert.encoder.layer.{i}.intermediate.dense/q_shuffled"] = 0.05
    render_result(MetricResult(name="modularity", scalars=scalars))
    fig = saved["modularity.png"]
    ax = fig.axes[0]
    FigureCanvasAgg(fig).draw()  # the figure was closed after saving: draw it again to measure it
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)
    frame = fig.bbox
    for label in ax.get_xticklabels():
        box = label.get_window_extent(renderer)
        assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0  # not clipped
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(12)]
    assert "bert.encoder.layer.<i>.intermediate.dense" in ax.get_xlabel()
