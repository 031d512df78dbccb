"""Figures of ``hessian`` with per-block curvature: the top eigenvalues, then per module lambda_1(H_SS) and tr(H_SS).

The spectrum figure is the one every ``hessian`` result gets (:mod:`uma_callbacks.plots.core`);
a result with ``layers/<module>/top_eigenvalue`` scalars (``HessianSpectrum(blocks=...)``)
adds ``hessian-layers.png``: one horizontal bar per module, its block's top eigenvalue,
and beside it the block's trace with its standard error when the trace was taken.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import TOP_MODULES, _layer_values, _pyplot, _spectrum_and_layers, register_drawer, save_figure


@register_drawer("hessian")
def _hessian(result: MetricResult, folder: Path) -> list[Path]:
    tops = _layer_values(result.scalars, "top_eigenvalue")
    if not tops:
        return _spectrum_and_layers(result, folder)
    spectrum_only = MetricResult(name=result.name, scalars={}, arrays=result.arrays)
    return [*_spectrum_and_layers(spectrum_only, folder), _blocks_chart(result, tops, folder / "hessian-layers.png")]


def _blocks_chart(result: MetricResult, tops: dict[str, float], path: Path) -> Path:
    """Per-module bars: lambda_1(H_SS) (largest first, at most TOP_MODULES), and tr(H_SS) ± stderr."""
    plt = _pyplot()
    traces = _layer_values(result.scalars, "trace")
    errors = _layer_values(result.scalars, "trace_stderr")
    order = sorted(tops, key=lambda m: -tops[m] if math.isfinite(tops[m]) else math.inf)[:TOP_MODULES]
    y = np.arange(len(order))
    longest = max((len(m) for m in order), default=10)
    panels = 2 if traces else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(4.0 + 0.075 * longest + 3.2 * (panels - 1), 1.2 + 0.24 * len(order)), squeeze=False,
        sharey=True,
    )
    ax = axes[0][0]
    values = np.array([tops[m] for m in order], dtype=float)
    ax.barh(y, np.nan_to_num(values), color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(y)
    ax.set_yticklabels(order, fontsize=7)
    ax.invert_yaxis()
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == values.size and positive.size and positive.max() / positive.min() > 100:
        ax.set_xscale("log")
    ax.set_xlabel("top eigenvalue λ₁(H_SS) of the module's block")
    ax.grid(True, axis="x", alpha=0.3)
    if traces:
        tx = axes[0][1]
        tv = np.array([traces.get(m, math.nan) for m in order], dtype=float)
        te = np.array([errors.get(m, 0.0) for m in order], dtype=float)
        tx.barh(y, np.nan_to_num(tv), xerr=np.nan_to_num(te), color="tab:gray", ecolor="black", capsize=2)
        tx.axvline(0.0, color="black", lw=0.6)
        tx.set_xlabel("trace tr(H_SS) ± standard error")
        tx.grid(True, axis="x", alpha=0.3)
    more = f", largest {len(order)} of {len(tops)}" if len(tops) > len(order) else ""
    fig.suptitle(f"hessian per module block ({len(tops)} blocks{more})", fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
