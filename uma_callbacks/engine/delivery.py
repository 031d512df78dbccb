"""Delivery of journalled records to the sinks: start (and retry), params, failures, finish.

The journal is the source of truth; a sink gets the records its delivery log does not
hold yet. Sinks that failed (to start, or to take a record) are retried at the next
delivery with everything they missed, so a tracker that is down at the start or
mid-run loses nothing. One warning per outage, not one per record.

Replays carry only records of the right training run (:mod:`~uma_callbacks.engine.run_identity`):
a live training's delivery (``run`` given) replays that run's records only, never those of
another training in the same folder. Without ``run`` (``uma sync``), a sink's tracker run gets
the records of the training runs it already holds records of; a tracker run that holds none
gets the journal's newest run. ``follow_tracker`` (a backfill) replays both: its own run's
records and those of the runs the tracker run holds.

Values now, files later (a live training, whose figures are drawn off the training path):
:meth:`Delivery.send_values` gives the sinks a record's values at once (the record without
its files, not noted as delivered), and :meth:`Delivery.send_files` the whole record once its
figures are written (noted then). Sinks take a record twice by their contract (idempotent per
(run, step, key)): the values are not logged again, the files arrive. Until then no replay
sends that record; a process that stops in between leaves it undelivered in the delivery
log, and ``uma sync`` sends it whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.run_identity import runs_held

logger = logging.getLogger(__name__)

#: What a sink raises on one record's content (a field it cannot log: records come from
#: disk), as opposed to an outage: that record is skipped, counted in
#: :attr:`Delivery.refused` and tried again at the next delivery; the records after it go.
RECORD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError)


class Delivery:
    """The sinks of one session and their health.

    Args:
        journal: where records and the delivery log are (rank 0); ``None``: nothing is delivered.
        sinks: the sink objects.
        own: those whose runs this session opened (finished by :meth:`finish`).
        run: the training run whose records are replayed (a live training); ``None``:
            per sink, the runs its tracker run holds records of, else the journal's newest.
        follow_tracker: with ``run``, also replay the runs the sink's tracker run holds.
    """

    def __init__(
        self,
        journal: Journal | None,
        sinks: Sequence[Any] = (),
        own: Sequence[Any] = (),
        run: str | None = None,
        follow_tracker: bool = False,
    ) -> None:
        self.journal = journal
        self.sinks = list(sinks)
        self.own = list(own)
        self.run = run
        self.follow_tracker = follow_tracker
        self.params: dict[str, Any] = {}
        self._failed: set[str] = set()
        #: ``{(sink name, record id): why}``: records a sink could not take for their content.
        self.refused: dict[tuple[str, str], str] = {}
        self._params_sent: set[str] = set()
        self._configs: dict[tuple[str, str], dict[tuple[str, int], str]] = {}
        #: ids of the records whose values went out and whose files wait (:meth:`send_values`).
        self._awaiting: set[str] = set()

    @property
    def failing(self) -> set[str]:
        """Names of the sinks that failed at their last attempt."""
        return set(self._failed)

    def start(self, params: dict[str, Any]) -> None:
        """Start every sink and log ``params`` once per sink (a failure is retried later)."""
        self.params = dict(params)
        for sink in self.sinks:
            self._ensure_started(sink)

    def send(self, records: Sequence[Record]) -> int:
        """Deliver ``records``; a sink that failed earlier gets everything it missed too."""
        if self.journal is None:
            return 0
        sent = 0
        for sink in self.sinks:
            failed = sink.name in self._failed
            sent += self._deliver(sink, [] if failed else list(records), replay=failed)
        return sent

    def send_values(self, records: Sequence[Record]) -> int:
        """Deliver ``records``' values now, and their files later with :meth:`send_files`.

        Each sink gets the records without their files; they are not noted as delivered,
        and no replay sends them until :meth:`send_files`.
        """
        if self.journal is None:
            return 0
        self._awaiting.update(r.record_id for r in records)
        bare = [dataclasses.replace(r, files=[], file_ids={}, missing_files={}) for r in records]
        sent = 0
        for sink in self.sinks:
            failed = sink.name in self._failed
            sent += self._deliver(sink, [] if failed else bare, replay=failed, note=False)
        return sent

    def send_files(self, records: Sequence[Record]) -> int:
        """Deliver ``records`` whole (their files with their figures), after :meth:`send_values`."""
        self._awaiting.difference_update(r.record_id for r in records)
        return self.send(records)

    def send_pending(self) -> int:
        """Replay every journalled record a sink has not received yet; returns how many went.

        The records are those of the run(s) this delivery serves (see the module docstring).
        """
        if self.journal is None:
            return 0
        return sum(self._deliver(sink, [], replay=True) for sink in self.sinks)

    def finish(self) -> None:
        """Deliver what is pending, then finish the runs this session opened."""
        self.send_pending()
        for sink in self.own:
            try:
                sink.finish()
            except Exception as err:  # a tracker outage must not fail the end of training
                logger.warning("uma: sink %s did not finish cleanly (%s: %s)", sink.name, type(err).__name__, err)
        self.own = []

    # ------------------------------------------------------------------ internals
    def _ensure_started(self, sink: Any) -> bool:
        try:
            sink.start()
            if sink.name not in self._params_sent and self.params:
                sink.log_params(self.params)
                self._params_sent.add(sink.name)
        except Exception as err:  # a tracker outage must not stop training
            self._report(sink, err)
            return False
        return True

    def _deliver(self, sink: Any, records: Sequence[Record], replay: bool = False, note: bool = True) -> int:
        """Send ``records`` (``replay``: the journal's records of the served runs) not yet in the sink's run.

        ``note``: note each one as delivered (not for :meth:`send_values`' records without their files).
        """
        assert self.journal is not None
        if not self._ensure_started(sink):
            return 0
        try:
            run = sink.run_id()
            done = self.journal.delivered(sink.name, run)
        except Exception as err:  # a tracker outage must not stop training
            self._report(sink, err)
            return 0
        if replay:
            records = self._replayed(done)
        sent = 0
        delivered_configs: dict[tuple[str, int], str] | None = self._configs.get((sink.name, run))
        for record in records:
            if record.record_id in done or not record.metric:
                continue
            if delivered_configs is None:  # read from the journal once per (sink, run), then kept current
                delivered_configs = self._configs[(sink.name, run)] = self._delivered_configs(done)
            outgoing = kept_apart(record, delivered_configs)
            try:
                sink.log_record(outgoing, self.journal.root)
            except RECORD_ERRORS as err:  # this record's content, not the tracker: the others still go
                self._refused(sink, record, err)
                continue
            except Exception as err:  # the record stays pending; retried at the next delivery
                self._report(sink, err)
                return sent
            if note:
                self.journal.mark_delivered(sink.name, run, record.record_id, uri=_uri_of(sink))
                done.add(record.record_id)
            delivered_configs.setdefault((outgoing.metric, int(record.step)), config_identity(record))
            sent += 1
        if sink.name in self._failed:
            self._failed.discard(sink.name)
            logger.warning("uma: sink %s is back; pending records delivered", sink.name)
        return sent

    def _refused(self, sink: Any, record: Record, err: BaseException) -> None:
        """Count a record a sink could not take for its content (warned once per record and sink)."""
        key = (sink.name, record.record_id)
        if key not in self.refused:
            self.refused[key] = f"{type(err).__name__}: {err}"
            logger.warning(
                "uma: sink %s could not take the %s record at step %s (%s: %s); it stays in the journal, "
                "the other records are delivered",
                sink.name,
                record.metric,
                record.step,
                type(err).__name__,
                err,
            )

    def _replayed(self, done: set[str]) -> list[Record]:
        """The journal's records of the runs this delivery serves, for a tracker run holding ``done``."""
        assert self.journal is not None
        records = self.journal.records()
        if self.run is not None and not self.follow_tracker:
            runs = {self.run}
        else:
            runs = runs_held(records, done)
            if self.run is not None:
                runs.add(self.run)
            elif not runs and records:
                runs = {records[-1].run}  # a tracker run that holds nothing: the newest training run
        return [r for r in records if r.run in runs and r.record_id not in self._awaiting]

    def _delivered_configs(self, done: set[str]) -> dict[tuple[str, int], str]:
        assert self.journal is not None
        out: dict[tuple[str, int], str] = {}
        for record in self.journal.records():
            if record.record_id in done and record.status in ("ok", "partial", "cached"):
                out.setdefault((record.metric, int(record.step)), config_identity(record))
        return out

    def _report(self, sink: Any, err: BaseException) -> None:
        if sink.name not in self._failed:
            logger.warning(
                "uma: sink %s failed (%s: %s); journal only for now: records stay in the journal and are "
                "retried at the next save (`uma sync` replays them too)",
                sink.name,
                type(err).__name__,
                err,
            )
            self._failed.add(sink.name)


def _uri_of(sink: Any) -> str:
    uri = getattr(sink, "tracking_uri", None)
    return uri if isinstance(uri, str) else ""


def config_identity(record: Record) -> str:
    """A short hash of the metric configuration that produced ``record`` (``""`` if unknown)."""
    config = record.meta.get("config") if isinstance(record.meta, dict) else None
    if not config:
        return ""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def kept_apart(record: Record, delivered: dict[tuple[str, int], str]) -> Record:
    """``record``, or a copy logged as ``<metric>-<config hash>`` (never overwrite, never mix).

    The copy is made when the run already holds another configuration's values of that
    metric at that step.

    Example:
        >>> r = Record(step=5, metric="hessian", status="ok", meta={"config": {"top_k": 2}})
        >>> kept_apart(r, {("hessian", 5): "0123abcd"}).metric.startswith("hessian-")
        True
        >>> kept_apart(r, {}).metric
        'hessian'
    """
    if record.status not in ("ok", "partial", "cached"):
        return record
    mine = config_identity(record)
    theirs = delivered.get((record.metric, int(record.step)))
    if theirs is None or not mine or not theirs or theirs == mine:
        return record
    return dataclasses.replace(record, metric=f"{record.metric}-{mine}")


def deliver(journal: Journal, sink: Any, records: Sequence[Record]) -> int:
    """Send the ``records`` one sink has not received yet; returns how many went now.

    A failure is reported as a warning; the records stay pending in the journal.
    """
    return Delivery(journal, [sink])._deliver(sink, records)
