"""Tracker calls with a bounded time: a stalled tracker never holds training.

:class:`BoundedSink` wraps a sink for the live triggers (``UMACallback``, ``attach``):
each call (``start``, ``run_id``, ``log_params``, ``log_record``, ``finish``) runs in a
daemon worker thread and the caller waits at most ``timeout`` seconds. A call that
overruns raises :class:`TrackerStalled` (the session warns once and goes journal-only:
the records stay pending in the journal) and marks the sink *stalled*: every later call
raises at once, without touching the tracker, until :func:`rearm` at the next save (the
session calls it before each measurement and at the end of training). The stuck call is
abandoned, not joined; the sink is called again only once it has returned, so a sink never
runs two calls at a time, and a tracker that stays stalled costs one ``timeout`` per save
at most (none while its stuck call is still waiting). What the abandoned call did reach
the tracker is not sent twice: the record is not marked delivered, and the sinks skip steps
their run already holds when it is sent again (at a later save, at the end, or by
``uma sync``, which runs unbounded).

Global RNGs: the caller's are restored when the call returns or is abandoned. A sink
method decorated with :func:`~uma_callbacks.integrations.base.keeps_rng` is run without
that decorator in the worker, since an abandoned call restoring the RNG state it found
minutes later would rewind the training run's generators.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from uma_callbacks.core.rng import rng_preserved
from uma_callbacks.integrations.base import keeps_rng

#: Seconds a tracker call on the training path may take by default (``UMAConfig.tracker_timeout_seconds``).
DEFAULT_TRACKER_TIMEOUT = 30.0
#: The sink methods that are bounded (the sink protocol's calls).
BOUNDED_METHODS = ("start", "run_id", "log_params", "log_record", "finish")
_KEEPS_RNG_CODE = keeps_rng(lambda: None).__code__


class TrackerStalled(TimeoutError):
    """A tracker call did not return in time (or one before it in this save did not)."""


class BoundedSink:
    """A sink whose protocol calls take at most ``timeout`` seconds each (see the module doc).

    Attributes and other methods are the wrapped sink's (``isinstance`` sees its class too).

    Args:
        sink: any sink object (``name``, ``start``, ``run_id``, ``log_record``, ...).
        timeout: seconds per call, > 0.

    Raises:
        ValueError: ``timeout`` is not a positive finite number.
    """

    def __init__(self, sink: Any, timeout: float) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"tracker_timeout_seconds must be a positive finite number or None; got {timeout!r}")
        object.__setattr__(self, "_uma_sink", sink)
        object.__setattr__(self, "_uma_timeout", float(timeout))
        object.__setattr__(self, "_uma_stuck", None)  # (method, thread) of the abandoned call

    # ------------------------------------------------------------------ transparency
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(bounded, MLflowSink) holds, as for the sink itself
        return type(self._uma_sink)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_uma_sink"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._uma_sink, name, value)

    def __repr__(self) -> str:
        return f"BoundedSink({self._uma_sink!r}, timeout={self._uma_timeout:g})"

    @property
    def wrapped(self) -> Any:
        """The sink itself."""
        return self._uma_sink

    @property
    def stalled(self) -> bool:
        """Whether a call overran and the sink is journal-only until :meth:`rearm`."""
        return self._uma_stuck is not None

    def rearm(self) -> bool:
        """Allow calls again if the abandoned call has returned; returns whether calls are allowed."""
        stuck = self._uma_stuck
        if stuck is not None and not stuck[1].is_alive():
            object.__setattr__(self, "_uma_stuck", None)
        return self._uma_stuck is None

    # ------------------------------------------------------------------ the protocol
    def start(self) -> None:
        """The sink's ``start()``, bounded (raises :class:`TrackerStalled` past the timeout)."""
        return self._call("start")

    def run_id(self) -> str:
        """The sink's ``run_id()``, bounded (raises :class:`TrackerStalled` past the timeout)."""
        return self._call("run_id")

    def log_params(self, params: dict[str, Any]) -> None:
        """The sink's ``log_params(params)``, bounded (raises :class:`TrackerStalled` past the timeout)."""
        return self._call("log_params", params)

    def log_record(self, record: Any, root: Any) -> None:
        """The sink's ``log_record(record, root)``, bounded (raises :class:`TrackerStalled` past the timeout)."""
        return self._call("log_record", record, root)

    def finish(self) -> None:
        """The sink's ``finish()``, bounded (raises :class:`TrackerStalled` past the timeout)."""
        return self._call("finish")

    def _call(self, method: str, *args: Any) -> Any:
        sink, timeout = self._uma_sink, self._uma_timeout
        name = getattr(sink, "name", type(sink).__name__)
        stuck = self._uma_stuck
        if stuck is not None:
            raise TrackerStalled(
                f"{name} is stalled since its {stuck[0]}() call got no answer within {timeout:g} s; "
                "journal only until the next save"
            )
        target = _unwrapped(sink, method)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = target(*args)
            except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
                box["error"] = err

        worker = threading.Thread(target=work, name=f"uma-{name}-{method}", daemon=True)
        with rng_preserved():
            worker.start()
            worker.join(timeout)
        if worker.is_alive():  # abandoned: it may return later, but nobody waits for it
            object.__setattr__(self, "_uma_stuck", (method, worker))
            raise TrackerStalled(
                f"{name}.{method}() got no answer within {timeout:g} s (tracker_timeout_seconds); "
                "journal only until the next save, then retried (`uma sync` delivers what is left)"
            )
        if "error" in box:
            raise box["error"]
        return box.get("value")


def _unwrapped(sink: Any, method: str) -> Any:
    """``sink.method``, without a :func:`keeps_rng` decorator (the caller keeps the RNGs)."""
    bound = getattr(sink, method)
    function = getattr(type(sink), method, None)
    inner = getattr(function, "__wrapped__", None)
    if inner is not None and getattr(function, "__code__", None) is _KEEPS_RNG_CODE:
        return inner.__get__(sink, type(sink))
    return bound


def bounded(sinks: Sequence[Any], timeout: float | None) -> list[Any]:
    """``sinks`` wrapped in :class:`BoundedSink` (``timeout=None``: as they are; wrapped ones kept)."""
    if timeout is None:
        return list(sinks)
    return [s if type(s) is BoundedSink else BoundedSink(s, timeout) for s in sinks]


def bounded_pair(sinks: Sequence[Any], own: Sequence[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
    """``(sinks, own)`` bounded alike: each sink in ``own`` is the same wrapper as in ``sinks``."""
    wrapped = dict(zip(map(id, sinks), bounded(sinks, timeout)))
    extra = {id(s): w for s, w in zip(own, bounded(own, timeout)) if id(s) not in wrapped}
    wrapped.update(extra)
    return [wrapped[id(s)] for s in sinks], [wrapped[id(s)] for s in own]


def rearm(sinks: Sequence[Any]) -> None:
    """A new save: stalled sinks whose stuck call has returned are called again."""
    for sink in sinks:
        if type(sink) is BoundedSink:
            sink.rearm()
