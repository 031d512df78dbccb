"""Measurement when the loss spikes: ``UMACallback(spike=SpikeTrigger(...), spike_metrics=[...])``.

At each Trainer log holding the watched value (``loss`` or ``grad_norm``),
:class:`~uma_callbacks.core.spike.SpikeDetector` decides whether it is a robust outlier of its
window (the cost of that: :mod:`uma_callbacks.core.spike`). At a spike, on every rank, the
``spike_metrics`` are measured at that step on the model in memory: no checkpoint is written
or read.

Which weights: the Trainer logs after the optimizer step, so at a log at global step ``s`` the
model holds the weights *after* step ``s``'s update, while the logged ``loss`` is the mean of
the losses since the previous log, each computed before its step's update (the last on the
weights after step ``s - 1``), and ``grad_norm`` is step ``s``'s gradient norm, before
clipping, on those same weights. So a measurement at a spike shows the model the spiking
step left behind.

What is written (journal, then the sinks), all at step ``s`` and in the run's records:

- the **marker**, a record of metric ``spike`` (status ``ok``) with scalars ``z`` (the robust
  z-score), ``value`` (the logged value), ``median`` and ``scale`` of the window; log keys
  ``uma/spike/z``, ``uma/spike/value``, ``uma/spike/median``, ``uma/spike/scale``; its
  ``meta["spike"]`` holds the key, the scale's kind and the trigger. It is journalled before
  anything is measured, so a spike is on record even when a metric fails at it;
- one record per spike metric, of metric ``spike/<metric>`` (``spike/gradient_flow``): log keys
  ``uma/spike/<metric>/<scalar>`` (``uma/spike/gradient_flow/total_norm``), files in
  ``step-<s>/spike_<metric>.json``, and ``meta["spike"]`` as the marker's.

Those names never meet a checkpoint's: when a save falls on a spike's step, the save's
``uma/gradient_flow/...`` and the spike's ``uma/spike/gradient_flow/...`` are both kept, each
key logged once at that step. A spike measurement reads and writes no cache (its weights are
not a checkpoint), is not a checkpoint in the history that metrics comparing checkpoints read,
has no compute budget of its own (cooldown bounds how often it runs) and its seconds are not
counted as training time for the next save's budget. The training is left bit for bit as it
was: the model's state and every global RNG are restored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from uma_callbacks.core.records import Record
from uma_callbacks.core.spike import SPIKE_METRIC, SPIKE_PREFIX, SpikeDetector, SpikeEvent, SpikeTrigger
from uma_callbacks.metrics.base import Metric, MetricResult
from uma_callbacks.session import Session, all_rngs_preserved

__all__ = ["SPIKE_METRIC", "SPIKE_PREFIX", "SpikeTrigger", "SpikeWatch", "spike_variant"]

logger = logging.getLogger(__name__)


class _AtSpike:
    """Mixin of a metric measured at a spike: named ``spike/<metric>``, its result carries the spike."""

    _spike_meta: dict[str, Any] = {}

    def compute(self, *args: Any, **kwargs: Any) -> MetricResult:
        """The metric's own computation; the result renamed and ``meta["spike"]`` added."""
        result = super().compute(*args, **kwargs)  # type: ignore[misc]
        result.name = self.name  # type: ignore[attr-defined]
        result.meta["spike"] = dict(self._spike_meta)
        return result


_VARIANTS: dict[type, type] = {}


def spike_variant(metric: Metric) -> Metric:
    """A copy of ``metric`` named ``spike/<name>``: the same computation, the same configuration otherwise.

    Example:
        >>> from uma_callbacks.metrics import GradientFlow
        >>> variant = spike_variant(GradientFlow())
        >>> variant.name, variant.config()["metric"], isinstance(variant, GradientFlow)
        ('spike/gradient_flow', 'spike/gradient_flow', True)
    """
    cls = type(metric)
    variant_cls = _VARIANTS.get(cls)
    if variant_cls is None:
        variant_cls = _VARIANTS[cls] = type(cls)(
            f"{cls.__name__}AtSpike",
            (_AtSpike, cls),
            {"name": SPIKE_PREFIX + metric.name, "__module__": __name__, "__doc__": f"{cls.__name__} measured at a loss spike."},
        )
    variant = object.__new__(variant_cls)
    vars(variant).update(vars(metric))
    if "name" in vars(metric):  # a metric naming itself per instance
        variant.name = SPIKE_PREFIX + metric.name  # type: ignore[misc]
    return variant


