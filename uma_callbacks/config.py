"""``UMAConfig``: what to measure, on what, and where it goes; validated at construction.

The one configuration every trigger takes (``UMACallback``, ``attach``, ``backfill``, the
``uma`` command); ``UnifiedConfig`` (the predecessor's) maps onto it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from uma_callbacks import metric_specs
from uma_callbacks.core.spike import SpikeTrigger
from uma_callbacks.integrations.bounded import DEFAULT_TRACKER_TIMEOUT
from uma_callbacks.integrations.registry import check_tracker, tracker_names
from uma_callbacks.metrics import METRICS, Metric

#: The built-in tracker names (more with :func:`uma_callbacks.integrations.register_sink`).
TRACKER_NAMES = tracker_names()
#: The per-metric time limit when none is given (seconds); ``UMAConfig(timeout_seconds=None)`` lifts it.
DEFAULT_TIMEOUT_SECONDS = 900.0
#: Seeds must fit the generators (``torch.Generator.manual_seed`` takes < 2**63).
MAX_SEED = 2**63 - 1
#: Where a live trigger measures: ``"inline"`` in the training process at each save;
#: ``"async"``: it only announces each complete checkpoint, for ``uma watch`` to measure.
MEASURE_MODES = ("inline", "async")
#: Fields that act on measuring inside the training process, which ``measure="async"`` never does.
_INLINE_ONLY = {
    "every_n_steps": "a watcher measures saved checkpoints only; save more often (save_steps) instead",
    "log_scalars": "the values are measured later, by the watcher, after the Trainer has logged those steps",
    "overhead": "nothing is measured in the training process; the watcher's time is not training time",
    "seconds_per_save": "nothing is measured in the training process",
    "spike": "a spike is measured on the model in memory, in the training process",
}


def _closest(name: str, allowed: Sequence[str]) -> str:
    match = difflib.get_close_matches(str(name), list(allowed), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def build_metric(spec: Any, seed: int | None = None) -> Metric:
    """A metric object from a spec (see :func:`uma_callbacks.metric_specs.build_metric`, the one builder).

    Args:
        spec: a metric object, a name, ``"name:key=value,..."`` or ``{"name": ..., option: value}``.
        seed: the seed of the metric's estimators, unless the spec sets one.

    Raises:
        ValueError: unknown name (listing the known ones) or a bad option.
    """  # noqa: DOC502 (raised by metric_specs.build_metric)
    return metric_specs.build_metric(spec, seed, field="metrics")


def metric_spec(metric: Metric) -> dict[str, Any]:
    """``{"name": ..., option: value}``: the mapping :func:`build_metric` rebuilds ``metric`` from.

    The options are the entries of ``metric.config()`` its constructor takes (``config()``
    also holds ``metric``, the name, and values derived from the options, which the
    constructor does not take).

    Example:
        >>> spec = metric_spec(build_metric("hessian:top_k=3", seed=7))
        >>> spec["name"], spec["top_k"], spec["seed"]
        ('hessian', 3, 7)
        >>> build_metric(spec).config() == build_metric("hessian:top_k=3", seed=7).config()
        True
    """
    options = metric_specs.metric_options(metric.name) if metric.name in METRICS else {}
    return {"name": metric.name, **{k: v for k, v in metric.config().items() if k in options}}


def check_rebuildable(metric: Metric) -> None:
    """Refuse a metric another process cannot rebuild from :func:`metric_spec` with the same config.

    Raises:
        ValueError: the metric is not registered by name, or its spec builds another
            configuration (a setting only the object holds), naming the metric.
    """
    try:
        rebuilt = build_metric(metric_spec(metric))
        same = type(rebuilt) is type(metric) and rebuilt.config() == metric.config()
    except ValueError:
        same = False
    if not same:
        raise ValueError(
            f"UMAConfig.metrics: with measure='async' the watcher rebuilds each metric from its name and options; "
            f"{metric.name!r} ({type(metric).__name__}) cannot be rebuilt with the same configuration: give it by "
            "name and options, register its class (uma_callbacks.metrics.register_metric) in both processes, or use measure='inline'"
        )


def _positive_int(field_name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"UMAConfig.{field_name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}")


@dataclass
class UMAConfig:
    """Configuration of the callbacks, the hook and the backfill.

    Attributes:
        metrics: metric objects or names from :data:`uma_callbacks.metrics.METRICS`.
        probe_size: samples in the frozen probe.
        probe_batch_size: samples per probe batch.
        every_n_steps: also measure every N optimizer steps (between saves); None: saves only.
        trackers: None (follow ``args.report_to``), ``[]`` (journal only), or names from
            :data:`TRACKER_NAMES` and/or sink objects.
        output_dir: journal folder; None: ``<args.output_dir>/uma``.
        memory_budget: None (what the device has free, minus a margin), a number of GB,
            or a :class:`~uma_callbacks.engine.budget.MemoryBudget`.
        seed: picks the probe samples and seeds the stochastic estimators of metrics given
            by name (objects keep their own ``seed``).
        timeout_seconds: per-metric time limit (checked between chunks) for metrics without
            their own; default :data:`DEFAULT_TIMEOUT_SECONDS`, ``None`` for none.
        tracker_timeout_seconds: seconds each tracker call during training may take
            (default 30); past it the tracker is journal-only until the next save, which
            retries it (``uma sync`` is not bounded). ``None``: unbounded.
        chunk_sizes: ``{metric name: samples per chunk}`` instead of the budget's plan
            (memory only: never part of a result's identity).
        overhead: the compute budget of a save as a fraction of the training wall time since
            the last measured save (e.g. 0.05); work is scaled down to fit
            (:mod:`~uma_callbacks.engine.time_budget`). None: no time budget.
        seconds_per_save: the compute budget of a save in seconds (with ``overhead``, the
            smaller of the two). None: no cap.
        log_scalars: ``"<metric>/<scalar>"`` keys (e.g. ``"fisher/trace"``) also copied into
            the Trainer's ``state.log_history`` at each measured step, so they show in the
            console log next to the loss.
        use_cache: reuse journalled results for the same (checkpoint, config, probe).
        save_tensors: also write large tensors (the Fisher diagonal) as safetensors.
        draw_figures: draw PNG figures (needs matplotlib).
        aggressive_cleanup: a full ``gc.collect()`` after every metric (about 0.3 s each on
            CPU; always done on CUDA and after a failure).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; None for the HF default.
        measure: ``"inline"`` (measure in the training process at each save) or ``"async"``
            (a live trigger only announces each complete checkpoint, with the probe and the
            tracker runs, for ``uma watch`` to measure beside the training; every metric
            must then be rebuildable from its name and options, and ``every_n_steps``,
            ``log_scalars``, ``overhead`` and ``seconds_per_save`` are refused). A backfill
            refuses ``"async"``.
        spike: a :class:`~uma_callbacks.core.spike.SpikeTrigger`: also measure
            ``spike_metrics`` on the model in memory at a training-log step whose ``loss``
            (or ``grad_norm``) is a robust outlier of its window (``UMACallback`` only;
            records ``spike`` and ``spike/<metric>``, see :mod:`uma_callbacks.triggers.spike`).
            None: no spike detection.
        spike_metrics: names of configured metrics measured at a spike; None: every
            configured metric that neither compares checkpoints nor reads the optimizer.

    Raises:
        ValueError: any field out of range, naming the field and the allowed values.
    """

    metrics: Sequence[str | Metric] = ("gradient_flow",)
    probe_size: int = 64
    probe_batch_size: int = 8
    every_n_steps: int | None = None
    trackers: Sequence[Any] | None = None
    output_dir: str | None = None
    memory_budget: Any = None
    seed: int = 42
    timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS
    chunk_sizes: dict[str, int] | None = None
    overhead: float | None = None
    seconds_per_save: float | None = None
    log_scalars: Sequence[str] = ()
    use_cache: bool = True
    save_tensors: bool = False
    draw_figures: bool = True
    aggressive_cleanup: bool = False
    loss_fn: Callable[..., Any] | None = None
    tracker_timeout_seconds: float | None = DEFAULT_TRACKER_TIMEOUT
    measure: str = "inline"
    spike: SpikeTrigger | None = None
    spike_metrics: Sequence[str] | None = None
    metric_objects: list[Metric] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.metrics, (str, Metric)):
            self.metrics = [self.metrics]
        if not isinstance(self.metrics, Sequence) or len(self.metrics) == 0:
            raise ValueError(f"UMAConfig.metrics must be a non-empty list of metric names or objects; got {self.metrics!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"UMAConfig.seed must be an integer in [0, 2**63 - 1]; got {self.seed!r}")
        self.metric_objects = [build_metric(m, seed=self.seed) for m in self.metrics]
        names = [m.name for m in self.metric_objects]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"UMAConfig.metrics lists {duplicates} more than once; give each metric once")
        _positive_int("probe_size", self.probe_size)
        _positive_int("probe_batch_size", self.probe_batch_size)
        _positive_int("every_n_steps", self.every_n_steps, allow_none=True)
        if self.timeout_seconds is not None and (
            isinstance(self.timeout_seconds, bool)
            or not isinstance(self.timeout_seconds, (int, float))
            or not self.timeout_seconds > 0
        ):
            raise ValueError(f"UMAConfig.timeout_seconds must be a positive number or None; got {self.timeout_seconds!r}")
        if self.trackers is not None:
            if isinstance(self.trackers, str):
                self.trackers = [self.trackers]
            if not isinstance(self.trackers, Sequence):
                raise ValueError(f"UMAConfig.trackers must be None or a list of names/sink objects; got {self.trackers!r}")
            for tracker in self.trackers:
                if isinstance(tracker, str) and tracker not in tracker_names():
                    raise ValueError(
                        f"UMAConfig.trackers entries must be sink objects or one of {tracker_names()!r}; got {tracker!r}"
                        + _closest(tracker, tracker_names())
                    )
                if isinstance(tracker, str):
                    check_tracker(tracker)  # a missing package fails now, naming the pip extra
                elif not callable(getattr(tracker, "log_record", None)):
                    raise ValueError(
                        f"UMAConfig.trackers entries must be one of {tracker_names()!r} or have log_record(); got {tracker!r}"
                    )
        if self.memory_budget is not None:
            from uma_callbacks.engine.budget import MemoryBudget  # noqa: PLC0415

            if isinstance(self.memory_budget, (int, float)) and not isinstance(self.memory_budget, bool):
                from uma_callbacks.engine.budget import MAX_GB  # noqa: PLC0415

                if not 0 < self.memory_budget <= MAX_GB:
                    raise ValueError(
                        f"UMAConfig.memory_budget must be a positive number of GB up to {MAX_GB:g}; got {self.memory_budget!r}"
                    )
            elif not isinstance(self.memory_budget, MemoryBudget):
                raise ValueError(
                    f"UMAConfig.memory_budget must be None, a number of GB or a MemoryBudget; got {self.memory_budget!r}"
                )
        for name in ("overhead", "seconds_per_save", "tracker_timeout_seconds"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf")
            ):
                raise ValueError(f"UMAConfig.{name} must be a positive finite number or None; got {value!r}")
        if isinstance(self.log_scalars, str) or not all(
            isinstance(k, str) and "/" in k for k in self.log_scalars
        ):
            raise ValueError(f"UMAConfig.log_scalars must be a list of '<metric>/<scalar>' keys; got {self.log_scalars!r}")
        if self.chunk_sizes is not None:
            if not isinstance(self.chunk_sizes, dict):
                raise ValueError(f"UMAConfig.chunk_sizes must be None or a dict {{metric name: int}}; got {self.chunk_sizes!r}")
            for name, size in self.chunk_sizes.items():
                _positive_int(f"chunk_sizes[{name!r}]", size)
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise ValueError(f"UMAConfig.output_dir must be None or a path; got {self.output_dir!r}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(f"UMAConfig.loss_fn must be callable(model, batch) -> Tensor[B]; got {self.loss_fn!r}")
        for flag in ("use_cache", "save_tensors", "draw_figures", "aggressive_cleanup"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"UMAConfig.{flag} must be True or False; got {getattr(self, flag)!r}")
        if not isinstance(self.measure, str) or self.measure not in MEASURE_MODES:
            raise ValueError(
                f"UMAConfig.measure must be one of {list(MEASURE_MODES)}; got {self.measure!r:.80}"
                + (_closest(self.measure, MEASURE_MODES) if isinstance(self.measure, str) else "")
            )
        self._check_spike()
        if self.measure == "async":
            for name, why in _INLINE_ONLY.items():
                value = getattr(self, name)
                if value is not None and not (isinstance(value, (list, tuple)) and not value):
                    raise ValueError(f"UMAConfig.{name} cannot be used with measure='async': {why} (got {value!r:.80})")
            for metric in self.metric_objects:
                check_rebuildable(metric)

    @property
    def metric_names(self) -> list[str]:
        """The enabled metrics' string names, in order."""
        return [m.name for m in self.metric_objects]

    @property
    def spike_metric_names(self) -> list[str]:
        """The metrics measured at a spike, in configured order (empty without ``spike``)."""
        if self.spike is None:
            return []
        if self.spike_metrics is not None:
            return [m for m in self.metric_names if m in set(self.spike_metrics)]
        return [m.name for m in self.metric_objects if _spike_measurable(m)]

    def _check_spike(self) -> None:
        """Validate ``spike`` and ``spike_metrics`` (see the class docstring).

        Raises:
            ValueError: ``spike`` is not a ``SpikeTrigger``, ``spike_metrics`` without ``spike``,
                or a name that is not a configured metric measurable at a spike (listing those).
        """
        if self.spike is not None and not isinstance(self.spike, SpikeTrigger):
            raise ValueError(
                f"UMAConfig.spike must be None or a SpikeTrigger(key=..., z=..., window=..., cooldown=...); got {self.spike!r:.80}"
            )
        allowed = [m.name for m in self.metric_objects if _spike_measurable(m)]
        if self.spike_metrics is not None:
            if self.spike is None:
                raise ValueError("UMAConfig.spike_metrics needs spike=SpikeTrigger(...): nothing is measured at spikes without it")
            if isinstance(self.spike_metrics, str) or not isinstance(self.spike_metrics, Sequence) or not self.spike_metrics:
                raise ValueError(f"UMAConfig.spike_metrics must be None or a non-empty list of names from {allowed}; got {self.spike_metrics!r:.80}")
            for name in self.spike_metrics:
                if not isinstance(name, str) or name not in allowed:
                    why = " (it compares checkpoints or reads the optimizer)" if name in self.metric_names else ""
                    raise ValueError(
                        f"UMAConfig.spike_metrics entries must be configured metrics measurable at a spike, one of {allowed}; "
                        f"got {name!r:.80}{why}" + (_closest(name, allowed) if isinstance(name, str) and not why else "")
                    )
        elif self.spike is not None and not allowed:
            raise ValueError(
                f"UMAConfig.spike: none of the configured metrics {self.metric_names} can be measured at a spike "
                "(each compares checkpoints or reads the optimizer); add one (e.g. 'gradient_flow')"
            )


def _spike_measurable(metric: Metric) -> bool:
    """Whether ``metric`` can be measured at a spike: the model in memory only, no earlier checkpoint, no optimizer."""
    return not (metric.history_needed or metric.needs_first or getattr(metric, "needs_optimizer", False))
