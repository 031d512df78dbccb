"""SIGTERM during a metric: stop at the metric's next time check, journal it, then terminate.

While :class:`~uma_callbacks.engine.suite.MetricSuite` computes a metric in the main thread,
SIGTERM only sets a flag (:func:`deferred_sigterm`). The metric's next
:meth:`~uma_callbacks.metrics.base.ComputeContext.check_time` (between chunks, products,
grid points) raises :class:`MetricInterrupted`; the model is restored as after any
failure, the suite journals an ``interrupted`` record holding the progress so far, and
:func:`redeliver_if_requested` sends SIGTERM again under the handler that was there
before. With the default handler the process then ends, killed by SIGTERM (exit status
143 in a shell), with a readable journal; a handler of the user's (or ``SIG_IGN``)
decides for itself. Outside a metric the previous handler is in place, untouched.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = threading.Event()


class MetricInterrupted(RuntimeError):
    """Raised at a metric's next time check after SIGTERM arrived during it."""


def interrupt_requested() -> bool:
    """Whether SIGTERM arrived during the metric now computing."""
    return _requested.is_set()


@contextlib.contextmanager
def deferred_sigterm() -> Iterator[None]:
    """Turn SIGTERM into a flag for the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed outside Python: leave it alone
        yield
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: _requested.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def redeliver_if_requested() -> None:
    """Send the deferred SIGTERM again, now under the previous handler."""
    if _requested.is_set():
        _requested.clear()
        signal.raise_signal(signal.SIGTERM)
