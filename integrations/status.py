"""The status a dashboard shows for a metric (``uma.<metric>.status``, W&B's ``uma/<metric>/status``).

The shown status follows the latest step that has a value, or a newer failure:

- a value (``ok``, ``cached`` shown as ``ok``, ``partial``) at step s is shown unless a
  failure at a later step is shown; a value at the failure's own step clears it;
- a failure (``error``, ``timeout``, ``interrupted``) at step s is shown unless a value at
  step s or later is shown;
- ``skipped`` carries no value: it is shown only while nothing with a value or a failure is.

So a backfill that can only skip (its run kept one checkpoint with ``save_total_limit=1``)
leaves the live run's ``ok`` in place.

Beside the status (:func:`status_updates` says what changes for one record):

- ``uma.<metric>.error`` holds the shown failure's message, only while a failure is shown:
  a value shown later (a good rerun) removes it;
- a skip is not an error: it never sets ``.error``; ``uma.<metric>.skipped`` holds the
  latest skip's reason (e.g. interpolation's "no previous checkpoint yet" at the first
  checkpoint), apart from the status;
- the ``checkpoint`` entry (a checkpoint that could not be loaded) is a failure of every
  metric at its step: a value of any metric at that step or later shows the checkpoint
  loaded, so it turns ``ok`` and its ``.error`` goes. The step the shown status refers to is kept beside
it on the dashboard (``uma.<metric>.status_step``), so a later process (``uma backfill``,
``uma sync``) applies the same rule to what the run already shows.

Example:
    >>> next_status(("ok", 8), "skipped", 8) is None
    True
    >>> next_status(("ok", 8), "error", 10)
    ('error', 10)
    >>> next_status(("error", 10), "cached", 4) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The pseudo-metric of a checkpoint that could not be loaded (its records are failures).
CHECKPOINT = "checkpoint"
#: Statuses of records that hold values.
VALUED = ("ok", "cached", "partial")
#: Statuses that hold neither a value nor a failure.
QUIET = ("skipped",)


def next_status(shown: tuple[str, int | None] | None, status: str, step: int) -> tuple[str, int] | None:
    """What the dashboard shows after a record, or ``None`` to leave what it shows.

    Args:
        shown: ``(status, step)`` shown now (``step`` ``None`` when unknown: a run tagged
            before the step was kept); ``None`` when nothing is shown yet.
        status: the record's status.
        step: the record's step.

    Returns:
        ``(status, step)`` to show (``cached`` shown as ``ok``), or ``None``.
    """
    new = ("ok" if status == "cached" else status, int(step))
    if shown is None:
        return new
    old_status, old_step = shown
    if status in QUIET:  # a skip never hides a value or a failure
        return new if old_status in QUIET and (old_step is None or step >= old_step) else None
    if old_status in QUIET or old_step is None:
        return new
    if status in VALUED:
        return new if step >= old_step else None
    # a failure: newer than the value shown, or at least as new as the failure shown
    return new if step > old_step or (old_status not in VALUED and step == old_step) else None


@dataclass(frozen=True)
class StatusUpdate:
    """What a dashboard changes for one metric after a record.

    Attributes:
        metric: the metric whose tags change (the record's own, or :data:`CHECKPOINT`).
        shown: the ``(status, step)`` to show.
        error: the message for ``.error`` when ``shown`` is a failure; ``None`` when it is a
            value or a skip (``.error`` is then removed if the dashboard has one).
    """

    metric: str
    shown: tuple[str, int]
    error: str | None


def status_updates(shown: Callable[[str], tuple[str, int | None] | None], record: Any) -> list[StatusUpdate]:
    """The status changes one record makes (see the module docstring).

    Args:
        shown: ``metric -> (status, step)`` the dashboard shows now (``None``: nothing).
        record: the record (``metric``, ``status``, ``step``, ``error``).

    Returns:
        The record's metric's update (if its status changes), then the ``checkpoint``
        entry's (if a value shows a failed checkpoint loaded after all).

    Example:
        >>> from types import SimpleNamespace as R
        >>> shown = {"checkpoint": ("error", 4)}.get
        >>> [u.metric for u in status_updates(shown, R(metric="fisher", status="ok", step=4, error=None))]
        ['fisher', 'checkpoint']
    """
    out = []
    update = next_status(shown(record.metric), record.status, record.step)
    if update is not None:
        out.append(StatusUpdate(record.metric, update, _failure_text(record) if is_failure(update[0]) else None))
    failed = shown(CHECKPOINT) if record.metric != CHECKPOINT and record.status in VALUED else None
    if failed is not None and is_failure(failed[0]):
        loaded = next_status(failed, "ok", record.step)
        if loaded is not None:
            out.append(StatusUpdate(CHECKPOINT, loaded, None))
    return out


def is_failure(status: str) -> bool:
    """Whether ``status`` is a failure (``error``, ``timeout``, ``interrupted``): neither a value nor a skip."""
    return status not in VALUED and status not in QUIET


def skip_text(record: Any) -> str | None:
    """``"step N: reason"`` for a skipped record (the ``.skipped`` entry), ``None`` for any other."""
    if record.status not in QUIET:
        return None
    return _failure_text(record)


def _failure_text(record: Any) -> str:
    error = record.error if isinstance(record.error, dict) else {}
    return f"step {record.step}: {error.get('message', '')}"[:5000]


def parse_step(value: Any) -> int | None:
    """A step read back from a dashboard (a tag is a string, a summary may be a float); ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 24:
        return int(value)
    return None


__all__ = [
    "CHECKPOINT",
    "QUIET",
    "VALUED",
    "StatusUpdate",
    "is_failure",
    "next_status",
    "parse_step",
    "skip_text",
    "status_updates",
]
