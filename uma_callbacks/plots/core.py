"""Figures drawn from results only (never from a model): PNG files next to the journal.

- ``gradient_flow``: per-module gradient norm bars (log scale), vanishing/exploding in colour;
- ``fisher`` / ``hessian``: the top eigenvalues (log scale when all positive), and for
  Fisher the per-module traces;
- ``landscape``: heatmap with contours of ``grid_losses`` (2-D) or the curve (1-D);
- ``interpolation``: the path loss against t, with the linear chord between the endpoints.
- any metric with no drawer of its own (one registered from outside the package): a bar
  chart of its scalars (:func:`draw_scalars`).

matplotlib is imported here only (the ``[plots]`` extra). The drawers never touch pyplot:
:func:`_pyplot` gives them an object-oriented stand-in (:class:`_Figures`: each figure a
``matplotlib.figure.Figure`` on its own Agg canvas, no global figure manager), so a figure
may be drawn in any thread: the live triggers draw theirs in a worker thread, off the
training path (:mod:`~uma_callbacks.engine.late_figures`).

Every figure goes through :func:`save_figure`: rendered to PNG bytes in memory first, then
either handed to the caller (:func:`render_result`: the journal writes them, refusing
links) or written through a temporary file renamed into place, so a full disk leaves no
empty or partial PNG behind.
"""

from __future__ import annotations

import contextvars
import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from uma_callbacks.core.safe_write import write_atomically
from uma_callbacks.metrics.base import MetricResult

#: While set (by :func:`render_result`), :func:`save_figure` keeps ``{file name: PNG bytes}`` here instead of writing.
_CAPTURED: contextvars.ContextVar[dict[str, bytes] | None] = contextvars.ContextVar("uma_captured_figures", default=None)


