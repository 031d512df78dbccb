"""``report.png``'s panels do not mislead: shared x range, no fifth-digit swings, no panel for what does not change.

The figure is read through :func:`report_figure` (its axes limits and lines), not its pixels.
"""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402

from uma_callbacks.plots.panels import MIN_RELATIVE_SPAN, report_figure, y_limits  # noqa: E402

SERIES = {
    "circuits/mean_ov_copying": {3: 0.26304, 6: 0.26309, 9: 0.26306},  # moves in the fifth digit
    "gradient_flow/total_norm": {3: 1.1, 6: 1.3, 9: 0.8, 12: 0.6},
    "attention/n_induction_heads": {3: 0.0, 6: 0.0, 9: 0.0, 12: 0.0},  # flat zero
    "pruning/early_bird_step": {12: 6.0},  # a single value
    "interpolation/barrier_height": {6: 0.01, 9: 0.02, 12: 0.04},  # starts at the second checkpoint
    "gradient_flow/seconds": {3: 0.1, 6: 0.2, 9: 0.1, 12: 0.3},  # bookkeeping: the table only
}


@pytest.fixture()
def built():
    out = report_figure(SERIES, "test")
    yield out
    plt.close(out.figure)


def test_flat_and_single_point_quantities_take_no_panel(built):
    drawn = {f"{p.metric}/{p.scalar}" for p in built.panels}
    assert drawn == {"circuits/mean_ov_copying", "gradient_flow/total_norm", "interpolation/barrier_height"}
    assert len(built.figure.axes) == 3  # no empty or flat panel
    assert any(t.startswith("attention/n_induction_heads = 0 at all 4 steps") for t in built.not_drawn)
    assert any(t.startswith("pruning/early_bird_step = 6 at step 12 only") for t in built.not_drawn)
    text = "\n".join(t.get_text() for t in built.figure.texts)
    assert "n_induction_heads" in text and "early_bird_step" in text  # the text row under the panels


def test_every_panel_spans_the_runs_steps(built):
    limits = {ax.get_xlim() for ax in built.figure.axes}
    assert len(limits) == 1  # shared
    ((low, high),) = limits
    assert low < 3 and high > 12 and (low, high) == built.x_range  # all the steps, the late-starting metric too
    interpolation = built.figure.axes[[p.metric for p in built.panels].index("interpolation")]
    assert interpolation.get_xlim()[0] < 3  # not autoscaled to its own 6..12


def test_a_fifth_digit_change_is_not_drawn_as_a_swing(built):
    ax = built.figure.axes[[p.metric for p in built.panels].index("circuits")]
    low, high = ax.get_ylim()
    assert high - low >= MIN_RELATIVE_SPAN * 0.26309  # at least 5% of the value's size
    assert low < 0.26304 and high > 0.26309
    assert "moves 0.019% of its size" in ax.get_title(loc="left")
    norm = built.figure.axes[[p.metric for p in built.panels].index("gradient_flow")]
    assert norm.get_ylim()[1] - norm.get_ylim()[0] < 1.0  # a real change keeps its tight range
    assert "moves" not in norm.get_title(loc="left")


def test_y_limits_rule():
    (low, high), moved = y_limits([100.0, 100.001])
    assert high - low == pytest.approx(1.1 * MIN_RELATIVE_SPAN * 100.001) and moved == pytest.approx(1e-3, rel=1e-2)
    (low, high), moved = y_limits([1.0, 2.0])
    assert (low, high) == pytest.approx((0.95, 2.05)) and moved is None
    assert y_limits([-1e-9, 1e-9])[1] is None  # around zero: the data's own range


WIDE_TICKS = {
    "fisher/trace": {100: 1.23456e-9, 200: 1.5e-9, 300: 2.1e-9},
    "hessian/top_eigenvalue": {100: 123456789.0, 200: 123999999.0, 300: 130000000.0},
    "landscape/roughness": {100: -0.000123, 200: -0.000223, 300: -0.000323},
    "gradient_flow/total_norm": {100: 1e150, 200: -1e150, 300: 3e149},
    "trajectory/distance_from_first": {100: 12345.678, 200: 12346.9, 300: 12400.1},
    "fisher (top_k=5)/top_k_effective_rank": {100: 3.0, 200: 4.0, 300: 3.5},
    "fisher (top_k=20)/top_k_effective_rank": {100: 13.0, 200: 14.0, 300: 13.5},
}


@pytest.mark.parametrize("series", [SERIES, WIDE_TICKS], ids=["narrow", "wide"])
def test_no_label_overlaps_another_or_leaves_the_figure(series):
    """The panels are laid out without drawing twice (no ``tight_layout``): drawn once, each
    panel's y label stays left of its tick labels, inside the figure and clear of the panel
    to its left; its title stays under the figure's title and over its axes."""
    built = report_figure(series, "uma report: layout\nred dashed: loss spikes at step 200 (z=12)")
    try:
        fig = built.figure
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        suptitle = fig._suptitle.get_window_extent(renderer)
        axes = fig.axes
        for i, ax in enumerate(axes):
            box = ax.get_window_extent(renderer)
            ylabel = ax.yaxis.label.get_window_extent(renderer)
            ticks = [t.get_window_extent(renderer) for t in ax.yaxis.get_ticklabels() if t.get_visible() and t.get_text()]
            assert ticks
            assert ylabel.x0 >= 0 and all(ylabel.x1 <= t.x0 + 1 for t in ticks), (ax.get_ylabel(), ylabel, ticks)  # 1 pixel: rounding
            assert all(t.x1 <= box.x0 for t in ticks)
            title = ax.title.get_window_extent(renderer) if ax.get_title() else ax._left_title.get_window_extent(renderer)
            assert box.y1 <= title.y0 and title.y1 <= suptitle.y0, ax.get_title(loc="left")
            if i % 4:  # the panel to its left in the grid
                assert axes[i - 1].get_window_extent(renderer).x1 < ylabel.x0
        assert fig.bbox.x1 >= max(ax.get_window_extent(renderer).x1 for ax in axes)
    finally:
        plt.close(built.figure)
