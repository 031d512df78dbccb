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
        paths.append(heatmap(np.asarray(matrix), f"attention: {key} per head", "head", "layer", folder / f"attention-{key}.png", key, (0.0, 1.0)))
    return paths


@register_drawer("circuits")
def _circuit_heatmaps(result: MetricResult, folder: Path) -> list[Path]:
    paths = []
    ov = result.arrays.get("ov_copying")
    if ov is not None and np.ndim(ov) == 2 and np.size(ov):
        paths.append(heatmap(np.asarray(ov), "OV copying score per head", "head", "layer", folder / "circuits-ov_copying.png", "copying"))
    for key in CIRCUIT_ARRAYS:
        matrix = result.arrays.get(key)
        if matrix is None or np.ndim(matrix) != 2 or np.size(matrix) == 0:
            continue
        title = f"{key.replace('_', ' ')} (row: writer, column: reader)"
        paths.append(heatmap(np.asarray(matrix), title, "reading head (layer*H + head)", "writing head", folder / f"circuits-{key}.png", "score"))
    return paths


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
