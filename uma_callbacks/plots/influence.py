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


#: characters of a sample's text shown in the figure's table (the CSV keeps up to MAX_TEXT_CHARS)
SHOWN_TEXT_CHARS = 60


@register_drawer("influence")
def _influence(result: MetricResult, folder: Path) -> list[Path]:
    si = np.asarray(result.arrays.get("self_influence", []), dtype=float).reshape(-1)
    losses = np.asarray(result.arrays.get("losses", []), dtype=float).reshape(-1)
    if not si.size or si.size != losses.size:
        return []
    header, rows = influence_rows(result)
    table = save_table(header, rows, folder / "influence.csv")
    top_si = [r[1] for r in rows if r[0] == "largest self-influence"]
    top_loss = [r[1] for r in rows if r[0] == "largest loss"]
    shown = top_si + [i for i in top_loss if i not in top_si]  # the samples marked on the plot
    plt = _pyplot()
    fig, (ax, tab) = plt.subplots(
        2, 1, figsize=(8.0, 4.2 + 0.22 * len(shown)), gridspec_kw={"height_ratios": [3.0, 0.5 + 0.22 * len(shown)]}
    )
    floor = max(float(si[si > 0].min()) if np.any(si > 0) else 1e-300, 1e-300)
    y = np.maximum(si, floor)
    ax.scatter(losses, y, s=12, color="0.6", alpha=0.8, label="probe sample")
    ax.scatter(losses[top_si], y[top_si], s=22, color="C3", label=f"{len(top_si)} largest self-influence")
    ax.scatter(losses[top_loss], y[top_loss], s=70, facecolors="none", edgecolors="C2", linewidths=1.3,
               label=f"{len(top_loss)} largest loss")  # fmt: skip
    for i in shown:
        ax.annotate(str(i), (losses[i], y[i]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    # a log axis only when the values span a decade; within one, its ticks say less than a linear axis
    if np.all(si > 0) and si.max() > 10 * si.min():
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_xlabel("probe loss at this checkpoint")
    ax.set_ylabel("self-influence  \u03a3\u209c \u03b7\u209c \u2016g\u1d62(\u03b8\u209c)\u2016\u00b2")
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    n = si.size
    k = max(1, math.ceil(0.1 * n))
    share = result.scalars.get("self_influence_top10_share", float("nan"))
    rho = result.scalars.get("loss_rank_correlation", float("nan"))
    steps = [int(s) for s in np.asarray(result.arrays.get("steps", []), dtype=float).reshape(-1) if math.isfinite(s)]
    n_ckpt = int(result.scalars.get("n_checkpoints", 0))
    over = f"{n_ckpt} checkpoints" if n_ckpt != 1 else "1 checkpoint"
    if steps:
        over += f" (steps {steps[0]}\u2013{steps[-1]})" if len(steps) > 1 else f" (step {steps[0]})"
    corr = f"{rho:.2f}" if math.isfinite(rho) else "none yet (first checkpoint)"
    ax.set_title(
        f"TracIn self-influence of {n} probe samples over {over}\n"
        f"the top {k} samples ({k / n:.0%}) hold {share:.0%} of the total ({k / n:.0%} if all were equal)\n"
        f"rank correlation of the losses with the previous checkpoint: {corr}",
        fontsize=8,
    )
    tab.axis("off")
    n_loss = len(header) - 5
    losses_shown = header[4 : 4 + n_loss][-3:]
    by_index = {r[1]: r for r in rows}
    has_text = any(by_index[i][-1] for i in shown)  # no text column when the probe has none
    cells = []
    for i in shown:
        r = by_index[i]
        why = "both" if i in top_si and i in top_loss else ("self-infl." if i in top_si else "loss")
        row = [str(i), why, f"{r[2]:.3g}", f"{r[3]:.3g}", *[f"{v:.3f}" for v in r[4 : 4 + n_loss][-3:]]]
        if has_text:
            text = r[-1] if len(r[-1]) <= SHOWN_TEXT_CHARS else r[-1][: SHOWN_TEXT_CHARS - 1] + "\u2026"
            row.append(text or "\u2014")
        cells.append(row)
    if cells:
        labels = ["index", "listed for", "self-infl.", "grad norm", *[h.replace("loss@", "loss ") for h in losses_shown]]
        labels += ["text"] if has_text else []
        t = tab.table(cellText=cells, colLabels=labels, loc="upper center", cellLoc="left", colLoc="left")
        t.auto_set_font_size(False)
        t.set_fontsize(7)
        t.auto_set_column_width(list(range(len(labels))))
        for (_, col), cell in t.get_celld().items():
            if has_text and col == len(labels) - 1:  # matplotlib pads 10% of a cell's width: wide text drifted right
                cell.PAD = 0.015
        which = f"the last {len(losses_shown)} checkpoints" if len(losses_shown) > 1 else "this checkpoint"
        tab.set_title(
            f"the marked samples: largest self-influence, then largest loss (losses at {which}; every part in influence.csv)",
            fontsize=8,
        )
    fig.tight_layout()
    path = folder / "influence.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path, table]