class _Figures:
    """The three pyplot calls the drawers make, without pyplot: safe in any thread.

    ``subplots`` makes a ``matplotlib.figure.Figure`` on its own ``FigureCanvasAgg`` (never
    registered with pyplot's figure manager), ``close`` lets it go, ``get_cmap`` reads the
    colormap registry.
    """

    def subplots(self, nrows: int = 1, ncols: int = 1, *, figsize: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        """``(figure, axes)`` as ``pyplot.subplots`` returns them."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols, **kwargs)

    def close(self, fig: Any) -> None:
        """Nothing to release: the figure is no one's but its drawer's (kept for the drawers' pyplot-like code)."""

    def get_cmap(self, name: str) -> Any:
        """The registered colormap ``name``."""
        import matplotlib

        return matplotlib.colormaps[name]


_FIGURES = _Figures()


def _pyplot() -> _Figures:
    """What the drawers call ``plt``: :class:`_Figures`, thread-safe (no pyplot)."""
    return _FIGURES


#: ``{metric name: drawer(result, folder) -> [png paths]}``; a family's module adds its own
#: with :func:`register_drawer`.
DRAWERS: dict[str, Callable[[MetricResult, Path], list[Path]]] = {}


def register_drawer(
    *names: str,
) -> Callable[[Callable[[MetricResult, Path], list[Path]]], Callable[[MetricResult, Path], list[Path]]]:
    """Decorator: draw results of the metrics ``names`` with the decorated function."""

    def wrap(fn: Callable[[MetricResult, Path], list[Path]]) -> Callable[[MetricResult, Path], list[Path]]:
        for name in names:
            DRAWERS[name] = fn
        return fn

    return wrap


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as the PNG ``path``, or keep it in memory under :func:`render_result`.

    The figure is rendered in memory, then written atomically (no empty or partial file on a
    full disk).

    Raises:
        OSError: the file could not be written (nothing is left at ``path`` that was not there).
    """  # noqa: DOC502 (from write_atomically)
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    captured = _CAPTURED.get()
    if captured is not None:
        captured[path.name] = buffer.getvalue()
        return path
    return write_atomically(path, buffer.getvalue())


def render_result(result: MetricResult) -> dict[str, bytes]:
    """The figures :func:`draw_result` would write, as ``{file name: PNG bytes}``; nothing touches the disk."""
    drawer = drawer_for(result.name)
    captured: dict[str, bytes] = {}
    token = _CAPTURED.set(captured)
    try:
        paths = drawer(result, Path("."))
    finally:
        _CAPTURED.reset(token)
    return {p.name: captured[p.name] for p in paths if p.name in captured}


def draw_result(result: MetricResult, folder: str | Path) -> list[Path]:
    """Draw every figure this result supports into ``folder``; returns the PNG paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return drawer_for(result.name)(result, folder)


def drawer_for(name: str) -> Callable[[MetricResult, Path], list[Path]]:
    """The drawer registered for the metric ``name``, else :func:`draw_scalars`.

    A metric registered from outside the package is drawn without a drawer of its own.
    """
    return DRAWERS.get(name, draw_scalars)


#: ``{metric name: drawer(results, folder) -> [png paths]}`` for figures across checkpoints
#: (``uma report``): ``results`` are ``(step, MetricResult)`` pairs of ``ok`` records in step
#: order, read back from the journal (arrays from the step's ``.npz``/``.json`` when present).
TREND_DRAWERS: dict[str, Callable[[list[tuple[int, MetricResult]], Path], list[Path]]] = {}


def register_trend(*names: str) -> Callable[[Callable[..., list[Path]]], Callable[..., list[Path]]]:
    """Decorator: draw the across-checkpoint figure of the metrics ``names`` in ``uma report``."""

    def wrap(fn: Callable[..., list[Path]]) -> Callable[..., list[Path]]:
        for name in names:
            TREND_DRAWERS[name] = fn
        return fn

    return wrap


def draw_trends(results: dict[str, list[tuple[int, MetricResult]]], folder: str | Path) -> list[Path]:
    """Draw every registered across-checkpoint figure for which ``results`` has data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, drawer in TREND_DRAWERS.items():
        if results.get(name):
            paths += drawer(results[name], folder)
    return paths


#: The largest heatmap, in inches (at 100 dpi: 800 x 680 px): a 72 x 72 map is not 2720 px wide.
HEATMAP_MAX_INCHES = (8.0, 6.8)
#: The most tick labels on a heatmap axis; more rows or columns are labelled every k-th.
HEATMAP_MAX_TICKS = 24


def heatmap(
    matrix: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    path: Path,
    colorbar_label: str = "",
    value_range: tuple[float, float] | None = None,
    cmap: str = "viridis",
    mask: np.ndarray | None = None,
    mask_label: str = "",
) -> Path:
    """A labelled heatmap of ``matrix [rows, cols]`` (integer ticks) saved to ``path``.

    ``value_range`` fixes the colour scale (scores in [0, 1] are drawn on [0, 1], so equal
    heads look equal instead of the scale stretching a 1e-4 spread over every colour); a
    signed score takes a diverging ``cmap`` (``"RdBu_r"``) with a range centred at 0.
    Cells where ``mask`` is True are not values (they cannot be computed): drawn in light
    grey, named by ``mask_label`` under the title. The figure is at most
    :data:`HEATMAP_MAX_INCHES`, with at most :data:`HEATMAP_MAX_TICKS` tick labels per axis.
    """
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    width = min(HEATMAP_MAX_INCHES[0], max(4.0, 0.35 * cols + 2))
    height = min(HEATMAP_MAX_INCHES[1], max(3.0, 0.3 * rows + 1.5))
    fig, ax = plt.subplots(figsize=(width, height))
    vmin, vmax = value_range if value_range is not None else (None, None)
    shown = np.ma.masked_array(matrix, mask=np.broadcast_to(mask, matrix.shape)) if mask is not None else matrix
    colours = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
    image = ax.imshow(shown, aspect="auto", cmap=colours, interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_title(title + (f"\n(grey: {mask_label})" if mask is not None and mask_label else ""), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(_ticks(cols))
    ax.set_yticks(_ticks(rows))
    ax.tick_params(labelsize=8)
    bar = fig.colorbar(image, ax=ax)
    if colorbar_label:
        bar.set_label(colorbar_label)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _ticks(n: int) -> list[int]:
    """Every index up to :data:`HEATMAP_MAX_TICKS`, else every k-th."""
    every = max(1, math.ceil(n / HEATMAP_MAX_TICKS))
    return list(range(0, n, every))


def _layer_values(scalars: dict[str, float], suffix: str) -> dict[str, float]:
    out = {}
    for key, value in scalars.items():
        if key.startswith("layers/") and key.endswith("/" + suffix):
            out[key[len("layers/") : -len(suffix) - 1]] = value
    return out


#: Modules shown in a per-module bar chart (the largest values; the title says how many in all).
TOP_MODULES = 40


def _bar_chart(values: dict[str, float], title: str, xlabel: str, path: Path, colors: list[str] | None = None) -> Path:
    """Horizontal bars with full module names, largest first: readable at 50+ modules.

    The :data:`TOP_MODULES` largest are drawn; the title says how many there are in all.
    """
    plt = _pyplot()
    items = list(values.items())
    order = sorted(range(len(items)), key=lambda i: -items[i][1] if math.isfinite(items[i][1]) else math.inf)
    shown = order[:TOP_MODULES]
    names = [items[i][0] for i in shown]
    widths = [max(items[i][1], 1e-30) if math.isfinite(items[i][1]) else 0.0 for i in shown]
    bar_colors = [colors[i] for i in shown] if colors else "tab:blue"
    longest = max((len(n) for n in names), default=10)
    fig, ax = plt.subplots(figsize=(4.0 + 0.075 * longest, 1.0 + 0.24 * len(names)))
    ax.barh(range(len(names)), widths, color=bar_colors)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()  # the largest on top
    if all(w > 0 for w in widths) and max(widths) / max(min(widths), 1e-30) > 100:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    more = f"\nlargest {len(names)} of {len(values)} modules" if len(values) > len(names) else ""
    ax.set_title(title + more, fontsize=9, loc="left")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


@register_drawer("gradient_flow")
def _gradient_flow(result: MetricResult, folder: Path) -> list[Path]:
    norms = _layer_values(result.scalars, "norm")
    if not norms:
        return []
    colors = []
    for name in norms:
        if result.scalars.get(f"layers/{name}/vanishing"):
            colors.append("tab:orange")
        elif result.scalars.get(f"layers/{name}/exploding"):
            colors.append("tab:red")
        else:
            colors.append("tab:blue")
    title = f"gradient norm per module (total {result.scalars.get('total_norm', float('nan')):.3g})"
    title += "\norange: vanishing, red: exploding" if any(c != "tab:blue" for c in colors) else ""
    return [
        _bar_chart(norms, title, "gradient norm ||∇L|| of the module's parameters", folder / "gradient_flow-layers.png", colors)
    ]


@register_drawer("fisher", "hessian")
def _spectrum_and_layers(result: MetricResult, folder: Path) -> list[Path]:
    paths = []
    eig = result.arrays.get("top_eigenvalues")
    if eig is not None and np.size(eig):
        plt = _pyplot()
        eig = np.asarray(eig, dtype=float)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(np.arange(1, eig.size + 1), eig, "o-")
        if np.all(eig > 0):
            ax.set_yscale("log")
        ax.set_xlabel("index k")
        ax.set_xticks(np.arange(1, eig.size + 1) if eig.size <= 20 else np.linspace(1, eig.size, 10).round())
        ax.set_ylabel("eigenvalue λ_k")
        ax.set_title(f"{result.name}: top {eig.size} eigenvalues")
        fig.tight_layout()
        path = folder / f"{result.name}-spectrum.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    traces = _layer_values(result.scalars, "trace")
    if traces:
        label = "Fisher trace (1/N) Σ‖g_i‖² of the module" if result.name == "fisher" else "trace"
        paths.append(_bar_chart(traces, f"{result.name} trace per module", label, folder / f"{result.name}-layers.png"))
    return paths


@register_drawer("landscape")
def _landscape(result: MetricResult, folder: Path) -> list[Path]:
    grid = result.arrays.get("grid_losses")
    if grid is None:
        return []
    plt = _pyplot()
    grid = np.asarray(grid, dtype=float)
    alphas = np.asarray(result.arrays.get("alphas", np.arange(grid.shape[0])), dtype=float)
    path = folder / "landscape.png"
    if grid.ndim == 1 or min(grid.shape) == 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(alphas, grid.reshape(-1), "o-")
        ax.set_xlabel("α (step along d1, in normalised units)")
        ax.set_ylabel("probe loss L(θ + α d1)")
    else:
        betas = np.asarray(result.arrays.get("betas", np.arange(grid.shape[1])), dtype=float)
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        mesh = ax.pcolormesh(betas, alphas, grid, shading="auto", cmap="viridis")
        finite = grid[np.isfinite(grid)]
        if finite.size and finite.max() > finite.min():
            ax.contour(betas, alphas, grid, levels=12, colors="white", linewidths=0.6)
        fig.colorbar(mesh, ax=ax, label="probe loss L(θ + α d1 + β d2)")
        ax.plot([0], [0], "r+", markersize=10, label="θ (this checkpoint)")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("β (step along d2, in normalised units)")
        ax.set_ylabel("α (step along d1, in normalised units)")
    ax.set_title(f"loss landscape (roughness {result.scalars.get('roughness', float('nan')):.3g})")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]


@register_drawer("interpolation")
def _interpolation(result: MetricResult, folder: Path) -> list[Path]:
    ts = result.arrays.get("ts")
    losses = result.arrays.get("path_losses")
    if ts is None or losses is None:
        return []
    plt = _pyplot()
    ts = np.asarray(ts, dtype=float)
    losses = np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ts, losses, "o-", label="path")
    start, end = result.scalars.get("loss_start"), result.scalars.get("loss_end")
    if start is not None and end is not None:
        ax.plot([0, 1], [start, end], "k--", label="chord")
    ax.axvline(0, color="grey", lw=0.5)
    ax.axvline(1, color="grey", lw=0.5)
    ax.set_xlabel("t (0: previous checkpoint, 1: this one)")
    ax.set_ylabel("loss")
    ax.set_title(f"interpolation (barrier {result.scalars.get('barrier_height', float('nan')):.3g})")
    ax.legend()
    fig.tight_layout()
    path = folder / "interpolation.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]


#: Scalars shown in the default figure (the largest in magnitude; the title says how many in all).
TOP_SCALARS = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def draw_scalars(result: MetricResult, folder: Path) -> list[Path]:
    """The default figure: one horizontal bar per finite scalar, as ``<metric>-scalars.png``.

    Bars are signed, the largest magnitude first (:data:`TOP_SCALARS` at most); a result
    without finite scalars draws nothing.
    """
    values = {k: float(v) for k, v in result.scalars.items() if math.isfinite(float(v))}
    if not values:
        return []
    shown = sorted(values, key=lambda k: -abs(values[k]))[:TOP_SCALARS]
    plt = _pyplot()
    longest = max(len(k) for k in shown)
    fig, ax = plt.subplots(figsize=(4.0 + 0.075 * longest, 1.0 + 0.24 * len(shown)))
    ax.barh(range(len(shown)), [values[k] for k in shown], color=["tab:blue" if values[k] >= 0 else "tab:red" for k in shown])
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels(shown, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=0.5)
    more = f"\nlargest {len(shown)} of {len(values)} scalars" if len(values) > len(shown) else ""
    ax.set_title(f"{result.name}: scalars{more}", fontsize=9, loc="left")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    stem = _UNSAFE.sub("_", result.name).strip("._")[:120] or "metric"
    path = save_figure(fig, folder / f"{stem}-scalars.png", dpi=110)
    plt.close(fig)
    return [path]


@register_drawer("trajectory", "information", "fisher_overlap", "task_vectors")
def _no_figure(result: MetricResult, folder: Path) -> list[Path]:
    """Built-in metrics whose scalars are their dashboard lines draw no figure of their own."""
    return []
