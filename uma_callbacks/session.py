"""``Session``: everything the three triggers share, and ``measure(model, step)``.

A session owns, for one run:

- the **probe** (built by :func:`~uma_callbacks.engine.probe_source.build_probe`, saved as
  ``probe.safetensors`` next to the journal so a backfill rebuilds the very same one);
- the **journal** (world rank 0) and the **delivery** to the sinks (start and retry,
  params, failures, finish);
- the **suite** (cache, memory budget, time limit, failure isolation);
- the **checkpoint history** that metrics comparing checkpoints declared they need;
- the **run id**: every record it makes carries the id of the training run it belongs to
  (drawn here; a resumed training gives its run's id to :meth:`Session.open`), and its
  delivery replays only that run's records (:mod:`~uma_callbacks.engine.run_identity`);
- in a live training, the **late figures**: drawn in a worker thread, off the training
  path, and filed (written, noted, delivered with the record's files) at
  :meth:`Session.collect_figures`, at :meth:`Session.finish` and at :meth:`Session.close`
  (:mod:`~uma_callbacks.engine.late_figures`).

The triggers only adapt their events onto it: ``UMACallback`` (Trainer events),
``attach`` (Accelerate's save-state pre-hook), ``backfill`` (checkpoints on disk). Each
passes its defaults only (where the probe comes from, its default trackers: the
Trainer's ``report_to``, the accelerator's trackers, the journal's last tracker runs); the
session builds and checks the probe, resolves the sinks (one resolver,
:func:`~uma_callbacks.integrations.registry.resolve_sinks`) and validates the trigger's
settings (:data:`UNSUPPORTED`)::

    session = Session(config, root, source="callback")
    session.start(probe_source, default_trackers)   # once, before the first measurement
    session.measure(model, step)                    # at every checkpoint (every rank)
    session.collect_figures()                       # a live training, between saves: file what is drawn
    session.finish()                                # deliver what is pending, close our runs

(:meth:`Session.open` takes a built probe and resolved sinks instead of :meth:`~Session.start`.)

Every entry point leaves Python's, NumPy's and torch's global RNG states as it found them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import traceback
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from uma_callbacks.config import UMAConfig
from uma_callbacks.core.distributed import Collective, current_collective
from uma_callbacks.core.optimizer_state import OptimizerSnapshot, from_optimizer
from uma_callbacks.core.records import MEASURED, Record
from uma_callbacks.core.rng import rng_preserved
from uma_callbacks.core.sharding import deepspeed_zero3_reason
from uma_callbacks.engine.budget import as_budget
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.history import CheckpointHistory
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.late_figures import LateFigures, hold_open, release
from uma_callbacks.engine.probe import Probe, count_samples, save_probe
from uma_callbacks.engine.probe_source import build_probe, check_probe_matches
from uma_callbacks.engine.run_identity import RunJournal, is_run_id, new_run_id, tracker_run
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.integrations.bounded import bounded_pair, rearm
from uma_callbacks.integrations.registry import resolve_sinks
from uma_callbacks.metrics.influence import observe_checkpoint

logger = logging.getLogger(__name__)


#: Python's, NumPy's and torch's global RNG states restored on exit (one helper for the package).
all_rngs_preserved = rng_preserved
#: Sources that measure a training while it runs: their deliveries replay their own run only.
LIVE_SOURCES = ("callback", "accelerate", "lightning")

#: The one table of trigger settings: ``{source: {UMAConfig field: why it cannot be honoured}}``.
#: A field set (not ``None``/empty, nor its default) for a source listed here is refused when
#: the session is made (``ValueError`` naming the field), never silently ignored. ``"offline"``
#: covers every source that is not a live training (``backfill``, ``analyze``, ...).
UNSUPPORTED: dict[str, dict[str, str]] = {
    "callback": {},
    "accelerate": {
        "every_n_steps": "attach: every_n_steps is not supported (no step events); call handle.measure(step) instead",
        "log_scalars": (
            "attach: log_scalars copies values into a Trainer's state.log_history, which Accelerate has not; "
            "the values reach the accelerator's trackers (trackers=None) and handle.records"
        ),
        "spike": "attach: spike is not supported (no training-log events); it is UMACallback's",
    },
    "lightning": {
        "every_n_steps": "UMALightningCallback: every_n_steps is not supported; measure at saves (ModelCheckpoint(every_n_train_steps=N))",
        "log_scalars": "UMALightningCallback: log_scalars copies values into a Trainer's state.log_history; the values reach trainer.logger",
        "measure": "UMALightningCallback: measure='async' is not supported (no watcher announcements); leave measure='inline'",
        "spike": "UMALightningCallback: spike is not supported; it is UMACallback's (the Trainer's training logs)",
    },
    "offline": {
        "every_n_steps": "backfill: every_n_steps is not supported (it measures the checkpoints on disk)",
        "overhead": (
            "backfill: overhead is a share of the training time since the last save, which a backfill has not; "
            "use seconds_per_save"
        ),
        "log_scalars": "backfill: log_scalars needs a Trainer's state.log_history; the values are in the records and trackers",
        "measure": (
            "backfill: measure='async' is for a live training (its saves are announced to a watcher); a backfill "
            "measures the checkpoints itself: leave measure='inline'"
        ),
        "spike": "backfill: spike measures the model in memory during a training; a backfill has checkpoints only",
    },
}


#: ``UMAConfig``'s defaults: a field at its default is not set.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(UMAConfig) if f.default is not dataclasses.MISSING}


def check_trigger_settings(config: UMAConfig, source: str) -> None:
    """Refuse the ``config`` fields the trigger of ``source`` cannot honour (:data:`UNSUPPORTED`).

    Raises:
        ValueError: such a field is set, naming it and why.
    """
    for field_name, why in UNSUPPORTED.get(source if source in LIVE_SOURCES else "offline", {}).items():
        value = getattr(config, field_name)
        if value == _DEFAULTS.get(field_name):  # left as it is by default (measure="inline")
            continue
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            raise ValueError(f"{why} (UMAConfig.{field_name}={value!r:.80})")


class Session:
    """One measuring session over a run's checkpoints.

    Args:
        config: what to measure and how (:class:`~uma_callbacks.config.UMAConfig`).
        root: the journal folder (``<output_dir>/uma``).
        source: written into each record (``callback``, ``accelerate``, ``backfill``, ``analyze``).
        collective: cross-rank sums; ``None``: the current process group, if any.

    Raises:
        ValueError: a setting the trigger of ``source`` cannot honour (:func:`check_trigger_settings`).

    Attributes:
        probe: the frozen probe (after :meth:`open`).
        journal: the journal (world rank 0; ``None`` elsewhere).
        suite: the :class:`~uma_callbacks.engine.suite.MetricSuite`.
        history: the :class:`~uma_callbacks.engine.history.CheckpointHistory`.
        delivery: the sinks and their health (rank 0).
        records: every record measured in this session, in order.
        run: the id of the training run this session's records belong to.
    """

    def __init__(
        self, config: UMAConfig, root: str | os.PathLike[str], *, source: str, collective: Collective | None = None
    ) -> None:
        check_trigger_settings(config, source)
        self.config = config
        self.root = Path(root)
        self.source = source
        self.collective = collective or current_collective()
        self.run = new_run_id()
        self.journal: RunJournal | None = (
            RunJournal(self.root, self.run, save_tensors=config.save_tensors) if self.collective.rank == 0 else None
        )
        self.delivery = Delivery(self.journal, run=self.run, follow_tracker=source not in LIVE_SOURCES)
        self.history = CheckpointHistory(config.metric_objects)
        #: a live training's figures, drawn off the training path (rank 0); ``None``: the suite draws them.
        self.figures: LateFigures | None = (
            LateFigures() if source in LIVE_SOURCES and config.draw_figures and self.is_main else None
        )
        self.suite = MetricSuite(
            metrics=config.metric_objects,
            journal=self.journal,
            on_record=self._on_record,
            collective=self.collective,
            loss_fn=config.loss_fn,
            use_cache=config.use_cache,
            draw_figures=config.draw_figures and self.figures is None,
            source=source,
            chunk_sizes=dict(config.chunk_sizes or {}),
            budget=as_budget(config.memory_budget),
            aggressive_cleanup=config.aggressive_cleanup,
            timeout_seconds=config.timeout_seconds,
            overhead=config.overhead,
        )
        self._progress = _Progress(self.is_main)
        self.suite.progress = self._progress
        self.probe: Probe | None = None
        self.records: list[Record] = []
        self._measured: set[tuple[int, str]] = set()
        self._continued = False  # a resumed training: its sinks rejoin the run's tracker runs
        self._clock: float | None = None  # live training: when the training time since the last measurement began
        self._extra_params: dict[str, Any] = {}

    @property
    def is_main(self) -> bool:
        """Whether this process journals and logs (world rank 0)."""
        return self.collective.rank == 0

    @property
    def sinks(self) -> list[Any]:
        """The sinks records go to (rank 0)."""
        return self.delivery.sinks

    # ------------------------------------------------------------------ lifecycle
    def start(
        self,
        probe_source: Any,
        default_trackers: Sequence[Any] = (),
        *,
        tracker_runs: Mapping[str, Mapping[str, str]] | None = None,
        probe_options: Mapping[str, Any] | None = None,
        known_probes: Sequence[Journal] = (),
        save: bool = True,
        params: Mapping[str, Any] | None = None,
        run: str | None = None,
        sinks_later: bool = False,
    ) -> None:
        """Build and check the probe, resolve and start the sinks: what every trigger does first.

        Args:
            probe_source: what the user gave as the probe (see
                :func:`~uma_callbacks.engine.probe_source.build_probe`).
            default_trackers: the trigger's trackers when ``UMAConfig.trackers`` is ``None``
                (the Trainer's ``report_to`` names, the accelerator's trackers, ...).
            tracker_runs: ``{tracker name: {"run", "uri"}}``, the tracker runs names join (a
                backfill: the journal's last); a resumed training rejoins its own by itself.
            probe_options: more :func:`build_probe` arguments (``collate_fn``, ``loaders``,
                ``saved_roots``, ``texts``, ``tokenizer``, ``max_length``, ``field``).
            known_probes: journals whose measured probe this one must be
                (:func:`~uma_callbacks.engine.probe_source.check_probe_matches`).
            save: write ``probe.safetensors`` for backfills.
            params: more params to log with the metric configs.
            run: the id of the training run this session continues (a resume).
            sinks_later: resolve the sinks later, with :meth:`add_sinks` (``attach``: after
                ``accelerator.init_trackers``).

        Raises:
            ValueError: no probe can be built, it differs across ranks, the journals were
                measured on another probe, it cannot be measured with the configured loss,
                ``run`` is not a run id, or an unknown tracker name.
            ModuleNotFoundError: a named tracker's package is missing.
        """  # noqa: DOC502 (from build_probe, check_same_probe, check_probe_matches, open and add_sinks)
        cfg = self.config
        options = dict(probe_options or {})
        with all_rngs_preserved():  # drawing the probe consumes no RNG of the run
            probe = build_probe(
                probe_source, probe_size=cfg.probe_size, probe_batch_size=cfg.probe_batch_size, seed=cfg.seed, **options
            )
        check_same_probe(probe, self.collective, str(options.get("field", "probe")))
        if known_probes:
            check_probe_matches(probe, known_probes)
        self.open(probe, save=save, params=params, run=run)
        if not sinks_later:
            self.add_sinks(default_trackers, tracker_runs=tracker_runs)

    def add_sinks(
        self, default_trackers: Sequence[Any] = (), *, tracker_runs: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        """Resolve the sinks and start them (rank 0): ``UMAConfig.trackers``, else ``default_trackers``.

        :meth:`start` calls it, or the trigger does when its trackers exist later
        (``attach``: at the first save, after ``accelerator.init_trackers``). A live
        training joins a tracker run its process has open and bounds every tracker call
        (``tracker_timeout_seconds``); a resumed one rejoins the tracker runs its run
        delivered to; names in ``tracker_runs`` join those runs.

        Raises:
            ValueError: an unknown tracker name.
            ModuleNotFoundError: a named tracker's package is missing.
        """  # noqa: DOC502 (from resolve_sinks)
        if not self.is_main:
            return
        live = self.source in LIVE_SOURCES
        runs = {k: dict(v) for k, v in (tracker_runs or {}).items()}
        if self._continued and self.journal is not None:
            entries = default_trackers if self.config.trackers is None else self.config.trackers
            for name in [e for e in entries if isinstance(e, str) and e not in runs]:
                where = tracker_run(self.journal, self.run, name)
                if where is not None:
                    runs[name] = where
        with all_rngs_preserved():
            sinks, own = resolve_sinks(
                self.config.trackers,
                default=default_trackers,
                runs=runs,
                capture=live,
                tracker_timeout=self.config.tracker_timeout_seconds if live else None,
                fallback_dir=self.root,
            )
            self.delivery.sinks += sinks
            self.delivery.own += own
            self.delivery.start(self.params(self._extra_params))

    def open(
        self,
        probe: Probe,
        sinks: Sequence[Any] = (),
        own_sinks: Sequence[Any] = (),
        *,
        save: bool = True,
        params: Mapping[str, Any] | None = None,
        run: str | None = None,
    ) -> None:
        """Freeze the probe, save it for backfills, start the sinks and log the params.

        Args:
            probe: the probe every checkpoint is measured on.
            sinks: where records go (rank 0).
            own_sinks: those whose runs this session opened (finished by :meth:`finish`).
            save: write ``probe.safetensors`` (a backfill reusing a saved probe does not).
            params: more params to log with the metric configs.
            run: the id of the training run this session continues (a resume); ``None``:
                the fresh id drawn at construction.

        Raises:
            ValueError: the probe cannot be measured with the configured loss, or ``run``
                is not a run id (32 hex digits, or ``""`` for an older version's run).
        """  # noqa: DOC502 (from continue_run and check_probe_usable)
        if run is not None:
            self.continue_run(run)
        with all_rngs_preserved():
            check_probe_usable(probe, self.config.loss_fn)
            self.probe = probe
            self._clock = time.monotonic() if self.source in LIVE_SOURCES else None
            self._extra_params = dict(params or {})
            if not self.is_main:
                return
            if save:
                try:
                    save_probe(probe, self.root)  # `uma backfill` rebuilds the very same probe from it
                except (ValueError, OSError, RuntimeError, SafetensorError) as err:  # custom batches, full disk
                    logger.warning("uma: the probe was not saved for backfills (%s: %s)", type(err).__name__, err)
            timeout = self.config.tracker_timeout_seconds if self.source in LIVE_SOURCES else None
            self.delivery.sinks, self.delivery.own = bounded_pair(sinks, own_sinks, timeout)  # training path only
            self.delivery.start(self.params(params))

    def continue_run(self, run: str) -> None:
        """Make this session's records those of the training run ``run`` (a resume).

        They carry its id, and the delivery replays its records.

        Raises:
            ValueError: ``run`` is not a run id (32 lowercase hex digits, or ``""`` for an
                older version's run).
        """
        if run != "" and not is_run_id(run):
            raise ValueError(f"Session run must be 32 lowercase hex digits or ''; got {run!r:.80}")
        self.run = self.delivery.run = run
        self._continued = True
        if self.journal is not None:
            self.journal.run = run

    def params(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What is logged once per run: the probe's identity and every metric's config."""
        out: dict[str, Any] = {}
        if self.source in LIVE_SOURCES:  # a backfill joins a training's run: its id is that run's
            out["run"] = self.run
        out.update({
            "probe_fingerprint": self.probe.fingerprint if self.probe else "",
            "probe_size": self.probe.n_samples if self.probe else 0,
        })  # fmt: skip
        out.update({f"{m.name}.config": m.config() for m in self.config.metric_objects})
        out.update(extra or {})
        return out

    def measure(
        self,
        model: torch.nn.Module,
        step: int,
        *,
        fingerprint: str | None = None,
        label: str = "",
        seconds: float | None = None,
        only: Collection[str] | None = None,
        optimizer: Any = None,
        log_history: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Record]:
        """Measure ``model`` at ``step`` (every rank calls it; a step is measured once).

        Args:
            model: the snapshot; left exactly as found.
            step: the checkpoint's global step.
            fingerprint: its weights fingerprint when the caller has it (else computed
                when the cache is on).
            label: tells apart two checkpoints claiming the same step (the backfill's folder).
            seconds: the compute budget of this save; ``None``: :meth:`compute_budget` of
                :meth:`train_seconds` (the training time since the last measurement, in a live
                training; none in a backfill: ``seconds_per_save`` or no budget).
            only: measure these metrics only (by name; a resume completing a cut-off save);
                ``None``: every configured metric.
            optimizer: the optimizer's state at this checkpoint, for the metrics that read it
                (``needs_optimizer``): a live optimizer (or a list of them; named after
                ``model``'s parameters by identity), an
                :class:`~uma_callbacks.core.optimizer_state.OptimizerSnapshot` (a backfill's
                ``optimizer.pt``), or ``None``.
            log_history: the Trainer's ``log_history`` at this checkpoint (live:
                ``state.log_history``; offline: the checkpoint's ``trainer_state.json``), for
                the metrics that read the training's learning rate (``influence``); ``None``:
                not known.

        Returns:
            One record per metric (empty when the step was measured already).

        Raises:
            RuntimeError: :meth:`open` was not called.
        """
        if self.probe is None:
            raise RuntimeError("Session.measure before Session.open: the probe is not frozen yet")
        if (int(step), label) in self._measured:
            return []
        self.collect_figures()  # what the worker drew since the last save
        self._measured.add((int(step), label))
        if log_history is not None:
            observe_checkpoint(self.config.metric_objects, int(step), log_history)
        rearm(self.delivery.sinks)  # a new save: a stalled tracker is tried again
        zero3 = deepspeed_zero3_reason(model)
        if zero3:  # partitioned placeholders: measuring them would give wrong numbers
            return [self.record_error(step, "deepspeed_zero3", RuntimeError(zero3))]
        with all_rngs_preserved():
            if self.collective.world_size > 1:
                self.collective.barrier()  # every rank has written the checkpoint before anyone measures
            if fingerprint is None:
                fingerprint = weights_fingerprint(model) if self.config.use_cache else ""
            logger.info("uma: measuring %s at step %d", ", ".join(self.config.metric_names), step)
            if seconds is None:
                seconds = self.compute_budget(self.train_seconds())
            if seconds is not None:  # the figures drawn since the last save are paid from this budget
                self._charge_figures()
            every = self.suite.metrics
            if only is not None:
                self.suite.metrics = [m for m in every if m.name in set(only)]
            try:
                records = self.suite.run(
                    model, self.probe, step=int(step), checkpoint=fingerprint, history=self.history, seconds=seconds,
                    optimizer=self._optimizer_state(optimizer, model),
                )  # fmt: skip
            finally:
                self.suite.metrics = every
            self.history.push(model, int(step), fingerprint)
        for record in records:
            if self._owns(record):
                record.run = self.run  # the journal stamped rank 0's; the other ranks' too
        self._progress.close()
        if self.figures is not None and self.figures.pending:
            hold_open(self, self.close)  # filed at exit if the training stops without finish()
        if self.journal is not None:
            self.journal.flush()  # writes that failed earlier (full disk) are retried at every save
        self.records.extend(records)
        if self._clock is not None:
            self._clock = time.monotonic()  # the next budget counts training time only
        return records

    def collect_figures(self, wait: bool = False) -> int:
        """File the figures the worker has drawn: write them, note them, deliver their records whole.

        Rank 0 of a live training (elsewhere nothing is queued). Without ``wait`` it takes
        what is drawn and returns at once (called at each training step); with ``wait``
        it waits for every queued figure. Returns how many records were filed.
        """
        figures = self.figures
        if figures is None or not figures.pending:
            return 0
        drawn = figures.collect(wait)
        if not drawn:
            return 0
        with all_rngs_preserved():
            for item in drawn:
                if self.journal is not None:
                    self.journal.add_figures(item.record, item.figures, item.subfolder)
                self.delivery.send_files([item.record])
        if not figures.pending:
            release(self)
        return len(drawn)

    def _charge_figures(self) -> None:
        """Owe the figure worker's CPU seconds since the last save to the time bank (every rank calls it).

        Rank 0 draws; the other ranks owe the same seconds (a sum over ranks), so every rank
        plans its save alike.
        """
        seconds = self.figures.take_seconds() if self.figures is not None else 0.0
        if self.collective.world_size > 1:
            seconds = self.collective.sum_scalar(seconds)
        self.suite.time_bank.charge(seconds)

    def _optimizer_state(self, optimizer: Any, model: torch.nn.Module) -> OptimizerSnapshot | None:
        """The state a metric reading the optimizer gets (``None`` when none of this save's metrics reads it)."""
        if optimizer is None or not any(m.needs_optimizer for m in self.suite.metrics):
            return None
        if isinstance(optimizer, OptimizerSnapshot):
            return optimizer
        return from_optimizer(optimizer, model)

    def predict_costs(self, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
        """Time the probe's unit costs on ``model`` and log one line: each metric's predicted seconds per save.

        Every rank calls it (after :meth:`open`); rank 0 logs. The line is a warning, shown by
        default (Python's logging prints warnings with no setup, while ``transformers``
        hides info lines unless ``log_level="info"``): the cost of the metrics is worth
        knowing before hours of training, and it is one line per run. The timing is reused
        at the first save (same shapes, same probe) and paid from its budget.

        Returns:
            ``{metric name: (seconds as configured, seconds scaled down as far as it goes)}``;
            empty when nothing could be timed (no probe, a loss that cannot be resolved).
        """
        if self.probe is None:
            return {}
        with all_rngs_preserved():
            try:
                units, _ = self.suite.unit_costs(model, self.probe, step=-1)
            except Exception as err:  # noqa: BLE001 (a prediction is never worth a failed training)
                logger.info("uma: could not time the probe for the cost prediction (%s: %s)", type(err).__name__, err)
                return {}
        if units is None:
            return {}
        predicted = self.suite.predicted_seconds(units)
        if self.is_main and predicted:
            logger.warning("uma: %s", cost_line(predicted, self.config, self.probe.n_samples))
        return predicted

    def not_training(self, seconds: float) -> None:
        """Take ``seconds`` spent measuring between saves (a spike) off the training time the next budget counts."""
        if self._clock is not None:
            self._clock += seconds

    def train_seconds(self) -> float | None:
        """Seconds of training since the session opened or last measured (a live training).

        ``None`` in a backfill (no training time).
        """
        return None if self._clock is None else time.monotonic() - self._clock

    def compute_budget(self, train_seconds: float | None) -> float | None:
        """The seconds this save may take: ``overhead`` x ``train_seconds`` and/or ``seconds_per_save``."""
        limits = []
        if self.config.overhead is not None and train_seconds is not None:
            limits.append(self.config.overhead * train_seconds)
        if self.config.seconds_per_save is not None:
            limits.append(self.config.seconds_per_save)
        return min(limits) if limits else None

    def record_error(self, step: int, what: str, err: BaseException, meta: Mapping[str, Any] | None = None) -> Record:
        """Journal and deliver an error that is not a metric's (an unusable checkpoint)."""
        record = Record(
            step=int(step),
            metric=what,
            status="error",
            error={
                "type": type(err).__name__,
                "message": str(err),
                "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-4000:],
            },
            meta={**dict(meta or {}), "timestamp_ms": int(time.time() * 1000)},
            checkpoint=str((meta or {}).get("path", "")),
            source=self.source,
            run=self.run,
        )
        if self.is_main and self.journal is not None:
            with all_rngs_preserved():
                self.journal.append(record)
                self.delivery.send([record])
        self.records.append(record)
        return record

    def _owns(self, record: Record) -> bool:
        """Whether ``record`` belongs to this session's run: all it measures, and in a live training its cache hits too.

        A backfill's cache hit keeps the run of the record it copies (the training run that
        measured those weights), so it is not delivered twice.
        """
        return record.status != "cached" or self.source in LIVE_SOURCES

    def _on_record(self, record: Record) -> None:
        """A record the suite made (rank 0): stamp it with this run when it is the run's; deliver it.

        A cache hit (a copy of an earlier record, not journalled by the suite) is journalled
        under this run when the session measures a live training: the run then holds its own
        value at that step, for its replays and for ``uma sync``.
        """
        if not self._owns(record):
            self.delivery.send([record])
            return
        record.run = self.run
        if (
            record.status == "cached"
            and self.journal is not None
            and all(r.record_id != record.record_id for r in self.journal.records())
        ):
            self.journal.append(record)
        if self.figures is not None and self.journal is not None and record.status in MEASURED:
            self.figures.submit(record, self.journal.root)  # drawn in the worker thread, from its files
            self.delivery.send_values([record])  # its files with its figures once they are drawn
        else:
            self.delivery.send([record])

    def finish(self) -> None:
        """File the figures still drawing, deliver everything a sink missed, then finish the runs this session opened."""
        if self.figures is not None:
            if self.journal is not None:
                self.journal.flush()  # result files a full disk held back: their figures are drawn from them
            self.collect_figures(wait=True)
            self.figures.shutdown()
            release(self)
        if self.is_main:
            with all_rngs_preserved():
                if self.journal is not None and not self.journal.flush():
                    logger.warning("uma: %d journal record(s) could not be written (disk full?)", len(self.journal.pending))
                rearm(self.delivery.sinks)
                self.delivery.finish()

    def close(self) -> None:
        """:meth:`finish`, for a training that stopped without its end event (an exception after a save).

        Run at interpreter exit for a session with figures still queued
        (:func:`~uma_callbacks.engine.late_figures.hold_open`); calling it after
        :meth:`finish` only delivers what is still pending.
        """
        self.finish()


def cost_line(predicted: Mapping[str, tuple[float, float]], config: UMAConfig, probe_size: int) -> str:
    """The prediction line: each metric's seconds per save as configured (and its floor when scaled down), and the budget.

    Example:
        >>> cost_line({"gradient_flow": (0.44, 0.44), "landscape": (5.1, 1.2)}, UMAConfig(overhead=0.25), 16)
        'predicted seconds per save on this model and a 16-sample probe: gradient_flow 0.44, landscape 5.1 (1.2 scaled down); 5.54 in all; budget: overhead=0.25 of the training time between saves (scaled down or deferred to fit)'
    """
    parts = []
    for name, (full, floor) in predicted.items():
        parts.append(f"{name} {full:.3g}" + (f" ({floor:.3g} scaled down)" if floor < 0.95 * full else ""))
    total = sum(full for full, _ in predicted.values())
    limits = []
    if config.overhead is not None:
        limits.append(f"overhead={config.overhead:g} of the training time between saves")
    if config.seconds_per_save is not None:
        limits.append(f"seconds_per_save={config.seconds_per_save:g}")
    budget = (
        f"budget: {' and '.join(limits)} (scaled down or deferred to fit)"
        if limits
        else "no budget: every metric runs as configured (overhead= or seconds_per_save= set one)"
    )
    return (
        f"predicted seconds per save on this model and a {probe_size}-sample probe: {', '.join(parts)}; "
        f"{total:.3g} in all; {budget}"
    )


def check_same_probe(probe: Probe, collective: Collective, field: str = "probe") -> None:
    """Refuse a probe that differs across ranks (a prepared DataLoader gives each rank its own).

    Raises:
        ValueError: the ranks' probe fingerprints differ (naming ``field``).
    """
    if collective.world_size == 1:
        return
    mine = float(int(probe.fingerprint[:8], 16))
    total = torch.tensor([mine, mine * mine], dtype=torch.float64)
    collective.sum_([total])
    if abs(collective.world_size * total[1].item() - total[0].item() ** 2) > 1e-6 * max(1.0, total[1].item()):
        raise ValueError(
            f"{field}: the probe differs across ranks; build it from the dataset (not a prepared DataLoader) "
            "so every rank holds the same samples"
        )


def check_probe_usable(probe: Probe, loss_fn: Any, needs_labels: bool = True) -> None:
    """Refuse a probe that no metric could measure with the default loss.

    Raises:
        ValueError: no samples, or no ``labels`` for the default loss.
    """
    first = probe.batches[0]
    if count_samples(first) == 0:
        raise ValueError("probe: the probe has no samples")
    if needs_labels and loss_fn is None and isinstance(first, Mapping) and "labels" not in first:
        raise ValueError(
            f"probe batches have no 'labels' (keys: {sorted(first)}); the default loss needs them: "
            "add labels (e.g. DataCollatorForLanguageModeling) or pass loss_fn"
        )


class _Progress:
    """One log line per metric start and end (seconds, status), and a tqdm bar over the metrics.

    The lines go through ``transformers``' logging (shown at ``log_level="info"``); the bar
    is shown when the process has a terminal.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._started = 0.0
        try:
            from transformers.utils import logging as hf_logging

            self._log = hf_logging.get_logger("uma_callbacks")
        except ImportError:  # transformers is a dependency; plain logging if it is broken
            self._log = logger

    def __call__(self, event: str, metric: str, step: int, record: Record | None) -> None:
        if not self.enabled:
            return
        if event == "start":
            self._started = time.perf_counter()
            self._log.info("uma: step %d: %s started", step, metric)
            if self._bar is None and sys.stderr.isatty():
                from tqdm.auto import tqdm

                self._bar = tqdm(desc=f"uma step {step}", unit="metric", leave=False)
            if self._bar is not None:
                self._bar.set_postfix_str(metric, refresh=True)
            return
        seconds = time.perf_counter() - self._started
        status = record.status if record is not None else "?"
        self._log.info("uma: step %d: %s %s in %.2f s", step, metric, status, seconds)
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        """Close the bar (end of a save)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
