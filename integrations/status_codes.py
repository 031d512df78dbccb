"""Each record's outcome as a number at its step: ``uma/<metric>/status_code``, for a plot of when a metric failed.

The run's summary (W&B) and tags (MLflow) hold only the latest outcome
(:mod:`~uma_callbacks.integrations.status`). Beside the values, every sink also logs, at the
record's step, one number per record under the metric's own prefix (the logging convention
``uma/<metric>/<name>``, next to the summary's ``uma/<metric>/status``):

======================  ====  ==========================================================
status                  code  meaning
======================  ====  ==========================================================
``ok``, ``cached``      0     measured (``cached``: the same checkpoint measured before)
``partial``             1     values kept; an iterative method stopped short of its accuracy
``skipped``             2     nothing to measure (e.g. no previous checkpoint yet)
``timeout``             3     failed: ran past its time limit
``interrupted``         4     failed: the run was stopped while it measured
``error``               5     failed: an exception (out of memory included)
======================  ====  ==========================================================

So ``0`` is fine and ``>= 3`` (:data:`FAILED_FROM`) is a failure. A checkpoint that could not
be loaded is ``uma/checkpoint/status_code`` = 5 at its step; values measured at a loss spike
are ``uma/spike/<metric>/status_code``. The spike marker (metric ``spike``) is no metric and
gets none. Like every key, a code is logged once per (run, step, key): the first outcome
delivered at that step (a rerun in a later process adds its own point at the same step).

Example:
    >>> from types import SimpleNamespace as R
    >>> status_values(R(metric="fisher", status="error"))
    {'uma/fisher/status_code': 5.0}
    >>> status_values(R(metric="spike/fisher", status="cached"))
    {'uma/spike/fisher/status_code': 0.0}
"""

from __future__ import annotations

from typing import Any

from uma_callbacks.core.records import log_key
from uma_callbacks.core.spike import SPIKE_METRIC

#: The name of the code under the metric's prefix: ``uma/<metric>/status_code``.
STATUS_CODE = "status_code"
#: ``{status: code}`` (see the module docstring).
STATUS_CODES = {"ok": 0, "cached": 0, "partial": 1, "skipped": 2, "timeout": 3, "interrupted": 4, "error": 5}
#: Codes from this one up are failures.
FAILED_FROM = 3


def status_code_key(metric: str) -> str:
    """``uma/<metric>/status_code``.

    Example:
        >>> status_code_key("gradient_flow")
        'uma/gradient_flow/status_code'
    """
    return log_key(metric, STATUS_CODE)


def status_values(record: Any) -> dict[str, float]:
    """``{uma/<metric>/status_code: code}`` for a record (``{}`` for the spike marker or an unknown status).

    Args:
        record: a record (``metric``, ``status``).

    Returns:
        The one value to log at the record's step, beside :meth:`Record.log_values
        <uma_callbacks.core.records.Record.log_values>`.
    """
    code = STATUS_CODES.get(record.status)
    if code is None or record.metric == SPIKE_METRIC or not isinstance(record.metric, str):
        return {}
    return {status_code_key(record.metric): float(code)}


def status_legend() -> str:
    """The codes in one line, for a chart's title or a note: ``0 ok, 1 partial, 2 skipped, 3 timeout, 4 interrupted, 5 error``."""
    names = {code: status for status, code in reversed(STATUS_CODES.items())}  # "ok" over "cached"
    return ", ".join(f"{code} {names[code]}" for code in sorted(names))


__all__ = ["FAILED_FROM", "STATUS_CODE", "STATUS_CODES", "status_code_key", "status_legend", "status_values"]
