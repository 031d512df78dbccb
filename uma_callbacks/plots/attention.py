"""Figures of the attention and circuits metrics.

- ``attention`` (per step): one layers x heads heatmap per score (``entropy``,
  ``prev_token``, ``bos``, ``induction``);
- ``circuits`` (per step): the ``ov_copying`` heatmap [L, H] and the three composition
  heatmaps [L H, L H] (rows: the writing head, columns: the reading head);
- ``attention`` (across checkpoints, ``uma report``): the top head's induction score and
  ``icl_loss_drop`` against the step, on twin axes, so that the formation of induction
  heads (a phase change, Olsson et al. 2022) shows in one picture.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import _pyplot, heatmap, register_drawer, register_trend, save_figure

ATTENTION_SCORES = ("entropy", "prev_token", "bos", "induction")
CIRCUIT_ARRAYS = ("q_composition", "k_composition", "v_composition")


@register_drawer("attention")
def _attention_heatmaps(result: MetricResult, folder: Path) -> list[Path]:
    paths = []
    for key in ATTENTION_SCORES:
        matrix = result.arrays.get(key)
        if matrix is None or np.ndim(matrix) != 2 or np.size(matrix) == 0:
            continue
        paths.append(
            heatmap(
                np.asarray(matrix),
                f"attention: {key} per head",
                "head",
                "layer",
                folder / f"attention-{key}.png",
                key,
                (0.0, 1.0),
            )
        )
    return paths


@register_drawer("circuits")
def _circuit_heatmaps(result: MetricResult, folder: Path) -> list[Path]:
    paths = []
    ov = result.arrays.get("ov_copying")
    n_heads = 0
    if ov is not None and np.ndim(ov) == 2 and np.size(ov):
        n_heads = int(np.shape(ov)[1])
        paths.append(
            heatmap(
                np.asarray(ov), "OV copying score per head\n(1: copies, 0: neither, -1: anti-copies)", "head", "layer",
                folder / "circuits-ov_copying.png", "copying score", value_range=(-1.0, 1.0), cmap=OV_CMAP,
            )
        )  # fmt: skip
    for key in CIRCUIT_ARRAYS:
        matrix = result.arrays.get(key)
        if matrix is None or np.ndim(matrix) != 2 or np.size(matrix) == 0:
            continue
        paths.append(composition_map(np.asarray(matrix, dtype=float), n_heads, key, folder / f"circuits-{key}.png"))
    return paths


#: OV copying is a signed score in [-1, 1]: a diverging colormap, white at 0.
OV_CMAP = "RdBu_r"


def not_computable(size: int, n_heads: int) -> np.ndarray | None:
    """``[L H, L H]`` True where the writing head's layer is not before the reading head's (no score there).

    None when ``size`` is not a whole number of layers of ``n_heads`` heads.

    Example:
        >>> not_computable(4, 2).astype(int).tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    """
    if n_heads <= 0 or size % n_heads:
        return None
    layer = np.arange(size) // n_heads
    return layer[:, None] >= layer[None, :]


def composition_map(matrix: np.ndarray, n_heads: int, key: str, path: Path) -> Path:
    """One composition score map ``[L H, L H]`` (rows: writing head, columns: reading head), ticked by layer.

    Only a head of a later layer can read what a head writes: the other cells are not
    scores and are drawn grey (masked), not as a measured 0. The figure is at most
    8 x 6.8 inches whatever the number of heads; ticks name the layers (``L0``, ``L1``, ...)
    at the centre of their heads, with lines between layers.
    """
    size = matrix.shape[0]
    mask = not_computable(size, n_heads) if matrix.shape[0] == matrix.shape[1] else None
    if mask is None:  # heads per layer unknown: the plain map
        return heatmap(
            matrix, f"{key.replace('_', ' ')} (row: writer, column: reader)", "reading head", "writing head", path, "score"
        )
    plt = _pyplot()
    layers = size // n_heads
    fig, ax = plt.subplots(figsize=(min(8.0, max(5.0, 0.12 * size + 3.0)), min(6.8, max(4.2, 0.1 * size + 2.8))))
    scores = matrix[~mask]
    top = float(np.nanmax(scores)) if scores.size and np.isfinite(scores).any() else 1.0
    colours = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_array(matrix, mask=mask), aspect="auto", cmap=colours, interpolation="nearest",
                      vmin=0.0, vmax=max(top, 1e-12))  # fmt: skip
    every = max(1, -(-layers // 16))
    centres = [layer * n_heads + (n_heads - 1) / 2 for layer in range(0, layers, every)]
    names = [f"L{layer}" for layer in range(0, layers, every)]
    ax.set_xticks(centres, names)
    ax.set_yticks(centres, names)
    ax.tick_params(labelsize=9, length=0)
    for edge in range(1, layers):
        ax.axhline(edge * n_heads - 0.5, color="white", lw=0.6)
        ax.axvline(edge * n_heads - 0.5, color="white", lw=0.6)
    ax.set_xlabel(f"reading head, by layer ({n_heads} heads each)", fontsize=10)
    ax.set_ylabel(f"writing head, by layer ({n_heads} heads each)", fontsize=10)
    ax.set_title(f"{key.replace('_', ' ')}\ngrey: no score (the reader is not in a later layer)", fontsize=10)
    fig.colorbar(image, ax=ax).set_label("composition score")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _value(result: MetricResult, key: str) -> float:
    value = result.scalars.get(key)
    return float(value) if value is not None else math.nan


@register_trend("attention")
def _induction_trend(results: list[tuple[int, MetricResult]], folder: Path) -> list[Path]:
    steps = np.array([step for step, _ in results], dtype=float)
    induction = np.array([_value(r, "max_induction") for _, r in results])
    drop = np.array([_value(r, "icl_loss_drop") for _, r in results])
    if not (np.isfinite(induction).any() or np.isfinite(drop).any()):
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, induction, "o-", color="tab:blue", label="induction score of the top head")
    ax.set_xlabel("step")
    ax.set_ylabel("max induction score", color="tab:blue")
    ax.set_ylim(bottom=0)
    other = ax.twinx()
    other.plot(steps, drop, "s--", color="tab:red", label="icl_loss_drop")
    other.set_ylabel("in-context loss drop (nats)", color="tab:red")
    ax.set_title("induction heads across checkpoints")
    handles = ax.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    fig.tight_layout()
    path = folder / "attention-induction-trend.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
