"""The compute budget of one save: the time twin of the memory budget.

``UMAConfig(overhead=0.05)`` allows the metrics 5% of the training wall time since the
last measured save (``seconds_per_save=`` caps it in seconds). Before a save's metrics
run, the session measures the probe's unit costs once (one forward, one forward+backward,
one Hessian-vector product of the whole local probe, :class:`UnitCosts`), and each metric
says what it costs in them and how it fits less: :meth:`Metric.time_cost
<uma_callbacks.metrics.base.Metric.time_cost>` predicts its seconds,
:meth:`Metric.scaled_to <uma_callbacks.metrics.base.Metric.scaled_to>` gives the config it
runs within a share and the knobs it turned down, :meth:`Metric.min_time_cost
<uma_callbacks.metrics.base.Metric.min_time_cost>` its floor. This module only measures
the units and shares the budget among the metrics in proportion to their predictions; it
never asks which metric it is, so a metric registered from outside the package is
scaled like a built-in one.

Each metric documents its own order in its ``scaled_to`` (fewer Hutchinson probes before
fewer Lanczos products, a coarser grid before fewer probe batches, ...). A metric with no
knob keeps its config (the default: one backward and a half, not scaled). A metric that
cannot fit even scaled down is skipped with the reason, the costliest first, and its
share goes to the others (:func:`share_budget`). What was scaled, the predicted seconds
and the share land in ``meta["compute_budget"]``; the accuracy that resulted is in the
metric's own outputs (``trace_stderr``, Lanczos residuals, grid size).

The predictions are calibrated as the run goes: after each save, every metric's measured
seconds over its prediction updates a per-metric factor (an average of the last ratios),
so a model with overheads the unit costs miss (per-sample gradients, an eager softmax) is
planned right from the second save on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from uma_callbacks.core.batches import count_samples
from uma_callbacks.metrics.base import Metric
from uma_callbacks.metrics.time_cost import UnitCosts

#: a plan fits when its predicted seconds are at most this multiple of its share
FIT_SLACK = 1.5

#: Measured on the real MiniLM (16-sample probe): a double-backward HVP costs ~2.4 fwd+bwd.
HVP_OVER_BACKWARD = 2.5


def measure_unit_costs(model: torch.nn.Module, batches: Sequence[Any], loss_fn: Callable[..., torch.Tensor]) -> UnitCosts:
    """Time one forward and one forward+backward on the first probe batch, scaled to the probe.

    The model's ``.grad`` fields are left as found (gradients are taken with ``autograd.grad``).
    """
    first = batches[0]
    share = sum(count_samples(b) for b in batches) / max(1, count_samples(first))
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss_fn(model, first)  # warm-up: first-call overheads are not the metric's
            started = time.perf_counter()
            loss_fn(model, first)
            forward = time.perf_counter() - started
        started = time.perf_counter()
        loss = loss_fn(model, first).sum()
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
        backward = time.perf_counter() - started
    finally:
        model.train(was_training)
    return UnitCosts(
        forward=forward * share,
        backward=backward * share,
        hvp=HVP_OVER_BACKWARD * backward * share,
        n_batches=len(batches),
    )


def share_budget(
    metrics: Sequence[Metric], units: UnitCosts, seconds: float, calibration: Mapping[str, float] | None = None
) -> list[float]:
    """Each metric's share of ``seconds`` (water-filling, cheapest first).

    Cheap metrics get what they need, the expensive ones split the rest equally.
    A metric that cannot fit its share even scaled down (its floor above :data:`FIT_SLACK`
    x the share) gets nothing, the one with the largest floor first, and the shares are
    filled again without it: as many metrics run as the budget allows, instead of all of
    them sharing a budget none can use.

    Example:
        >>> units = UnitCosts(forward=0.1, backward=0.3, hvp=0.75, n_batches=1)
        >>> from uma_callbacks.metrics import GradientFlow, HessianSpectrum, LossLandscape
        >>> [round(s, 3) for s in share_budget([GradientFlow(), HessianSpectrum(), LossLandscape()], units, 10.0)]
        [0.45, 4.775, 4.775]
        >>> [round(s, 3) for s in share_budget([GradientFlow(), HessianSpectrum(), LossLandscape()], units, 3.0)]
        [0.45, 0.0, 2.55]
    """
    factors = calibration or {}
    estimates = [m.time_cost(units) * factors.get(m.name, 1.0) for m in metrics]
    floors = [m.min_time_cost(units) * factors.get(m.name, 1.0) for m in metrics]
    kept = sorted(range(len(metrics)), key=lambda i: estimates[i])
    while True:
        shares = [0.0] * len(metrics)
        remaining = float(seconds)
        for rank, i in enumerate(kept):
            shares[i] = min(estimates[i], remaining / (len(kept) - rank))
            remaining -= shares[i]
        short = [i for i in kept if floors[i] > FIT_SLACK * shares[i]]
        if not short:
            return shares
        kept.remove(max(short, key=lambda i: floors[i]))
