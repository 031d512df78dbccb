"""Figures drawn off the training path: queued at a save, drawn in a worker thread, filed later.

A live training (``UMACallback``, ``attach``, the Lightning callback) must not wait for
matplotlib at a save: the gradient-flow bar chart alone takes about 0.4 s of CPU on
MiniLM, more than the rest of a save's fixed work. So at a save the suite journals each
result's JSON and arrays (no figures), the sinks get its values, and the record goes to
:class:`LateFigures`, whose one worker thread reads the result back from those files
(:func:`read_result`: figures are drawn from the journal only) and draws it into PNG bytes
(:func:`render`: matplotlib's object-oriented API only, never pyplot; see
:mod:`uma_callbacks.plots.core`). The worker reads files and returns bytes: it never
writes, and never touches the journal object, a sink, the model or a global RNG.

What the worker has drawn is filed on the training thread by the session
(:meth:`~uma_callbacks.session.Session.collect_figures`): the PNGs written into the
record's step folder and noted in the journal
(:meth:`~uma_callbacks.engine.journal.Journal.add_figures`), then the record delivered
whole, its files with its figures (:meth:`~uma_callbacks.engine.delivery.Delivery.send_files`).
That happens

- without waiting, at each training step (``UMACallback.on_step_end``) and before each
  measurement: what is drawn by then is filed;
- waiting for every queued figure, at the end of the training
  (:meth:`~uma_callbacks.session.Session.finish`: ``on_train_end``, ``handle.remove()``),
  at :meth:`~uma_callbacks.session.Session.close`, and at interpreter exit for a training
  that stopped without either (an exception after a save): :func:`hold_open` registers the
  session's ``close`` while it has figures queued, and :func:`close_all` runs them (it is
  registered with :mod:`atexit`, after the trackers' own exit hooks, so it runs before them).

Drawing is not free for the training: where no core is idle the worker's CPU seconds are
taken from it. So the worker counts the CPU seconds of each drawing
(:func:`time.thread_time` in the worker thread), and a session with a compute budget takes
them (:meth:`LateFigures.take_seconds`) before it plans its next save and owes them to the
time bank (:meth:`~uma_callbacks.engine.time_budget.TimeBank.charge`): the figures are
paid from the metrics' share of training time.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import Record, artifact_path
from uma_callbacks.core.safe_json import read_json
from uma_callbacks.engine.journal import load_npz, result_from_json
from uma_callbacks.metrics.base import MetricResult

logger = logging.getLogger(__name__)

Renderer = Callable[[MetricResult], dict[str, bytes]]


def render(result: MetricResult) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of ``result``'s figures; ``{}`` without matplotlib (the ``[plots]`` extra).

    Thread-safe: the drawers use matplotlib's object-oriented API only.
    """
    try:
        from uma_callbacks import plots
    except ImportError:  # matplotlib is an optional extra
        return {}
    return plots.render_result(result)


def read_result(root: Path, record: Record) -> MetricResult:
    """``record``'s result from its JSON and ``.npz`` files under ``root``, else from the record's own values.

    As :meth:`~uma_callbacks.engine.journal.Journal.load_result` reads it: each file only
    while it is what the journal wrote (its ``file_ids`` entry); without a JSON file (its
    write was refused) the record's scalars and meta.

    Raises:
        ValueError: a file that is not a result's (:func:`~uma_callbacks.engine.journal.result_from_json`).
        OSError: a file that cannot be read.
    """  # noqa: DOC502 (from read_json, result_from_json and load_npz)
    paths = {rel: artifact_path(root, rel, record.file_ids.get(rel)) for rel in record.files}
    json_files = [p for rel, p in paths.items() if p is not None and rel.endswith(".json")]
    if json_files:
        result = result_from_json(read_json(json_files[0]))
    else:
        result = MetricResult(name=record.metric, scalars=dict(record.scalars), meta=dict(record.meta))
    result.status, result.error = record.status, record.error
    for rel, path in paths.items():
        if path is not None and rel.endswith(".npz"):
            result.arrays.update(load_npz(path))
    return result


def variant_of(record: Record) -> str:
    """The folder under ``step-<N>/`` that holds (or was to hold) ``record``'s result files (``""``: the step folder)."""
    for rel in [*record.files, *record.missing_files]:
        if rel.endswith(".json"):
            return "/".join(rel.split("/")[1:-1])
    return ""


@dataclass
class Drawn:
    """A queued record and what the worker drew for it.

    Attributes:
        record: the journalled record the figures belong to.
        subfolder: its files' variant folder under ``step-<N>/`` (``""``: the step folder).
        figures: ``{file name: PNG bytes}`` (empty when nothing was drawn or drawing failed).
    """

    record: Record
    subfolder: str
    figures: dict[str, bytes]


@dataclass
class _Queued:
    record: Record
    root: Path
    future: Future[dict[str, bytes]] | None = None  # None: its result file is not written yet


