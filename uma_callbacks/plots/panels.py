"""The panels of ``report.png``: one panel per quantity (``<metric>/<scalar>``) against the step.

Series are named ``<series label>/<scalar>``; a label is the metric name, or the metric name
and the options that tell its configurations apart (``fisher (top_k=5)``, built by
:mod:`uma_callbacks.report`). The configurations of one quantity share its panel, one
labelled line each.

What a panel shows, and why:

- **Shared x range.** Every panel spans the run's steps (all steps of all series), so a
  metric first measured at the second checkpoint starts where it does in time.
- **No fifth-digit swings.** A panel's y range is at least :data:`MIN_RELATIVE_SPAN` (5%)
  of the largest magnitude it draws: 0.26304 .. 0.26309 is a flat line near 0.263, not a
  swing from the bottom of the panel to the top. When the range was widened so, the panel
  title says by how much the values moved (``moves 0.02%``).
- **No panel for what does not change.** A quantity whose drawable values are all equal
  (a flat zero included) or that has a single value is not a panel: it is one item of the
  text row under the panels (``attention/n_induction_heads = 0 at all 4 steps``).
- Each quantity once: a ``*_stderr`` series is the ±1 standard-error band of its quantity,
  and a series equal step for step to an earlier one (the probe loss several metrics report)
  is named in that one's title. Seconds and peak memory stay in the table.

matplotlib is imported only when a figure is built (the ``[plots]`` extra), with Agg.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: The smallest y range of a panel, as a fraction of the largest magnitude it draws.
MIN_RELATIVE_SPAN = 0.05

#: The largest magnitude drawn (matplotlib's axis arithmetic overflows near 1e308); larger
#: values are listed in the table only, and the panel says how many.
DRAWABLE = 1e200

#: Units of the scalars whose unit is known, by scalar name (the y-axis labels).
UNITS = {
    "seconds": "s",
    "peak_mb": "MiB",
    "loss": "nats",
    "loss_start": "nats",
    "loss_end": "nats",
    "center_loss": "nats",
    "loss_mean": "nats",
    "loss_std": "nats",
    "barrier_height": "nats",
    "icl_loss_drop": "nats",
    "output_entropy": "nats",
    "mean_entropy": "fraction of log(#keys)",
    "top_k_effective_rank": "eigenvalues",
    "effective_rank": "eigenvalues",  # its name in journals before top_k_effective_rank
    "distance": "weight-space L2",
    "distance_from_first": "weight-space L2",
    "update_norm": "weight-space L2",
}
#: Bookkeeping scalars left out of the figure (they are in the table).
LEFT_OUT = ("seconds", "peak_mb", "over_budget")

_PANEL_W, _PANEL_H, _LINE_H = 3.8, 2.9, 0.17  # inches: one panel, one line of the text row
_TICK_POINTS = 7  # the tick labels' font size
#: Inches around each panel's axes for its 7-point labels: right of the y tick labels (the
#: y label and the ticks' pads), right, top (the title) and bottom (the x tick labels and
#: label). Only the y tick labels' width changes from panel to panel: it is measured, the
#: widest label of the figure. ``tight_layout`` measured everything by drawing the figure
#: once more: 2.4 s of a 40-panel report's 6.2 s.
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 0.34, 0.12, 0.26, 0.42


def split_name(name: str) -> tuple[str, str, str]:
    """``(metric, config label or "", scalar)`` of a series name ``"<label>/<scalar>"``.

    The scalar is after the last ``/`` (top-level scalar names hold none); a label
    ``"fisher (top_k=5)"`` gives ``("fisher", "top_k=5", scalar)``.

    Example:
        >>> split_name("fisher (top_k=5)/trace")
        ('fisher', 'top_k=5', 'trace')
        >>> split_name("gradient_flow/total_norm")
        ('gradient_flow', '', 'total_norm')
    """
    label, _, scalar = name.rpartition("/")
    if label.endswith(")") and " (" in label:
        metric, _, options = label.partition(" (")
        return metric, options[:-1], scalar
    return label, "", scalar


def drawable(value: float) -> bool:
    """Whether ``value`` can be drawn (finite and at most :data:`DRAWABLE` in magnitude)."""
    return math.isfinite(value) and abs(value) <= DRAWABLE


@dataclass
class Panel:
    """One quantity: its series (one per configuration), its band series, and what it stands for."""

    metric: str
    scalar: str
    names: list[str] = field(default_factory=list)
    twins: list[str] = field(default_factory=list)

    def points(self, series: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
        """``{series name: {step: value}}`` of the drawable values."""
        return {n: {s: v for s, v in sorted(series[n].items()) if drawable(v)} for n in self.names}


@dataclass
class ReportFigure:
    """The built figure and what it left out of the panels.

    Attributes:
        figure: the matplotlib figure (close it when done).
        panels: the quantities drawn as panels, in order (one per axes).
        not_drawn: one text item per series not drawn as a panel: constant or single values.
        x_range: the x limits every panel shares.
    """

    figure: Any
    panels: list[Panel]
    not_drawn: list[str]
    x_range: tuple[float, float]


def report_figure(series: dict[str, dict[int, float]], title: str = "uma report") -> ReportFigure:
    """Build ``report.png``'s figure from ``{"<label>/<scalar>": {step: value}}`` (see the module docstring).

    Raises:
        ValueError: no series to draw.
    """
    if not series:
        raise ValueError("report: the journal holds no successful records to draw")
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    bands = {f"{n}_stderr" for n in series if f"{n}_stderr" in series}
    candidates = [n for n in series if n not in bands and split_name(n)[2] not in LEFT_OUT] or list(series)
    kept, same_as = _each_quantity_once(candidates, series)
    panels: list[Panel] = []
    not_drawn: list[str] = []
    by_key: dict[tuple[str, str], Panel] = {}
    for name in kept:
        metric, _, scalar = split_name(name)
        panel = by_key.get((metric, scalar))
        if panel is None:
            panel = by_key[(metric, scalar)] = Panel(metric, scalar)
            panels.append(panel)
        panel.names.append(name)
        panel.twins += same_as.get(name, [])
    drawn = []
    for panel in panels:
        if _varies(panel.points(series)):
            drawn.append(panel)
        else:
            not_drawn += [_describe(n, series[n]) for n in panel.names]
    x_range = _x_range(series)
    cols = min(4, max(1, len(drawn)))
    rows = math.ceil(len(drawn) / cols)
    width = _PANEL_W * cols
    text = _text_lines(not_drawn, width)
    text_h = (0.25 + _LINE_H * len(text)) if text else 0.0
    height = _PANEL_H * rows + text_h + 0.35
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height)  # above the panels' titles (a spike line makes it two)
    top = 1 - 0.35 / height
    bottom = text_h / height
    if drawn:
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, panel in zip(axes.flat, drawn):
            _draw_panel(ax, panel, series, x_range, FuncFormatter, MaxNLocator)
        for ax in list(axes.flat)[len(drawn) :]:
            ax.remove()
        _place_panels(fig, rows, cols, bottom, top, _tick_label_width(fig, list(axes.flat)[: len(drawn)]))
    if text:
        fig.text(0.01, (text_h - 0.1) / height, "\n".join(text), fontsize=7, va="top", ha="left", family="monospace")
    return ReportFigure(fig, drawn, not_drawn, x_range)


def _tick_label_width(fig: Any, axes: list[Any]) -> float:
    """Inches of the widest y tick label of ``axes`` (measured as text, without drawing the figure)."""
    from matplotlib.font_manager import FontProperties

    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=_TICK_POINTS)
    widest = 0.0
    for ax in axes:
        low, high = sorted(ax.get_ylim())
        locations = [t for t in ax.yaxis.get_majorticklocs() if low <= t <= high]
        for text in ax.yaxis.get_major_formatter().format_ticks(locations):
            widest = max(widest, renderer.get_text_width_height_descent(text, prop, ismath=False)[0])
    return widest / fig.dpi


def _place_panels(fig: Any, rows: int, cols: int, bottom: float, top: float, tick_labels: float) -> None:
    """Lay the ``rows x cols`` grid out in cells of :data:`_PANEL_W` x :data:`_PANEL_H` inches between ``bottom`` and ``top``.

    Each cell keeps the margins (``_MARGIN_*``) around its axes, and ``tick_labels``
    inches more on the left for the widest y tick label; ``bottom`` and ``top`` are
    fractions of the figure's height (the text row below, the title above).
    """
    width, height = fig.get_size_inches()
    left = _MARGIN_LEFT + tick_labels
    axes_w = _PANEL_W - left - _MARGIN_RIGHT
    axes_h = _PANEL_H - _MARGIN_TOP - _MARGIN_BOTTOM
    fig.subplots_adjust(
        left=left / width,
        right=1 - _MARGIN_RIGHT / width,
        bottom=bottom + _MARGIN_BOTTOM / height,
        top=top - _MARGIN_TOP / height,
        wspace=(left + _MARGIN_RIGHT) / axes_w,
        hspace=(_MARGIN_TOP + _MARGIN_BOTTOM) / axes_h,
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _draw_panel(ax: Any, panel: Panel, series: dict[str, dict[int, float]], x_range: tuple[float, float],
                formatter: Any, locator: Any) -> None:  # fmt: skip
    """One quantity's lines (one per configuration), bands, limits and labels on ``ax``."""
    points = panel.points(series)
    several = len(panel.names) > 1
    extent: list[float] = []
    for name in panel.names:
        steps = list(points[name])
        values = [points[name][s] for s in steps]
        options = split_name(name)[1]
        (line,) = ax.plot(steps, values, "o-", ms=3, label=options or (panel.metric if several else None))
        extent += values
        band = series.get(f"{name}_stderr")
        if band:
            err = [band[s] if drawable(band.get(s, math.nan)) else math.nan for s in steps]
            low = [v - e for v, e in zip(values, err)]
            high = [v + e for v, e in zip(values, err)]
            ax.fill_between(steps, low, high, alpha=0.25, color=line.get_color(), label="±1 s.e." if not several else None)
            extent += [x for x in low + high if drawable(x)]
    left_out = sum(len(series[n]) - len(points[n]) for n in panel.names)
    ylim, moved = y_limits(extent)
    ax.set_ylim(*ylim)
    ax.set_xlim(*x_range)
    twin_names = [_twin_name(t, panel) for t in panel.twins]
    also = f" (= {twin_names[0]})" if len(twin_names) == 1 else f" (= {len(twin_names)} identical series)" if twin_names else ""
    also += f" [{left_out} value(s) beyond ±{DRAWABLE:g}: in the table]" if left_out else ""
    also += f" [moves {moved:.2g}% of its size]" if moved is not None else ""
    ax.set_title(panel.metric + also, fontsize=7, loc="left")
    unit = UNITS.get(panel.scalar)
    ax.set_ylabel(f"{panel.scalar} ({unit})" if unit else panel.scalar, fontsize=7)
    ax.set_xlabel("step", fontsize=7)
    ax.xaxis.set_major_locator(locator(integer=True))
    ax.yaxis.set_major_formatter(formatter(tick_format(ylim)))  # no offset text over the title
    ax.tick_params(labelsize=_TICK_POINTS)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")


