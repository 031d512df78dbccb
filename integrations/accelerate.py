"""Accelerate trackers as sinks.

Any ``GeneralTracker`` becomes a sink, and the W&B and MLflow runs an accelerator opened
are joined by our own sinks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import Record


class AcceleratorTrackerSink:
    """Any Accelerate ``GeneralTracker`` as a sink: ``tracker.log(values, step=record.step)``.

    Scalars only (trackers have no common file API). Idempotent per (step, key) within a
    process; the journal's delivery log covers replays across processes.

    Args:
        tracker: an Accelerate tracker (``accelerator.get_tracker(name)``).
    """

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.name = f"accelerate-{getattr(tracker, 'name', type(tracker).__name__)}"
        self._logged: set[tuple[int, str]] = set()

    def start(self) -> None:
        """Nothing to open: the accelerator started the tracker."""

    def run_id(self) -> str:
        """The native run's id when it has one, else the tracker name."""
        native = getattr(self.tracker, "tracker", None)
        for attr in ("id", "run_id", "name"):
            value = getattr(native, attr, None)
            if isinstance(value, str) and value:
                return value
        return str(getattr(self.tracker, "name", "accelerate"))

    def log_record(self, record: Record, root: Path) -> None:
        """Log the record's finite scalars at ``record.step``."""
        values = {k: v for k, v in record.log_values().items() if (record.step, k) not in self._logged}
        if values:
            self.tracker.log(values, step=int(record.step))
            self._logged.update((record.step, k) for k in values)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params go through ``store_init_configuration`` when the tracker has it."""
        store = getattr(self.tracker, "store_init_configuration", None)
        if store is not None:
            store({f"uma.{k}": (v if isinstance(v, (str, int, float, bool)) else json.dumps(v)) for k, v in params.items()})

    def finish(self) -> None:
        """The accelerator finishes its trackers (``accelerator.end_training``)."""


def sink_for_tracker(tracker: Any) -> Any:
    """Our sink for an Accelerate tracker.

    W&B and MLflow runs are joined by our own sinks (``uma/step`` axis, figures, artifacts);
    any other tracker is wrapped in :class:`AcceleratorTrackerSink`.
    """
    name = getattr(tracker, "name", "")
    native = getattr(tracker, "tracker", None)
    if name == "wandb" and native is not None:
        from uma_callbacks.integrations.wandb import WandbSink  # noqa: PLC0415

        return WandbSink(run=native)
    if name == "mlflow" and native is not None:
        import mlflow  # noqa: PLC0415 (the accelerator already imported it)

        from uma_callbacks.integrations.mlflow import MLflowSink  # noqa: PLC0415

        return MLflowSink(run_id=native.info.run_id, tracking_uri=mlflow.get_tracking_uri())
    return AcceleratorTrackerSink(tracker)
