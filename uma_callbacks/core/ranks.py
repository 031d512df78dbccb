r"""Rank correlation of two flat tensors: average ranks with ties, and Spearman's rho.

Spearman's rho is Pearson's correlation of the two samples' ranks, ties given their mean
rank (``scipy.stats.spearmanr``, ``rankdata(method="average")``):

.. math::

    \rho = \frac{\sum_i (r_i - \bar r)(s_i - \bar s)}{\sqrt{\sum_i (r_i - \bar r)^2 \sum_i (s_i - \bar s)^2}}

with r, s the ranks of x and y. NaN when either sample is constant (its ranks have no
spread), as scipy gives.
"""

from __future__ import annotations

import math

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x`` [n], tied values given the mean of their ranks; float64 [n].

    Example:
        >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    flat = x.reshape(-1)
    n = flat.numel()
    values, order = torch.sort(flat)
    starts_run = torch.ones(n, dtype=torch.bool, device=flat.device)
    starts_run[1:] = values[1:] != values[:-1]
    del values
    starts = torch.nonzero(starts_run).reshape(-1)
    run = torch.cumsum(starts_run, 0) - 1
    ends = torch.cat([starts[1:], torch.tensor([n], device=flat.device)])
    mean_rank = (starts + ends + 1).to(torch.float64) / 2.0  # the mean of start+1 .. end
    ranks = torch.empty(n, dtype=torch.float64, device=flat.device)
    ranks[order] = mean_rank[run]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of ``x`` [n] and ``y`` [n] (see the module docstring).

    Raises:
        ValueError: ``x`` and ``y`` differ in size.

    Example:
        >>> spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 40.0, 30.0]))
        0.8
    """
    if x.numel() != y.numel():
        raise ValueError(f"spearman: x and y must have as many entries; got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return math.nan
    r = average_ranks(x)
    r -= r.mean()
    s = average_ranks(y)
    s -= s.mean()
    spread = float(r.dot(r)) * float(s.dot(s))
    return float(r.dot(s)) / math.sqrt(spread) if spread > 0 else math.nan
