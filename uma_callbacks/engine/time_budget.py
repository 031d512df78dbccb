"""The compute budget of one save: the time twin of the memory budget.

``UMAConfig(overhead=0.05)`` allows the metrics 5% of the training wall time since the
last measured save (``seconds_per_save=`` caps it in seconds). Before a save's metrics
run, the session measures the probe's unit costs once (one forward, one forward+backward,
one Hessian-vector product of the whole local probe, :class:`UnitCosts`), predicts each
metric's seconds from them (:func:`estimate_seconds`), shares the budget among the
metrics in proportion to their predictions, and scales work down where a metric's share
is smaller than its prediction, in this documented order:

1. ``hessian``: Hutchinson probes (down to 4), then the Lanczos products (``max_iter``,
   down to ``top_k + 2``, then ``top_k`` itself down to 1);
2. ``landscape``: the grid (``n_points``, odd, down to 5; 2-D before 1-D), then the
   probe batches used (``n_batches``);
3. ``interpolation``: the path points (down to 5), then the probe batches used;
4. ``pruning`` / ``task_vectors``: the probe batches used.

Per-sample-gradient metrics (``gradient_flow``, ``fisher``) cost about one backward and are
not scaled. A metric that cannot fit even scaled down is skipped with the reason, the
costliest first, and its share goes to the others (:func:`share_budget`). What was
scaled, the predicted seconds and the share land in ``meta["compute_budget"]``; the accuracy
that resulted is in the metric's own outputs (``trace_stderr``, Lanczos residuals, grid size).

The predictions are calibrated as the run goes: after each save, every metric's measured
seconds over its prediction updates a per-metric factor (an average of the last ratios),
so a model whose per-sample or attention overheads the unit costs miss is planned right
from the second save on.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from uma_callbacks.core.batches import count_samples
from uma_callbacks.metrics.base import Metric

#: a plan fits when its predicted seconds are at most this multiple of its share
FIT_SLACK = 1.5

#: Measured on the real MiniLM (16-sample probe): a double-backward HVP costs ~2.4 fwd+bwd.
HVP_OVER_BACKWARD = 2.5


@dataclass(frozen=True)
class UnitCosts:
    """Seconds of the primitive operations on the whole local probe.

    Attributes:
        forward: one forward pass (no graph) over every probe sample.
        backward: one forward+backward over every probe sample.
        hvp: one Hessian-vector product over the probe (estimated as
            :data:`HVP_OVER_BACKWARD` x ``backward``).
        n_batches: probe batches.
    """

    forward: float
    backward: float
    hvp: float
    n_batches: int


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


def _batches(metric: Metric, units: UnitCosts) -> int:
    used = getattr(metric, "n_batches", None)
    return min(used, units.n_batches) if used else units.n_batches


def estimate_seconds(metric: Metric, units: UnitCosts) -> float:
    """The predicted seconds of ``metric`` from the unit costs (rough, within ~2x)."""
    name = metric.name
    per_batch = 1.0 / max(1, units.n_batches)
    if name == "hessian":
        k = int(metric.top_k)
        products = getattr(metric, "max_iter", None) or metric.default_max_iter(k, 1)
        return (products + metric.hutchinson_samples) * units.hvp
    if name == "landscape":
        points = int(metric.n_points) ** int(getattr(metric, "dims", 2) or 2)
        return points * units.forward * _batches(metric, units) * per_batch
    if name == "interpolation":
        return (int(metric.n_points) + 2) * units.forward * _batches(metric, units) * per_batch
    if name == "pruning":
        return (len(metric.sparsities) + 1) * units.forward * _batches(metric, units) * per_batch
    if name == "task_vectors":
        return 3 * units.forward * _batches(metric, units) * per_batch + 2 * units.backward
    if name in ("trajectory", "circuits", "modularity"):
        return 0.1 * units.forward
    if name in ("representations", "information", "attention"):
        return 3 * units.forward
    return 1.5 * units.backward  # per-sample gradients: about one backward


def _odd_at_most(value: float, floor: int) -> int:
    n = max(floor, int(value))
    return n if n % 2 == 1 else n - 1 if n - 1 >= floor else floor


def scale_to(metric: Metric, units: UnitCosts, seconds: float) -> tuple[Metric, dict[str, list[Any]]]:
    """A copy of ``metric`` whose predicted seconds fit ``seconds`` (see the module order).

    Returns:
        ``(metric or a scaled copy, {knob: [before, after]})``; the metric itself when it fits
        or has no knob.
    """
    if estimate_seconds(metric, units) <= seconds:
        return metric, {}
    scaled = copy.copy(metric)
    changes: dict[str, list[Any]] = {}

    def set_knob(knob: str, value: Any) -> None:
        before = getattr(scaled, knob)
        if value != before:
            changes.setdefault(knob, [before, value])[1] = value
            setattr(scaled, knob, value)

    name = metric.name
    if name == "hessian":
        k = int(scaled.top_k)
        default_iter = scaled.max_iter or scaled.default_max_iter(k, 1)
        room = seconds / units.hvp
        set_knob("hutchinson_samples", 0 if scaled.hutchinson_samples == 0 else max(4, min(scaled.hutchinson_samples, int(room - default_iter))))
        left = room - scaled.hutchinson_samples
        if left < default_iter:
            set_knob("max_iter", max(k + 2, int(left)))
        if (scaled.max_iter or default_iter) > left and k > 1:
            new_k = max(1, int(left) - 2)
            set_knob("top_k", new_k)
            set_knob("max_iter", max(new_k + 2, min(default_iter, int(left))))
    elif name in ("landscape", "interpolation"):
        per_point = estimate_seconds(scaled, units) / (
            int(scaled.n_points) ** (int(getattr(scaled, "dims", 2) or 2))
            if name == "landscape"
            else int(scaled.n_points) + 2
        )
        if name == "landscape":
            dims = int(getattr(scaled, "dims", 2) or 2)
            set_knob("n_points", _odd_at_most(math.floor((seconds / per_point) ** (1.0 / dims)), 5))
        else:
            set_knob("n_points", max(5, min(int(scaled.n_points), int(seconds / per_point) - 2)))
        if estimate_seconds(scaled, units) > seconds:
            batches = max(1, int(_batches(scaled, units) * seconds / estimate_seconds(scaled, units)))
            set_knob("n_batches", batches)
    elif name in ("pruning", "task_vectors"):
        batches = max(1, int(_batches(scaled, units) * seconds / estimate_seconds(scaled, units)))
        set_knob("n_batches", batches)
    return (scaled if changes else metric), changes


def floor_seconds(metric: Metric, units: UnitCosts) -> float:
    """The predicted seconds of ``metric`` scaled down as far as it goes."""
    return estimate_seconds(scale_to(metric, units, 0.0)[0], units)


def share_budget(
    metrics: Sequence[Metric], units: UnitCosts, seconds: float, calibration: Mapping[str, float] | None = None
) -> list[float]:
    """Each metric's share of ``seconds``: cheap metrics get what they need, the expensive
    ones split the rest equally (water-filling, cheapest first).

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
    estimates = [estimate_seconds(m, units) * factors.get(m.name, 1.0) for m in metrics]
    floors = [floor_seconds(m, units) * factors.get(m.name, 1.0) for m in metrics]
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