def _twin_name(name: str, panel: Panel) -> str:
    """How a panel's title names a series equal to its own: as briefly as the title allows."""
    metric, options, scalar = split_name(name)
    if metric != panel.metric:
        return name
    if scalar == panel.scalar and options:
        return options  # another configuration of this quantity
    return f"{scalar} ({options})" if options else scalar


def y_limits(values: list[float]) -> tuple[tuple[float, float], float | None]:
    """A panel's y limits: the data with 5% margins, widened to :data:`MIN_RELATIVE_SPAN` of its magnitude.

    Returns:
        ``((bottom, top), moved)``: ``moved`` is the values' spread in percent of their
        largest magnitude when the range was widened, else None.

    Example:
        >>> (low, high), moved = y_limits([0.26304, 0.26309])
        >>> round(high - low, 4), round(moved, 3)
        (0.0145, 0.019)
    """
    finite = [v for v in values if drawable(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    span = hi - lo
    size = max(abs(lo), abs(hi))
    wanted = MIN_RELATIVE_SPAN * size
    if span >= wanted or size == 0:
        pad = 0.05 * span if span > 0 else 0.5
        return (lo - pad, hi + pad), None
    mid = lo / 2 + hi / 2
    half = 0.55 * wanted  # the minimum span and the usual 5% margins
    return (mid - half, mid + half), 100.0 * span / size


def tick_format(limits: tuple[float, float]) -> Callable[[float, Any], str]:
    """Tick labels with as many digits as the axis range needs, never an offset or a multiplier.

    ``3.91275`` and ``3.913``, ``4e-05``: the value is read off the axis itself.
    """
    lo, hi = limits
    span = hi / 2 - lo / 2  # halves: +-1e308 must not overflow to inf
    scale = max(abs(lo), abs(hi)) or 1.0
    ratio = scale / span / 2 if span > 0 else math.inf
    digits = max(3, min(10, math.ceil(math.log10(ratio)) + 3)) if 0 < ratio < math.inf else 3
    return lambda value, _pos: f"{value:.{digits}g}"


def _varies(points: dict[str, dict[int, float]]) -> bool:
    """Whether a panel has a line worth drawing: a series of two values or more, not all equal."""
    values = [v for p in points.values() for v in p.values()]
    return any(len(p) >= 2 for p in points.values()) and max(values) > min(values)


def _describe(name: str, values: dict[int, float]) -> str:
    """One item of the text row: ``name = v at all N steps (a-b)`` or ``name = v at step s only``."""
    points = {s: v for s, v in sorted(values.items()) if drawable(v)}
    if not points:
        return f"{name}: no drawable value (in the table)"
    steps = list(points)
    if len(steps) == 1:
        return f"{name} = {points[steps[0]]:.6g} at step {steps[0]} only"
    return f"{name} = {points[steps[0]]:.6g} at all {len(steps)} steps ({steps[0]}-{steps[-1]})"


def _text_lines(items: list[str], width_in: float) -> list[str]:
    if not items:
        return []
    body = "; ".join(items)
    chars = max(60, int(width_in * 15))  # 7-point monospace: about 15 characters per inch
    return ["Not drawn (constant or a single value):", *textwrap.wrap(body, chars)]


def _x_range(series: dict[str, dict[int, float]]) -> tuple[float, float]:
    """The run's steps, with a margin: the x limits of every panel."""
    steps = [s for points in series.values() for s in points]
    lo, hi = min(steps), max(steps)
    pad = 0.04 * (hi - lo) if hi > lo else 0.5
    return (lo - pad, hi + pad)


def _each_quantity_once(names: list[str], series: dict[str, dict[int, float]]) -> tuple[list[str], dict[str, list[str]]]:
    """Drop series that repeat an earlier one step for step (the probe loss several metrics report).

    Returns ``(kept names, {kept: [the names it stands for]})``.
    """
    kept: list[str] = []
    same_as: dict[str, list[str]] = {}
    for name in names:
        twin = next((k for k in kept if _same_values(series[k], series[name])), None)
        if twin is None:
            kept.append(name)
        else:
            same_as.setdefault(twin, []).append(name)
    return kept, same_as


def _same_values(a: dict[int, float], b: dict[int, float]) -> bool:
    return set(a) == set(b) and all(math.isclose(a[s], b[s], rel_tol=1e-9, abs_tol=1e-12) for s in a)
