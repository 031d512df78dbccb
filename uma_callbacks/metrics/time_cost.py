"""A metric's time cost in measured units, and the helpers its scaling rules share.

Each metric predicts its own seconds from :class:`UnitCosts` (:meth:`Metric.time_cost
<uma_callbacks.metrics.base.Metric.time_cost>`) and says how it fits a smaller share of
a save's compute budget (:meth:`Metric.scaled_to
<uma_callbacks.metrics.base.Metric.scaled_to>`): the engine measures the units and shares
the budget (:mod:`uma_callbacks.engine.time_budget`), and never asks which metric it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

M = TypeVar("M")


@dataclass(frozen=True)
class UnitCosts:
    """Seconds of the primitive operations on the whole local probe.

    Attributes:
        forward: one forward pass (no graph) over every probe sample.
        backward: one forward+backward over every probe sample.
        hvp: one Hessian-vector product over the probe (estimated as
            :data:`~uma_callbacks.engine.time_budget.HVP_OVER_BACKWARD` x ``backward``).
        n_batches: probe batches.
    """

    forward: float
    backward: float
    hvp: float
    n_batches: int


def batches_used(metric: Any, units: UnitCosts) -> int:
    """The probe batches a metric with an ``n_batches`` knob reads (all of them when unset)."""
    used = getattr(metric, "n_batches", None)
    return min(used, units.n_batches) if used else units.n_batches


def per_batch(units: UnitCosts) -> float:
    """The share of the probe one batch is (``1 / n_batches``)."""
    return 1.0 / max(1, units.n_batches)


def odd_at_most(value: float, floor: int) -> int:
    """The largest odd integer at most ``value``, and at least ``floor`` (an odd grid keeps its centre)."""
    n = max(floor, int(value))
    return n if n % 2 == 1 else max(n - 1, floor)


class Scaling(Generic[M]):
    """A shallow copy of a metric being turned down knob by knob, and what changed.

    The configured metric is never changed; :meth:`done` gives it back untouched when no
    knob moved.

    Attributes:
        metric: the copy whose knobs are set.
        changes: ``{knob: [before, after]}``.
    """

    def __init__(self, metric: M) -> None:
        self._original = metric
        self.metric: M = copy.copy(metric)
        self.changes: dict[str, list[Any]] = {}

    def set(self, knob: str, value: Any) -> None:
        """Set ``knob`` on the copy, recording ``[first value, latest value]`` when it moves."""
        before = getattr(self.metric, knob)
        if value != before:
            self.changes.setdefault(knob, [before, value])[1] = value
            setattr(self.metric, knob, value)

    def fewer_batches(self, seconds: float, units: UnitCosts) -> None:
        """Read fewer probe batches (``n_batches``, at least 1) while the copy's prediction exceeds ``seconds``."""
        scaled: Any = self.metric
        predicted = scaled.time_cost(units)
        if predicted > seconds:
            self.set("n_batches", max(1, int(batches_used(scaled, units) * seconds / predicted)))

    def done(self) -> tuple[M, dict[str, list[Any]]]:
        """``(the scaled copy, changes)``, or ``(the metric itself, {})`` when nothing changed."""
        return (self.metric if self.changes else self._original), self.changes
