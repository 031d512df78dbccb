"""The status a dashboard shows for a metric (``uma.<metric>.status``, W&B's ``uma/<metric>/status``).

The shown status follows the latest step that has a value, or a newer failure:

- a value (``ok``, ``cached`` shown as ``ok``, ``partial``) at step s is shown unless a
  failure at a later step is shown; a value at the failure's own step clears it;
- a failure (``error``, ``timeout``, ``interrupted``) at step s is shown unless a value at
  step s or later is shown;
- ``skipped`` carries no value: it is shown only while nothing with a value or a failure is.

So a backfill that can only skip (its run kept one checkpoint with ``save_total_limit=1``)
leaves the live run's ``ok`` in place. The step the shown status refers to is kept beside
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

from typing import Any

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


__all__ = ["QUIET", "VALUED", "next_status", "parse_step"]