def _result_file_state(record: Record) -> str:
    """``"written"``, ``"pending"`` (a failed write the journal retries: disk full) or ``"never"`` (refused, or none).

    A record's figures are drawn from its written files, else (never written) from its own values.
    """
    if any(rel.endswith(".json") for rel in record.files):
        return "written"
    retried = [
        why for rel, why in record.missing_files.items()
        if rel.endswith(".json") and not why.startswith(("refused", "not serialisable"))
    ]  # fmt: skip
    return "pending" if retried else "never"


class LateFigures:
    """A queue of results whose figures one worker thread draws, collected in the order queued.

    Args:
        renderer: ``result -> {file name: PNG bytes}``, run in the worker thread
            (default :func:`render`).
    """

    def __init__(self, renderer: Renderer | None = None) -> None:
        self._renderer = renderer or render
        self._queued: list[_Queued] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._seconds = 0.0  # CPU seconds the worker spent drawing, not taken yet

    @property
    def pending(self) -> int:
        """How many queued records are not collected yet."""
        return len(self._queued)

    def awaits(self, record: Record) -> bool:
        """Whether ``record`` (this very object) is queued and not collected yet."""
        return any(q.record is record for q in self._queued)

    def submit(self, record: Record, root: str | Path) -> None:
        """Queue ``record``'s figures (its result files are under ``root``): the worker starts on them now.

        A record whose result file is not written yet (a full disk: the journal retries it)
        waits in the queue and is started by :meth:`collect` once it is. The worker reads a
        copy of the record's file list, so nothing the training thread does to ``record``
        afterwards changes what is drawn.
        """
        queued = _Queued(record, Path(root))
        if _result_file_state(record) != "pending":
            self._start(queued)
        self._queued.append(queued)

    def _start(self, queued: _Queued) -> None:
        record = queued.record
        frozen = dataclasses.replace(record, files=list(record.files), file_ids=dict(record.file_ids))
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uma-figures")
            queued.future = self._pool.submit(self._draw, frozen, queued.root)

    def _draw(self, record: Record, root: Path) -> dict[str, bytes]:
        """In the worker: read the result back from its files and draw it, counting its CPU seconds."""
        started = time.thread_time()
        try:
            return self._renderer(read_result(root, record))
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self._seconds += spent

    def take_seconds(self) -> float:
        """The worker's CPU seconds of drawing since the last call (drawings still under way count when done).

        What the worker spends reading and drawing a result, measured with
        :func:`time.thread_time` in its thread: the CPU it took from the training where no
        core is idle. Each second is returned once.
        """
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return seconds

    def collect(self, wait: bool = False) -> list[Drawn]:
        """The records drawn so far, in the order queued (``wait``: every queued one, waiting for the worker).

        Without ``wait`` it stops at the first one still drawing, so records are filed in
        step order. A record whose result file is written by now is started (with ``wait``,
        every one: drawn from what is written). A drawer that raised gives empty figures and
        one warning: a figure is never worth a lost record.
        """
        for queued in self._queued:
            if queued.future is None and (wait or _result_file_state(queued.record) != "pending"):
                self._start(queued)
        out = []
        while self._queued:
            queued = self._queued[0]
            if queued.future is None or not (wait or queued.future.done()):
                break
            self._queued.pop(0)
            out.append(Drawn(queued.record, variant_of(queued.record), self._figures_of(queued)))
        return out

    @staticmethod
    def _figures_of(queued: _Queued) -> dict[str, bytes]:
        assert queued.future is not None
        try:
            return queued.future.result()
        except Exception as err:  # noqa: BLE001 (a figure is never worth a lost record)
            logger.warning(
                "uma: could not draw %s at step %d (%s: %s)",
                queued.record.metric, queued.record.step, type(err).__name__, err,
            )  # fmt: skip
            return {}

    def shutdown(self) -> None:
        """Stop the worker thread once it has drawn what is queued (a later :meth:`submit` starts another)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


#: ``{id(owner): close}`` of the sessions with figures queued (see :func:`hold_open`).
_OPEN: dict[int, Callable[[], Any]] = {}


def hold_open(owner: object, close: Callable[[], Any]) -> None:
    """Have ``close`` run at interpreter exit unless :func:`release` comes first.

    Registered anew with :mod:`atexit` at each call, so it runs before the exit hooks of
    trackers started since (``atexit`` runs the last registered first): a W&B run is still
    open when the figures are filed.
    """
    _OPEN[id(owner)] = close
    atexit.unregister(close_all)
    atexit.register(close_all)


def release(owner: object) -> None:
    """Forget ``owner``'s ``close`` (its figures are filed)."""
    _OPEN.pop(id(owner), None)


def close_all() -> None:
    """Run the ``close`` of every session that still has figures queued (at interpreter exit)."""
    for key, close in list(_OPEN.items()):
        _OPEN.pop(key, None)
        try:
            close()
        except Exception as err:  # noqa: BLE001 (the other sessions still close)
            logger.warning("uma: could not file the figures left at exit (%s: %s)", type(err).__name__, err)
