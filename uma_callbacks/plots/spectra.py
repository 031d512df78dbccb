"""Figures of ``weight_spectra``, from results only: the log-log ESD of the layers with the smallest and largest alpha.

Each panel is the histogram density of the eigenvalues lambda = s^2 on log-spaced bins
(log-log axes), xmin marked, and the fitted power law c lambda^-alpha over the tail,
scaled so that it carries the tail's share of the eigenvalues; a third panel is alpha per matrix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import _pyplot, register_drawer, save_figure


def _esd_panel(ax: Any, evals: np.ndarray, fit: dict[str, Any], title: str) -> None:
    lam = evals[evals > 0]
    if lam.size < 2:
        ax.set_title(f"{title}: no positive eigenvalues", fontsize=8)
        return
    bins = np.geomspace(lam.min(), lam.max() * (1 + 1e-9), min(40, max(5, lam.size // 4)) + 1)
    density, edges = np.histogram(lam, bins=bins, density=True)
    centres = np.sqrt(edges[:-1] * edges[1:])
    keep = density > 0
    ax.loglog(centres[keep], density[keep], "o", ms=3, label="ESD")
    alpha, xmin = float(fit.get("alpha", math.nan)), float(fit.get("xmin", math.nan))
    if math.isfinite(alpha) and math.isfinite(xmin) and xmin > 0:
        share = float(np.mean(lam >= xmin))
        x = np.geomspace(xmin, lam.max(), 50)
        ax.loglog(x, share * (alpha - 1.0) / xmin * (x / xmin) ** (-alpha), "r--", label=f"alpha = {alpha:.2f}")
        ax.axvline(xmin, color="grey", ls=":", lw=0.8, label="xmin")
    ax.set_xlabel("eigenvalue of W^T W")
    ax.set_ylabel("density")
    ax.set_title(f"{title}: {fit.get('matrix', '')}", fontsize=8)
    ax.legend(fontsize=7)


@register_drawer("weight_spectra")
def _weight_spectra(result: MetricResult, folder: Path) -> list[Path]:
    esd = result.meta.get("esd") or {}
    alpha = np.asarray(result.arrays.get("alpha", []), dtype=float).reshape(-1)
    if not esd and not alpha.size:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in zip(axes[:2], ("esd_min_alpha", "esd_max_alpha"), ("smallest alpha", "largest alpha")):
        evals = np.asarray(result.arrays.get(key, []), dtype=float).reshape(-1)
        _esd_panel(ax, evals, esd.get(key, {}) if isinstance(esd.get(key), dict) else {}, title)
    names = list(result.meta.get("matrices") or [])
    x = np.arange(alpha.size)
    axes[2].plot(x, alpha, "o", ms=3)
    axes[2].axhspan(2.0, 6.0, color="tab:green", alpha=0.1, label="2 <= alpha <= 6")
    axes[2].set_xlabel(f"matrix ({len(names)})")
    axes[2].set_ylabel("alpha")
    axes[2].set_title("power-law exponent per matrix", fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = folder / "weight_spectra.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
