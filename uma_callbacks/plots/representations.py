"""Figures of the representation and information metrics.

- ``representations`` (per step): the layer-by-layer CKA heatmap ``cka_layers [L, L]``;
- ``information`` (across checkpoints, ``uma report``): the information plane, one
  trajectory per layer through (mi_input, mi_next_token) at each checkpoint, arrows in step order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import _pyplot, heatmap, register_drawer, register_trend, save_figure


@register_drawer("representations")
def _cka_heatmap(result: MetricResult, folder: Path) -> list[Path]:
    matrix = result.arrays.get("cka_layers")
    if matrix is None or np.size(matrix) == 0:
        return []
    return [heatmap(np.asarray(matrix), "linear CKA between layers", "layer", "layer", folder / "representations-cka.png", "CKA")]


def _plane_of(result: MetricResult) -> np.ndarray | None:
    plane = result.arrays.get("information_plane")
    if plane is not None and np.size(plane):
        return np.asarray(plane, dtype=float).reshape(-1, 2)
    rows = []
    i = 0
    while f"layers/{i}/entropy" in result.scalars:
        y = result.scalars.get(f"layers/{i}/mi_next_token", result.scalars.get(f"layers/{i}/mi_target", np.nan))
        rows.append([result.scalars.get(f"layers/{i}/mi_input", np.nan), y])
        i += 1
    return np.asarray(rows, dtype=float) if rows else None


@register_trend("information")
def _information_plane(results: list[tuple[int, MetricResult]], folder: Path) -> list[Path]:
    planes = [(step, _plane_of(r)) for step, r in results]
    planes = [(step, p) for step, p in planes if p is not None]
    if not planes:
        return []
    layers = min(p.shape[0] for _, p in planes)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    cmap = plt.get_cmap("viridis")
    for i in range(layers):
        xs = np.array([p[i, 0] for _, p in planes])
        ys = np.array([p[i, 1] for _, p in planes])
        color = cmap(i / max(1, layers - 1))
        ax.plot(xs, ys, "-", color=color, alpha=0.6, label=f"layer {i}")
        ax.scatter(xs, ys, c=[s for s, _ in planes], cmap="plasma", s=18, zorder=3)
        if xs.size:
            ax.annotate(f"{i}", (xs[-1], ys[-1]), fontsize=7)
    ax.set_xlabel("I(T; X)  mi_input (bits)")
    ax.set_ylabel("I(T; Y)  mi_next_token (bits)")
    ax.set_title(f"information plane ({planes[0][0]} .. {planes[-1][0]}; colour: step)")
    if layers <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "information-plane.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
