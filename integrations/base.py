"""The sink protocol: what a tracker integration implements.

A sink receives :class:`~uma_callbacks.records.Record` objects (already journalled) and
the journal root for their files. Only world rank 0 calls a sink. A sink must be
idempotent per (run, step, key): delivering the same record twice adds no points.

To plug in your own tracker, subclass :class:`Sink` and pass an instance in
``UMACallback(trackers=[MySink()])``::

    class PrintSink(Sink):
        name = "print"

        def log_record(self, record, root):
            print(record.step, record.log_values())
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from uma_callbacks.records import Record


class Sink(abc.ABC):
    """A destination for records (W&B, MLflow, your own).

    Attributes:
        name: short identifier (``"mlflow"``, ``"wandb"``); used in the journal's
            delivery log together with :meth:`run_id`.
    """

    name: str = ""

    def __init__(self) -> None:
        if not type(self).name:
            raise NotImplementedError(f"{type(self).__name__} must set the class attribute 'name'")

    def start(self) -> None:
        """Open or join the run (called once, before the first record; may be a no-op)."""

    def run_id(self) -> str:
        """The run records go to (with :attr:`name`, the key of the delivery log)."""
        return ""

    @abc.abstractmethod
    def log_record(self, record: Record, root: Path) -> None:
        """Deliver one record: scalars at ``record.step``, its files (relative to ``root``),
        and error tags when ``record.status`` is not ok."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record configuration (metric configs, probe fingerprint) once per run."""

    def finish(self) -> None:
        """Flush and release (called at the end of training or of a backfill)."""


class MemorySink(Sink):
    """Keeps records in a list: the test double for the suite and the journal."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []
        self.params: dict[str, Any] = {}

    def run_id(self) -> str:
        return "memory"

    def log_record(self, record: Record, root: Path) -> None:
        self.records.append(record)

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)
