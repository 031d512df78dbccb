"""Figure of ``hessian_density``, from results only: the SLQ eigenvalue density on a log scale.

The Gaussian-smoothed density (log10 axis: the outliers hold ~1/P of the mass each and are
invisible on a linear one), the bulk edge, the outliers' region and the negative side
shaded; its grid and density also as ``hessian_density.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import _pyplot, register_drawer, save_figure
from uma_callbacks.plots.tables import save_table


@register_drawer("hessian_density")
def _density(result: MetricResult, folder: Path) -> list[Path]:
    grid = np.asarray(result.arrays.get("grid", []), dtype=float).reshape(-1)
    density = np.asarray(result.arrays.get("density", []), dtype=float).reshape(-1)
    if not grid.size or grid.size != density.size:
        return []
    table = save_table(["eigenvalue", "density"], list(zip(grid.tolist(), density.tolist())), folder / "hessian_density.csv")
    s = result.scalars
    # down to a tenth of the smallest quadrature node's bump: an outlier weighs ~1/P of the
    # mass, about 1e-7 of the bulk's peak on a 20M-parameter model
    weights = np.asarray(result.arrays.get("weights", []), dtype=float)
    smallest = float(np.nanmin(weights[weights > 0])) / max(weights.shape[0], 1) if np.any(weights > 0) else 1e-8
    sigma = float(result.meta.get("sigma") or (grid[-1] - grid[0]) / grid.size)
    floor = max(min(0.1 * smallest / (sigma * np.sqrt(2 * np.pi)), float(density.max()) * 1e-4), float(density.max()) * 1e-12, 1e-300)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.0))
    ax.semilogy(grid, np.maximum(density, floor), lw=1.2, color="C0", label="SLQ density")
    ax.set_ylim(floor, float(density.max()) * 3)
    n_params = result.meta.get("n_params")
    if n_params:  # what one eigenvalue alone puts in the smoothed density: the scale to read the tail by
        one = 1.0 / (float(n_params) * sigma * np.sqrt(2 * np.pi))
        if floor < one < float(density.max()):
            ax.axhline(one, color="0.45", ls=":", lw=0.9, label="height of one eigenvalue (1/P)")
    edge, outliers = s.get("bulk_edge"), int(s.get("n_outliers", 0) or 0)
    if edge is not None and np.isfinite(edge) and outliers > 0:
        ax.axvline(edge, color="C3", ls="--", lw=1, label=f"bulk edge {edge:.3g}")
        ax.axvspan(edge, grid[-1], color="C3", alpha=0.08, label=f"~{outliers} outlier eigenvalue{'s' if outliers > 1 else ''} above it")
    else:
        ax.plot([], [], " ", label="no gap above the bulk: no outliers")
    if grid[0] < 0:
        ax.axvspan(grid[0], min(0.0, grid[-1]), color="0.5", alpha=0.12,
                   label=f"negative mass {s.get('negative_mass', float('nan')):.2g}")  # fmt: skip
    trace, err = s.get("trace"), s.get("trace_stderr")
    steps = np.asarray(result.arrays.get("nodes", []), dtype=float)
    m = int(np.max(np.sum(~np.isnan(steps), axis=1))) if steps.ndim == 2 and steps.size else 0
    title = f"Hessian eigenvalue density (SLQ: {weights.shape[0] if weights.ndim == 2 else '?'} vectors \u00d7 {m} Lanczos steps)"
    if trace is not None:
        title += f"\ntrace {trace:.4g} \u00b1 {err:.2g}, \u03bb_max {s.get('lambda_max', float('nan')):.4g}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("eigenvalue \u03bb")
    ax.set_ylabel("density (log scale)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = folder / "hessian_density.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path, table]
