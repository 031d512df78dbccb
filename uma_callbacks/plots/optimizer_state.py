"""Figures of ``optimizer_state``, from results only: per module, the update-to-weight ratio and the effective learning rate.

Two bar panels over the modules in model order (log scale): ``layers/<module>/update_ratio``
= ||u|| / ||theta|| and ``layers/<module>/effective_lr`` = ||u|| / ||m_hat||, with the
overall value as a dashed line. Lower layers' update spikes show first here.
"""

from __future__ import annotations

import math
from pathlib import Path

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import _pyplot, register_drawer, save_figure

#: The per-module scalars drawn, one panel each, with their axis labels.
PANELS = (("update_ratio", "||update|| / ||weight||"), ("effective_lr", "||update|| / ||m_hat||"))


@register_drawer("optimizer_state")
def _optimizer_state(result: MetricResult, folder: Path) -> list[Path]:
    modules = [
        k[len("layers/") : -len("/update_ratio")]
        for k in result.scalars
        if k.startswith("layers/") and k.endswith("/update_ratio")
    ]
    if not modules:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(PANELS), figsize=(max(6.0, 0.35 * len(modules) + 2.0) * len(PANELS) / 1.5, 3.8), squeeze=False
    )
    for ax, (key, label) in zip(axes[0], PANELS):
        values = [result.scalars.get(f"layers/{m}/{key}", math.nan) for m in modules]
        shown = [v if v > 0 else math.nan for v in values]  # a zero update has no place on a log axis
        ax.bar(range(len(modules)), shown, color="tab:blue")
        overall = result.scalars.get(key)
        if overall is not None and overall > 0:
            ax.axhline(overall, color="r", ls="--", lw=1, label=f"overall {overall:.3g}")
            ax.legend(fontsize=7)
        if any(v == v for v in shown):
            ax.set_yscale("log")
        ax.set_xticks(range(len(modules)))
        ax.set_xticklabels(modules, rotation=90, fontsize=6)
        ax.set_ylabel(label)
        ax.set_title(f"{key} per module", fontsize=9)
    fig.tight_layout()
    path = folder / "optimizer_state.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