class SpikeWatch:
    """The spike detector of one training and the measurements it triggers (see the module docstring).

    Args:
        trigger: when a logged value is a spike.
        metrics: the metrics measured at a spike (the configured objects; copies named
            ``spike/<name>`` are measured).

    Attributes:
        detector: the :class:`~uma_callbacks.core.spike.SpikeDetector`.
        events: the spikes detected so far, in order.
    """

    def __init__(self, trigger: SpikeTrigger, metrics: Sequence[Metric]) -> None:
        self.trigger = trigger
        self.detector = SpikeDetector(trigger)
        self.metrics = [spike_variant(m) for m in metrics]
        self.events: list[SpikeEvent] = []
        self._missing_warned = False

    def on_log(self, session: Session | None, model: torch.nn.Module | None, step: int, logs: Mapping[str, Any] | None) -> list[Record]:
        """Offer one Trainer log; at a spike, measure and return its records (the marker first).

        A log without the watched key (an evaluation, the end-of-training summary) costs one
        dict lookup; a training log that lacks it (``grad_norm`` with clipping off) is warned
        about once.
        """
        value = logs.get(self.trigger.key) if logs else None
        if value is None:
            if logs and "loss" in logs and not self._missing_warned:
                self._missing_warned = True
                logger.warning(
                    "uma: spike: the Trainer's training logs have no %r (keys: %s); no spike can be detected",
                    self.trigger.key, sorted(logs)[:12],
                )  # fmt: skip
            return []
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return []
        event = self.detector.update(float(value), int(step))
        if event is None or session is None or model is None:
            return []
        self.events.append(event)
        return measure_spike(session, model, event, self.trigger, self.metrics)


def measure_spike(
    session: Session, model: torch.nn.Module, event: SpikeEvent, trigger: SpikeTrigger, metrics: Sequence[Metric]
) -> list[Record]:
    """Journal and deliver the spike's marker, then measure ``metrics`` (``spike/<name>`` copies) on ``model``.

    Every rank calls it (the metrics' sums are collective); rank 0 journals and logs.

    Returns:
        The marker record, then one record per metric.
    """
    if session.probe is None:
        return []
    started = time.perf_counter()
    meta = event.meta(trigger)
    marker = Record(
        step=event.step,
        metric=SPIKE_METRIC,
        status="ok",
        scalars=event.scalars(),
        meta={"spike": meta, "metrics": [m.name for m in metrics], "timestamp_ms": int(time.time() * 1000)},
        source=session.source,
        run=session.run,
    )
    logger.warning(
        "uma: spike at step %d: %s = %.6g is %.1f robust standard deviations from the median %.6g of the last %d; "
        "measuring %s on the weights after this step",
        event.step, event.key, event.value, event.z, event.median, event.window, ", ".join(m.name for m in metrics),
    )  # fmt: skip
    with all_rngs_preserved():
        if session.is_main and session.journal is not None:
            session.journal.append(marker)
            session.delivery.send([marker])
        suite = session.suite
        every = suite.metrics
        for metric in metrics:
            metric._spike_meta = meta  # type: ignore[attr-defined]
        suite.metrics = list(metrics)
        try:  # no cache (checkpoint=""), no history, no time budget
            records = suite.run(model, session.probe, step=event.step, checkpoint="", history=None, seconds=None)
        finally:
            suite.metrics = every
    for record in records:
        record.run = session.run  # the journal stamped rank 0's; the other ranks' too
    close = getattr(suite.progress, "close", None)
    if callable(close):
        close()
    out = [marker, *records]
    session.records.extend(out)
    session.not_training(time.perf_counter() - started)
    return out
