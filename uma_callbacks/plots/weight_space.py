"""Figures of the weight-space metrics (``pruning``, ``task_vectors``, ``modularity``), from results only.

- per step: the pruned loss ratio against sparsity; Q per MLP block beside its shuffled baseline;
- across checkpoints (``uma report``): the pruning curves of every checkpoint and the mask
  distance to the previous checkpoint with ``eb_threshold`` and the early-bird step marked;
  the task-vector norm and the merge losses; the mean Q and its baseline.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import _pyplot, register_drawer, register_trend, save_figure


def _pruning_curve(result: MetricResult) -> tuple[np.ndarray, np.ndarray]:
    sparsities = np.asarray(result.arrays.get("sparsities", []), dtype=float).reshape(-1)
    ratios = [result.scalars.get(f"sparsity/{s:g}/loss_ratio", math.nan) for s in sparsities]
    return sparsities, np.asarray(ratios, dtype=float)


@register_drawer("pruning")
def _pruning(result: MetricResult, folder: Path) -> list[Path]:
    sparsities, ratios = _pruning_curve(result)
    if not sparsities.size:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(np.concatenate([[0.0], sparsities]), np.concatenate([[1.0], ratios]), "o-")
    ax.set_xlabel("sparsity (global magnitude)")
    ax.set_ylabel("pruned loss / dense loss")
    ax.set_title("pruning robustness")
    fig.tight_layout()
    path = folder / "pruning.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]


@register_trend("pruning")
def _pruning_trend(results: list[tuple[int, MetricResult]], folder: Path) -> list[Path]:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, (step, result) in enumerate(results):
        sparsities, ratios = _pruning_curve(result)
        if sparsities.size:
            colour = cmap(i / max(1, len(results) - 1))
            left.plot(
                np.concatenate([[0.0], sparsities]),
                np.concatenate([[1.0], ratios]),
                "o-",
                color=colour,
                label=f"step {step}" if len(results) <= 8 else None,
            )
    left.set_xlabel("sparsity")
    left.set_ylabel("pruned loss / dense loss")
    left.set_title("pruning curve per checkpoint")
    if len(results) <= 8:
        left.legend(fontsize=7)
    points = [(s, r.scalars["mask_distance_prev"]) for s, r in results if "mask_distance_prev" in r.scalars]
    if points:
        right.plot(*zip(*points), "o-")
    threshold = next((r.meta.get("config", {}).get("eb_threshold") for _, r in results if r.meta.get("config")), None)
    if threshold is not None:
        right.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"eb_threshold {threshold:g}")
    birds = sorted({r.scalars["early_bird_step"] for _, r in results if "early_bird_step" in r.scalars})
    for bird in birds:
        right.axvline(bird, color="tab:red", lw=1.2, label=f"early bird (step {bird:g})")
    right.set_xlabel("step")
    right.set_ylabel("mask distance to previous checkpoint")
    right.set_title("early-bird ticket")
    if threshold is not None or birds:
        right.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "pruning-trend.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]


@register_drawer("modularity")
def _modularity(result: MetricResult, folder: Path) -> list[Path]:
    blocks = [k[len("layers/") : -len("/q")] for k in result.scalars if k.startswith("layers/") and k.endswith("/q")]
    if not blocks:
        return []
    plt = _pyplot()
    x = np.arange(len(blocks))
    names, pattern = short_names(blocks)
    longest = max(len(n) for n in names)
    fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 0.45 * len(blocks) + 2.5)), 3.8 + 0.06 * longest))
    ax.bar(x - 0.2, [result.scalars[f"layers/{b}/q"] for b in blocks], 0.4, label="Q")
    shuffled = [result.scalars.get(f"layers/{b}/q_shuffled", math.nan) for b in blocks]
    if not all(math.isnan(v) for v in shuffled):
        ax.bar(x + 0.2, shuffled, 0.4, label="Q shuffled", color="tab:grey")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=0 if longest <= 4 else 45, ha="center" if longest <= 4 else "right", fontsize=8)
    ax.set_xlabel(f"MLP block ({pattern})" if pattern else "MLP block", fontsize=9)
    ax.set_ylabel("Newman's Q")
    ax.set_title("MLP modularity (spectral partition)", loc="left", fontsize=10)
    # the legend above the axes, right of the title: it never covers a bar
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False, borderaxespad=0.2)
    fig.tight_layout()  # makes room for the tick labels and the legend
    path = folder / "modularity.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]


def short_names(names: list[str]) -> tuple[list[str], str]:
    """``names`` without the dotted prefix and suffix they all share, and the pattern that names them.

    Example:
        >>> short_names(["model.layers.0.mlp", "model.layers.1.mlp"])
        (['0', '1'], 'model.layers.<i>.mlp')
        >>> short_names(["a"])
        (['a'], '')
    """
    if len(names) < 2:
        return list(names), ""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    if not head and not tail:
        return list(names), ""
    short = [".".join(p[head : len(p) - tail]) for p in parts]
    pattern = ".".join([*parts[0][:head], "<i>", *(parts[0][len(parts[0]) - tail :] if tail else [])])
    return short, pattern


def _lines(results: list[tuple[int, MetricResult]], keys: list[str], title: str, ylabel: str, path: Path) -> list[Path]:
    series = {k: [(s, r.scalars[k]) for s, r in results if k in r.scalars] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, points in series.items():
        ax.plot(*zip(*points), "o-", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]


@register_trend("task_vectors")
def _task_vectors_trend(results: list[tuple[int, MetricResult]], folder: Path) -> list[Path]:
    paths = _lines(results, ["norm"], "task-vector norm ||theta - theta_base||", "norm", folder / "task_vectors-norm.png")
    merge_keys = sorted({k for _, r in results for k in r.scalars if k.startswith("merge/") or k == "loss"})
    paths += _lines(results, merge_keys, "probe loss of merges", "loss", folder / "task_vectors-merges.png")
    return paths


@register_trend("modularity")
def _modularity_trend(results: list[tuple[int, MetricResult]], folder: Path) -> list[Path]:
    return _lines(results, ["mean_q", "mean_q_shuffled"], "MLP modularity", "Newman's Q", folder / "modularity-trend.png")
