"""Table and figure of ``influence``, from results only.

``influence.csv``: the top-k and bottom-k probe samples by self-influence and by current
loss (one row per sample and part: the part, the index, its self-influence, gradient norm,
loss at each checkpoint, and its text when the result has one). ``influence.png``: self-influence
against current loss for every sample (log scales), the table's samples numbered, and the
largest-self-influence rows as a table under it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.metrics.influence import table_indices
from uma_callbacks.plots.core import _pyplot, register_drawer, save_figure
from uma_callbacks.plots.tables import save_table


def influence_rows(result: MetricResult) -> tuple[list[str], list[list[Any]]]:
    """``(header, rows)`` of the influence table (see the module docstring)."""
    arrays = result.arrays
    history = np.atleast_2d(np.asarray(arrays.get("loss_history", []), dtype=float))
    steps = np.asarray(arrays.get("steps", []), dtype=float).reshape(-1)
    labels = [f"loss@step-{int(s)}" if math.isfinite(s) else f"loss@checkpoint-{j + 1}" for j, s in enumerate(steps)]
    texts = result.meta.get("texts") or {}
    header = ["part", "index", "self_influence", "grad_norm", *labels, "text"]
    rows = []
    si = np.asarray(arrays.get("self_influence", []), dtype=float).reshape(-1)
    norms = np.asarray(arrays.get("grad_norms", []), dtype=float).reshape(-1)
    for part, indices in table_indices(arrays, int(result.meta.get("top_k", 5))):
        for i in indices:
            losses = [float(history[j, i]) for j in range(history.shape[0])] if history.size else []
            rows.append([part, i, float(si[i]), float(norms[i]), *losses, str(texts.get(str(i), ""))])
    return header, rows


@register_drawer("influence")
def _influence(result: MetricResult, folder: Path) -> list[Path]:
    si = np.asarray(result.arrays.get("self_influence", []), dtype=float).reshape(-1)
    losses = np.asarray(result.arrays.get("losses", []), dtype=float).reshape(-1)
    if not si.size or si.size != losses.size:
        return []
    header, rows = influence_rows(result)
    table = save_table(header, rows, folder / "influence.csv")
    plt = _pyplot()
    fig, (ax, tab) = plt.subplots(2, 1, figsize=(7.5, 5.6), gridspec_kw={"height_ratios": [3, 1.2]})
    ax.scatter(losses, np.maximum(si, 1e-300), s=10, color="0.55", alpha=0.7)
    top = [r for r in rows if r[0] == "largest self-influence"]
    # the table's samples named where they lie: filled red the largest self-influence, a green
    # ring the largest loss (a sample in both gets both)
    for r in (r for r in rows if r[0] == "largest loss"):
        ax.scatter([losses[r[1]]], [max(si[r[1]], 1e-300)], s=60, facecolors="none", edgecolors="C2", linewidths=1.2)
    for r in top:
        ax.scatter([losses[r[1]]], [max(si[r[1]], 1e-300)], s=18, color="C3")
    for i in sorted({r[1] for r in rows if r[0] in ("largest self-influence", "largest loss")}):
        ax.annotate(str(i), (losses[i], max(si[i], 1e-300)), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if np.all(si > 0):
        ax.set_yscale("log")
    ax.set_xlabel("current probe loss")
    ax.set_ylabel("self-influence  \u03a3 \u03b7\u209c \u2016g\u1d62\u2016\u00b2")
    share = result.scalars.get("self_influence_top10_share", float("nan"))
    rho = result.scalars.get("loss_rank_correlation", float("nan"))
    ax.set_title(
        f"TracIn self-influence over {int(result.scalars.get('n_checkpoints', 0))} checkpoint(s): the top 10% hold "
        f"{share:.0%};\nrank correlation of the losses with the previous checkpoint {rho:.2f} "
        "(red: largest self-influence, green ring: largest loss)",
        fontsize=8,
    )
    tab.axis("off")
    n_loss = len(header) - 5
    shown_header = ["index", "self-infl.", "grad norm", *header[4 : 4 + n_loss][-3:], "text"]
    cells = [
        [str(r[1]), f"{r[2]:.3g}", f"{r[3]:.3g}", *[f"{v:.3f}" for v in r[4 : 4 + n_loss][-3:]], (r[-1][:40] or "\u2014")]
        for r in top
    ]
    if cells:
        t = tab.table(cellText=cells, colLabels=shown_header, loc="upper center", cellLoc="left")
        t.auto_set_font_size(False)
        t.set_fontsize(7)
        t.auto_set_column_width(list(range(len(shown_header))))
        tab.set_title("largest self-influence (last 3 checkpoints' losses; all in influence.csv)", fontsize=8)
    fig.tight_layout()
    path = folder / "influence.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path, table]
