"""Run the enabled metrics on one snapshot: cache, isolate failures, journal, deliver.

The metrics run one after another, as configured except that a metric reading another
one's results of the same save runs after it (:mod:`~uma_callbacks.engine.handoff`). For
each metric, in that order:

1. cache: a journalled ``ok`` record under (checkpoint fingerprint, metric config, probe
   fingerprint, loss function, dtype, attention implementation) is reused (status
   ``cached``, nothing computed); a loss or a metric setting that cannot be identified
   (:mod:`~uma_callbacks.core.loss_identity`) is not cached;
2. compute on this rank's share of the probe; an exception becomes an ``error`` record
   (type, message, traceback), a time-out a ``timeout`` record, and training goes on;
   all ranks agree on failure (:class:`~uma_callbacks.core.distributed.AgreeingCollective`:
   every reduction is preceded by a tiny status all-reduce), so none waits on a failed one;
3. memory is released (``gc.collect``, ``torch.cuda.empty_cache``);
4. rank 0 writes the files and the journal line, draws the figures, and hands the record
   to ``on_record`` (the session delivers it to the sinks);
5. SIGTERM during a metric stops it at its next time check: an ``interrupted`` record
   is journalled, then the signal goes on to the previous handler
   (:mod:`uma_callbacks.core.interrupt`).

This is the one place that catches metric failures.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from uma_callbacks.core.devices import model_device
from uma_callbacks.core.distributed import AgreeingCollective, Collective, LocalCollective, PeerFailure
from uma_callbacks.core.interrupt import MetricInterrupted, deferred_sigterm, redeliver_if_requested
from uma_callbacks.core.losses import LossFn
from uma_callbacks.core.model_state import preserved_model_state
from uma_callbacks.core.optimizer_state import OptimizerSnapshot
from uma_callbacks.core.records import Record
from uma_callbacks.engine.budget import MemoryBudget, compute_within_budget, release_memory
from uma_callbacks.engine.handoff import Handoff, run_order
from uma_callbacks.engine.history import CheckpointHistory
from uma_callbacks.engine.journal import Journal, cache_key, safe_name
from uma_callbacks.engine.probe import Probe, move_batch
from uma_callbacks.engine.time_budget import (
    BANK_SAVES,
    FIT_SLACK,
    SavePlan,
    TimeBank,
    UnitCosts,
    measure_unit_costs,
    overhead_needed,
    plan_save,
    units_key,
)
from uma_callbacks.metrics.base import History, Metric, MetricResult, MetricTimeout, SaveResults
from uma_callbacks.metrics.loss_choice import ResolvedLoss, resolve_loss

logger = logging.getLogger(__name__)

Drawer = Callable[[MetricResult, Any], list[Any]]


@dataclass
class MetricSuite:
    """The enabled metrics, and where their results go.

    Attributes:
        metrics: the metric objects, run in order (a metric's providers first: see
            :func:`~uma_callbacks.engine.handoff.run_order`; metrics that need each other's
            results are refused at construction).
        journal: the durable record (rank 0 only); ``None`` keeps nothing on disk.
        on_record: called with each record once it is journalled (rank 0 only).
        collective: cross-rank sums; ``None`` for one process.
        loss_fn: per-sample loss; ``None`` for the HF default.
        use_cache: reuse journalled results for the same key.
        draw_figures: draw PNGs (needs matplotlib; skipped with a note if absent).
        source: written into each record (``callback``, ``backfill``, ...).
        chunk_sizes: fixed chunk size per metric name (skips planning for that metric).
        budget: plans each metric's memory mode and chunk, and retries smaller on OOM.
        aggressive_cleanup: a full ``gc.collect()`` after every metric (see ``release_memory``).
        timeout_seconds: time limit for each metric that has none of its own.
        progress: called ``(event, metric name, step, record)`` at each metric's ``"start"``
            and ``"end"`` (the record at the end).
        memory_calibration: per metric name, measured / planned peak of its earlier runs
            under the budget (at least 1): its next plan adds that overrun
            (:func:`~uma_callbacks.engine.budget.calibrated`), so a metric that peaked over
            its plan plans for it the next time.
        time_calibration: per metric name, measured / predicted seconds of its earlier runs
            (the result's files and figures included): its next prediction is scaled by it.
        time_bank: the budget carried between saves, and the unit costs reused while the
            model's shapes and the probe are unchanged
            (:class:`~uma_callbacks.engine.time_budget.TimeBank`).
        overhead: ``UMAConfig.overhead`` when the budget is that share of training time (the
            warning about a metric that never fits says what overhead it needs).
    """

    metrics: Sequence[Metric]
    journal: Journal | None = None
    on_record: Callable[[Record], Any] | None = None
    collective: Collective | None = None
    loss_fn: LossFn | None = None
    use_cache: bool = True
    draw_figures: bool = True
    source: str = "callback"
    chunk_sizes: dict[str, int] = field(default_factory=dict)
    budget: MemoryBudget | None = None
    aggressive_cleanup: bool = False
    timeout_seconds: float | None = None
    progress: Callable[[str, str, int, Record | None], Any] | None = None
    time_calibration: dict[str, float] = field(default_factory=dict)
    memory_calibration: dict[str, float] = field(default_factory=dict)
    _memory_calibration_chunk: dict[str, int] = field(default_factory=dict)
    _warned_partial: set[str] = field(default_factory=set)
    _sample_bytes: dict[Any, int] = field(default_factory=dict)
    _loss_identity: tuple[Any, str] | None = None
    _warned_uncached: set[str] = field(default_factory=set)
    time_bank: TimeBank = field(default_factory=TimeBank)
    overhead: float | None = None

    def __post_init__(self) -> None:
        """Refuse metrics that need each other's results (no order runs them).

        Raises:
            ValueError: a cycle in the metrics' ``results_needed`` (named).
        """  # noqa: DOC502 (from run_order)
        run_order(self.metrics)

    @property
    def is_main(self) -> bool:
        """Whether this process logs (world rank 0)."""
        return (self.collective or LocalCollective()).rank == 0

    def _resolve_loss(self, model: torch.nn.Module, batches: list[Any]) -> ResolvedLoss | None:
        """The save's loss, resolved once for the time plan, the memory plans and every metric."""
        try:
            return resolve_loss(model, self.loss_fn, batches)
        except Exception:  # noqa: BLE001 (a bad loss or labels: every metric records the error itself)
            return None

    def run(
        self,
        model: torch.nn.Module,
        probe: Probe,
        step: int,
        checkpoint: str = "",
        history: CheckpointHistory | None = None,
        seconds: float | None = None,
        optimizer: OptimizerSnapshot | None = None,
    ) -> list[Record]:
        """Measure ``model`` on ``probe`` and return one record per metric.

        Args:
            model: the snapshot (left exactly as found).
            probe: the frozen probe; each rank takes its shard.
            step: the checkpoint's global step.
            checkpoint: the weights fingerprint (cache key part); empty disables the cache.
            history: the earlier checkpoints, for metrics that compare against them.
            seconds: the compute budget of this save (:mod:`~uma_callbacks.engine.time_budget`);
                ``None``: every metric runs as configured.
            optimizer: the optimizer's state at this checkpoint, given to the metrics that
                read it (``needs_optimizer``; their cache key includes its fingerprint); ``None``:
                none (they record a skip).

        Returns:
            The records, in the order the metrics ran (as configured, each metric's
            providers first).
        """
        collective = self.collective or LocalCollective()
        started = time.perf_counter()
        device = model_device(model)
        local_batches = self._local_batches(probe, collective, device)
        decided = _Decided(device, self._resolve_loss(model, local_batches), optimizer)
        if optimizer is not None and checkpoint and any(m.needs_optimizer for m in self.metrics):
            decided.optimizer_key = _optimizer_fingerprint(optimizer)
        if seconds is not None and collective.world_size > 1:  # every rank plans on the same budget
            seconds = _mean_over_ranks(collective, [seconds])[0]
        plans = self._plan_time(model, local_batches, collective, seconds, history, decided.loss, step, probe.fingerprint)
        records = []
        decided.handoff = Handoff.for_save(self.metrics)
        for i in run_order(self.metrics):
            metric = self.metrics[i]
            planned, budget_meta = plans[i] if plans else (metric, None)
            if self.progress is not None:
                self.progress("start", metric.name, step, None)
            record = self._run_one(
                planned, model, local_batches, probe, step, checkpoint, collective, history, budget_meta, decided
            )
            decided.handoff.consumed(metric)
            if self.progress is not None:
                self.progress("end", metric.name, step, record)
            records.append(record)
        decided.handoff = None  # what the metrics handed each other is this save's only
        if plans and seconds is not None:  # what this save left of its budget is banked; an overrun is owed
            spent = time.perf_counter() - started
            if collective.world_size > 1:
                spent = _mean_over_ranks(collective, [spent])[0]
            self.time_bank.settle(step, seconds, spent)
        return records

    def _local_batches(self, probe: Probe, collective: Collective, device: torch.device) -> list[Any]:
        """This rank's share of the probe, on the model's device."""
        shard = probe.shard(collective.rank, collective.world_size) if collective.world_size > 1 else probe.batches
        return [move_batch(b, device) for b in shard]

    def unit_costs(
        self,
        model: torch.nn.Module,
        probe: Probe,
        step: int = -1,
        batches: list[Any] | None = None,
        loss: ResolvedLoss | None = None,
    ) -> tuple[UnitCosts | None, float]:
        """The probe's unit costs on ``model``: reused while its shapes and the probe are unchanged, else timed.

        Every rank calls it. Timing them is paid from the budget: the seconds it took are
        returned, and a timing outside a save (``step=-1``, the prediction at train begin)
        is owed to the bank. ``batches`` and ``loss``: this rank's probe batches on the
        model's device and the resolved loss, when the save has them already.

        Returns:
            ``(units, seconds spent timing them now)``; ``(None, 0.0)`` when the loss cannot be resolved.
        """
        collective = self.collective or LocalCollective()
        key = units_key(model, probe.fingerprint, collective.world_size)
        stale = self.time_bank.units is None or self.time_bank.units_key != key
        if collective.world_size > 1:  # time again on every rank when any rank's model changed
            stale = collective.sum_scalar(1.0 if stale else 0.0) > 0
        if not stale:
            return self.time_bank.units, 0.0
        if batches is None:
            batches = self._local_batches(probe, collective, model_device(model))
        if loss is None:
            loss = self._resolve_loss(model, batches)
        if loss is None:
            return None, 0.0
        started = time.perf_counter()
        with preserved_model_state(model):  # before the metrics' own guards
            units = measure_unit_costs(model, batches, loss.raw)
        if collective.world_size > 1:  # the mean over ranks, so every rank scales alike
            mean = _mean_over_ranks(collective, [units.forward, units.backward, units.hvp])
            units = UnitCosts(mean[0], mean[1], mean[2], units.n_batches)
        paid = time.perf_counter() - started
        bank = self.time_bank
        bank.units, bank.units_key, bank.units_step, bank.units_seconds = units, key, int(step), paid
        if step < 0:
            bank.seconds -= paid  # timed before the first save: the first budget pays it back
        return units, paid

    def predicted_seconds(self, units: UnitCosts) -> dict[str, tuple[float, float]]:
        """``{metric name: (seconds as configured, seconds scaled down as far as it goes)}`` on these unit costs."""
        factors = self.time_calibration
        return {
            m.name: (m.time_cost(units) * factors.get(m.name, 1.0), m.min_time_cost(units) * factors.get(m.name, 1.0))
            for m in self.metrics
        }

    def _plan_time(
        self,
        model: torch.nn.Module,
        batches: list[Any],
        collective: Collective,
        seconds: float | None,
        history: CheckpointHistory | None = None,
        loss: ResolvedLoss | None = None,
        step: int = 0,
        probe_fingerprint: str = "",
    ) -> list[tuple[Metric, dict[str, Any] | None]]:
        """Each metric fitted to its share of the compute budget and the bank (every rank decides alike).

        ``loss``: the save's resolved loss (``None``: it could not be resolved, every metric
        records why, and nothing is planned).
        """
        if seconds is None or loss is None:
            return []
        probe = _FingerprintOnly(probe_fingerprint)
        units, paid = self.unit_costs(model, probe, step, batches, loss)  # type: ignore[arg-type]
        if units is None:
            return []
        bank = self.time_bank
        calibration = self.time_calibration
        # metrics with nothing to compare against yet take no share
        waiting = {
            m.name for m in self.metrics
            if m.history_needed and (history is None or not history.previous)
        }  # fmt: skip
        active = [m for m in self.metrics if m.name not in waiting]
        plan = plan_save(active, units, seconds, bank, step, calibration, paid)
        self._warn_never(plan, seconds)
        common = {
            "save_seconds": round(plan.own_seconds + plan.bank_seconds, 4), "own_seconds": round(plan.own_seconds, 4),
            "bank_seconds": round(plan.bank_seconds, 4), "banked_over_steps": list(bank.steps),
            "unit_costs": {"forward": units.forward, "backward": units.backward, "hvp": units.hvp},
            "unit_costs_step": bank.units_step, "unit_costs_reused": paid == 0.0, "calibration_seconds": round(paid, 4),
        }  # fmt: skip
        plans: list[tuple[Metric, dict[str, Any] | None]] = []
        for metric in self.metrics:
            if metric.name in waiting:
                plans.append((metric, None))
                continue
            plans.append(self._plan_one(metric, units, plan, common, step))
        return plans

    def _plan_one(
        self, metric: Metric, units: UnitCosts, plan: SavePlan, common: dict[str, Any], step: int
    ) -> tuple[Metric, dict[str, Any]]:
        """``(the metric as it runs, its meta["compute_budget"])`` under ``plan``; the bank's line is updated."""
        factor = self.time_calibration.get(metric.name, 1.0)
        share = plan.shares.get(metric.name, 0.0)
        meta: dict[str, Any] = {**common, "seconds": round(share, 4), "calibration": round(factor, 4)}
        if metric.name in plan.shares:
            planned, changes = metric.scaled_to(share / factor, units)
            raw = planned.time_cost(units)
            waited = self.time_bank.waiting.pop(metric.name, None)
            meta.update({
                "predicted_seconds": round(raw * factor, 4), "raw_predicted_seconds": raw, "scaled": changes,
                "fits": True, "from_bank": metric.name in plan.from_bank,
            })  # fmt: skip
            if waited is not None:
                meta["waited_since_step"] = waited
            return planned, meta
        floor = metric.min_time_cost(units) * factor
        meta.update({"predicted_seconds": round(floor, 4), "raw_predicted_seconds": floor / factor, "scaled": {}, "fits": False})
        if metric.name in plan.never:
            meta["reason"] = (
                f"needs about {floor:.2f} s even scaled down, more than {BANK_SAVES} saves' budget banked "
                f"({BANK_SAVES} x {plan.own_seconds:.2f} s)"
            )
        else:
            self.time_bank.waiting.setdefault(metric.name, int(step))
            meta["reason"] = plan.waiting.get(metric.name, "")
            meta["waiting_since_step"] = self.time_bank.waiting[metric.name]
        return metric, meta

    def _warn_never(self, plan: SavePlan, seconds: float) -> None:
        """One warning per metric that cannot fit even :data:`BANK_SAVES` saves' budgets, with the overhead it needs."""
        for name, floor in plan.never.items():
            if name in self.time_bank.warned or not self.is_main:
                continue
            self.time_bank.warned.add(name)
            needed = overhead_needed(floor, seconds, self.overhead)
            hint = (
                f"overhead >= {needed[0]:.3g} runs it every {BANK_SAVES}th save, >= {needed[1]:.3g} at every save"
                if needed is not None
                else f"seconds_per_save >= {floor / (FIT_SLACK * BANK_SAVES):.3g} runs it every {BANK_SAVES}th save"
            )
            logger.warning(
                "uma: %s never fits the compute budget: it needs about %.2f s per run even scaled down, and a save's "
                "budget is %.2f s (%s banked over %d saves is too little); %s, or give it smaller settings",
                name, floor, seconds, f"{BANK_SAVES * seconds:.2f} s", BANK_SAVES, hint,
            )  # fmt: skip

    def _run_one(
        self,
        metric: Metric,
        model: torch.nn.Module,
        batches: list[Any],
        probe: Probe,
        step: int,
        checkpoint: str,
        collective: Collective,
        history: CheckpointHistory | None,
        budget_meta: dict[str, Any] | None,
        decided: _Decided,
    ) -> Record:
        view = history.view(metric) if history is not None else None
        # a result that compares checkpoints is identified by all the checkpoints it used
        identity = "|".join([checkpoint, *view.fingerprints()]) if checkpoint and view is not None else checkpoint
        if metric.needs_optimizer and identity:  # the optimizer's state is part of what it measures
            identity = f"{identity}|optimizer={decided.optimizer_key or 'none'}"
        handoff = decided.handoff
        results = handoff.results_for(metric) if handoff is not None else None
        context = self._key_context(model) if checkpoint else ""
        config = self._key_config(metric) if context else None
        key = cache_key(f"{identity}|{context}", config, probe.fingerprint) if config is not None else ""
        if key and config is not None and handoff is not None and metric.results_needed():  # keyed by what its providers handed it too
            key = self._handoff_key(metric, results, handoff, f"{identity}|{context}", config, probe, collective)
        claimed = self._claim(key, collective)
        try:
            cached = self._cached(key, collective)
            if cached is not None:
                record = Record(**{**cached.to_dict(), "step": int(step), "status": "cached", "source": self.source})
                record.cache_key = key
                logger.info("uma: %s at step %d read from cache", metric.name, step)
                if handoff is not None:
                    handoff.handed(metric, None, record)
                self._deliver(record)
                return record
            return self._measure_one(
                metric, model, batches, probe, step, checkpoint, collective, history, budget_meta, view, key, decided,
                results,
            )
        finally:
            if claimed and self.journal is not None:
                self.journal.release(key)

    def _handoff_key(
        self,
        metric: Metric,
        results: SaveResults | None,
        handoff: Handoff,
        identity: str,
        config: dict[str, Any],
        probe: Probe,
        collective: Collective,
    ) -> str:
        """The cache key of a metric that reads other metrics' results: also keyed by them.

        When some asked output did not reach it now, a journalled result computed with all
        of them is still as good (the providers' results are the same), so that key is
        tried first; else the key says what it went without. ``""``: not cacheable (a
        provider's values that cannot be identified).
        """
        part = handoff.identity(metric, results)
        if part is None:
            return ""
        key = cache_key(f"{identity}|{part}" if part else identity, config, probe.fingerprint)
        if results is not None and results.missing:
            full = handoff.identity(metric, results, as_if_handed=True)
            if full is not None and full != part:
                with_all = cache_key(f"{identity}|{full}", config, probe.fingerprint)
                if self._cached(with_all, collective) is not None:
                    return with_all
        return key

    def _key_context(self, model: torch.nn.Module) -> str:
        """What besides the weights, the metric config and the probe changes a result.

        That is the loss function, the model's dtype and its attention implementation; ``""``
        (no cache for this run, warned once) when the loss cannot be identified.
        """
        # identified at every measurement, not once per run: a loss object whose settings the
        # user changes between saves (a temperature, a label weight) is another loss then
        from uma_callbacks.core.loss_identity import loss_identity

        ident, why = loss_identity(self.loss_fn)
        if ident is None and self.use_cache and self._loss_identity is None:
            logger.warning(
                "uma: results are not cached in this run: the loss_fn %r cannot be identified across processes (%s); "
                "give it a string attribute uma_cache_identity naming what it computes to cache its results",
                self.loss_fn, why,
            )  # fmt: skip
        self._loss_identity = (self.loss_fn, ident or "")
        if not ident:
            return ""
        config = getattr(model, "config", None)
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        attention = getattr(config, "_attn_implementation", None) if config is not None else None
        return f"loss={ident}|dtype={','.join(dtypes)}|attention={attention}"

    def _key_config(self, metric: Metric) -> dict[str, Any] | None:
        """The metric's part of the cache key.

        ``None`` (not cached, warned once) when one of its settings cannot be identified.
        """
        config, why = _key_config(metric)
        if config is None and self.use_cache and metric.name not in self._warned_uncached:
            self._warned_uncached.add(metric.name)
            logger.warning("uma: %s is not cached in this run: %s", metric.name, why)
        return config

    def _claim(self, key: str, collective: Collective) -> bool:
        """Take the key's claim, waiting while another process computes it.

        That process is a concurrent backfill of the same run; waiting for it has each result
        computed once.
        """
        if not (key and self.use_cache and self.journal is not None and collective.world_size == 1):
            return False
        waited = 0.0
        while not self.journal.claim(key):
            if waited == 0.0:
                logger.info("uma: another process is computing %s; waiting for its result", key[:12])
            time.sleep(0.2)
            waited += 0.2
        return True

    def _measure_one(
        self,
        metric: Metric,
        model: torch.nn.Module,
        batches: list[Any],
        probe: Probe,
        step: int,
        checkpoint: str,
        collective: Collective,
        history: CheckpointHistory | None,
        budget_meta: dict[str, Any] | None,
        view: Any,
        key: str,
        decided: _Decided,
        results: SaveResults | None = None,
    ) -> Record:
        started = time.perf_counter()
        if history is not None and history.dropped and (metric.history_needed or metric.needs_first):
            result = _skipped(metric, history.dropped)
        elif (not_ready := metric.not_ready(view if view is not None else History())) is not None:
            result = _skipped(metric, not_ready)  # before any planning: it would skip on entry
        elif budget_meta is not None and not budget_meta["fits"]:
            result = _skipped(
                metric,
                f"compute budget: {metric.name} {budget_meta.get('reason', '')} (raise overhead= or seconds_per_save=)",
            )
        else:
            # a metric may overrun its share of the compute budget, within bounds: 3x, or 2 s more
            budget_limit = None if budget_meta is None else max(3.0 * budget_meta["seconds"], budget_meta["seconds"] + 2.0)
            result = self._compute(metric, model, batches, collective, view, decided, budget_limit, results)
        result.meta.setdefault("seconds", time.perf_counter() - started)
        if budget_meta is not None:
            result.meta["compute_budget"] = budget_meta
        result.meta["probe_fingerprint"] = probe.fingerprint
        result.meta["world_size"] = collective.world_size
        result.meta["timestamp_ms"] = int(time.time() * 1000)
        self._learn_memory(metric, result)
        # a full gc.collect (~0.3 s with transformers imported) only where a failure's traceback may
        # hold tensors: not for a skip (the planner's refusal comes before the computation; after an
        # out-of-memory retry the planner has collected already)
        release_memory(decided.device, full=self.aggressive_cleanup or result.status not in ("ok", "skipped"))
        record = Record(
            step=int(step),
            metric=metric.name,
            status=result.status,
            scalars=dict(result.scalars),
            meta=dict(result.to_json_dict()["meta"]),
            error=result.error,
            cache_key=key,
            checkpoint=checkpoint,
            probe=probe.fingerprint,
            source=self.source,
        )
        if decided.handoff is not None:
            decided.handoff.handed(metric, result, record)
        _note_handoff(result, results, record)
        if self.is_main and self.journal is not None:
            self._write_files(result, step, record)
            self.journal.append(record)
        if budget_meta is not None and result.status in ("ok", "partial") and budget_meta["raw_predicted_seconds"] > 0:
            # measured over predicted, the result's files and figures included: they are this metric's cost too
            ratio = (time.perf_counter() - started) / budget_meta["raw_predicted_seconds"]
            old = self.time_calibration.get(metric.name)
            self.time_calibration[metric.name] = ratio if old is None else 0.5 * (old + ratio)
        redeliver_if_requested()  # SIGTERM during the metric: terminate now that it is journalled
        if result.status == "partial":
            if metric.name not in self._warned_partial:  # once per metric, not at every save
                self._warned_partial.add(metric.name)
                logger.warning(
                    "uma: %s at step %d is partial: values kept, but its iterative method did not reach the "
                    "stated accuracy (see meta: residuals); flagged as uma.%s.status=partial",
                    metric.name, step, metric.name,
                )  # fmt: skip
        elif result.status != "ok":
            logger.log(
                logging.INFO if result.status == "skipped" else logging.WARNING,
                "uma: metric %s at step %d: %s: %s",
                metric.name,
                step,
                result.status,
                (result.error or {}).get("message", ""),
            )
        self._deliver(record)
        return record

    def _learn_memory(self, metric: Metric, result: MetricResult) -> None:
        """Under a budget: show an overrun on the dashboard, and keep measured / planned peak as the next calibration.

        The overrun is the ``over_budget`` scalar, 1 or 0; the calibration is the metric's.
        """
        over = result.meta.get("over_budget")
        if result.status not in ("ok", "partial") or not isinstance(over, bool):
            return
        result.scalars["over_budget"] = 1.0 if over else 0.0
        meta = result.meta
        sizes = tuple(
            meta.get(k) for k in ("planned_base_fixed_bytes", "planned_base_per_sample_bytes", "chunk_size", "peak_bytes")
        )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
            return
        fixed, per, chunk, peak = cast("tuple[int, int, int, int]", sizes)
        if fixed + per * chunk <= 0:
            return
        ratio = peak / (fixed + per * chunk)  # measured over the cost model's plan
        old = self.memory_calibration.get(metric.name, 1.0)
        # an overrun is learnt at once; a plan that held relaxes half-way to what was measured
        learnt = ratio if ratio > old else 0.5 * (old + ratio)
        self.memory_calibration[metric.name] = max(1.0, learnt)
        self._memory_calibration_chunk[metric.name] = chunk
        if self.memory_calibration[metric.name] != 1.0 or old != 1.0:
            result.meta["next_memory_calibration"] = round(self.memory_calibration[metric.name], 4)

    def _cached(self, key: str, collective: Collective) -> Record | None:
        if not (self.use_cache and key):
            return None
        hit = None
        if self.is_main and self.journal is not None:
            hit = self.journal.lookup(key)
        # every rank must take the same branch: rank 0 decides
        if collective.world_size > 1:
            agreed = collective.sum_scalar(1.0 if hit is not None else 0.0) > 0
            if not agreed:
                return None
            if hit is None:  # other ranks: a placeholder, they neither log nor return values
                return Record(step=0, metric="", status="cached", cache_key=key)
        return hit

    def _compute(
        self,
        metric: Metric,
        model: torch.nn.Module,
        batches: list[Any],
        collective: Collective,
        history: Any,
        decided: _Decided,
        budget_limit: float | None = None,
        results: SaveResults | None = None,
    ) -> MetricResult:
        failure: BaseException | None = None
        result: MetricResult | None = None
        # several ranks: every reduction is guarded, so a rank that fails anywhere in the
        # metric (even before a reduction the others are waiting in) fails it on all ranks
        guarded = AgreeingCollective(collective) if collective.world_size > 1 else None
        try:
            with deferred_sigterm():
                result = compute_within_budget(
                    metric,
                    model,
                    batches,
                    decided.loss if decided.loss is not None else self.loss_fn,  # unresolvable: it fails there, recorded
                    self.budget,
                    collective=guarded,
                    chunk_size=self.chunk_sizes.get(metric.name),
                    history=history,
                    sample_cache=self._sample_bytes,
                    calibration=self.memory_calibration.get(metric.name, 1.0),
                    calibration_chunk=self._memory_calibration_chunk.get(metric.name, 1),
                    timeout_seconds=metric.time_limit(self.timeout_seconds, budget_limit),  # an argument: the metric is not changed
                    device=decided.device,
                    optimizer_state=decided.optimizer if metric.needs_optimizer else None,
                    results=results,
                )
        except Exception as err:  # isolate: a broken metric never stops training
            failure = err
        if guarded is None:
            failed_anywhere = failure is not None
        else:
            failed_anywhere = guarded.conclude(failure is not None)
            if failed_anywhere:
                culprit, message = guarded.share_failure(failure)
                if failure is None or isinstance(failure, PeerFailure):
                    where = f"rank {culprit}: {message}" if culprit >= 0 else "ranks disagreed"
                    text = f"the metric failed on another rank ({where})"
                    failure = MetricTimeout(text) if message.startswith("MetricTimeout:") else PeerFailure(text)
        if not failed_anywhere and result is not None:
            return result
        if failure is None:
            failure = RuntimeError("the metric failed on another rank")
        status = "timeout" if isinstance(failure, MetricTimeout) else ("skipped" if _is_skip(failure) else "error")
        if isinstance(failure, MetricInterrupted):
            status = "interrupted"
        meta: dict[str, Any] = {"config": metric.config()}
        refused_plan = getattr(failure, "budget_meta", None)
        if isinstance(refused_plan, dict):  # a memory-budget refusal: the plan it refused
            meta.update(refused_plan)
        progress = getattr(failure, "progress", None)
        if progress:
            meta["progress"] = dict(progress)
        return MetricResult(
            name=metric.name,
            status=status,
            meta=meta,
            error={
                "type": type(failure).__name__,
                "message": str(failure),
                "traceback": "".join(traceback.format_exception(type(failure), failure, failure.__traceback__))[-4000:],
            },
        )

    def _write_files(self, result: MetricResult, step: int, record: Record) -> None:
        """Write the result's files and figures for ``record``.

        Through :meth:`Journal.write_result`: no link followed, nothing partial left, failed
        files retried while the record is pending.
        """
        assert self.journal is not None
        if result.status not in ("ok", "partial"):
            return
        # another configuration of this metric, or another training run in the same folder,
        # already has its files at this step: never overwrite them, write into
        # step-<N>/<metric>-<config hash>/ or step-<N>/<metric>-run-<run>/ instead
        subfolder = _variant_folder(self.journal.root / f"step-{int(step)}", result)
        run = str(getattr(self.journal, "run", "") or record.run or "")
        if not subfolder and run and _files_of_another_run(self.journal, int(step), result.name, run):
            subfolder = f"{result.name}-run-{run[:12]}"
        figures: dict[str, bytes] = {}
        if self.draw_figures:
            try:
                from uma_callbacks import plots
            except ImportError:  # matplotlib is an optional extra
                plots = None  # type: ignore[assignment]
            try:
                figures = plots.render_result(result) if plots is not None else {}  # PNG bytes, nothing on disk yet
            except Exception as err:  # a figure is never worth a lost record
                logger.warning("uma: could not draw %s at step %d (%s: %s)", result.name, step, type(err).__name__, err)
        self.journal.write_result(record, result, subfolder, figures)

    def _deliver(self, record: Record) -> None:
        if self.is_main and self.on_record is not None:
            self.on_record(record)


def _variant_folder(step_folder: Any, result: MetricResult) -> str:
    """``""`` when ``step_folder`` holds no result of this metric or one of the same config, else ``"<metric>-<config hash>"``."""
    import hashlib
    import json

    from uma_callbacks.core.safe_json import read_json

    existing = step_folder / f"{safe_name(result.name)}.json"
    if not existing.is_file():
        return ""
    try:
        theirs = read_json(existing).get("meta", {}).get("config")  # bounded: the file is data from disk
    except (OSError, ValueError, AttributeError):  # unreadable: keep clear of it
        theirs = None
    mine = result.meta.get("config")
    if theirs == json.loads(json.dumps(mine, default=str)):
        return ""
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{result.name}-{digest}"


def _files_of_another_run(journal: Journal, step: int, metric: str, run: str) -> bool:
    """Whether a journalled record of another training run names ``step-<step>/<metric>.json``.

    That is a second training in the same ``output_dir``: its files must not replace the first one's.
    """
    rel = f"step-{int(step)}/{safe_name(metric)}.json"
    return any(rel in r.files and r.run != run for r in journal.records() if r.step == step)


def _key_config(metric: Metric) -> tuple[dict[str, Any] | None, str]:
    """``metric.config()`` for the cache key, with the identity of each setting it can only describe.

    A tensor is identified by its shape, a callable by its repr; ``(None, why)`` when such a
    setting cannot be identified.
    """
    from uma_callbacks.core.loss_identity import value_identity

    config = metric.config()
    for name, value in sorted(vars(metric).items()):
        if name.startswith("_") or name in ("chunk_size", "timeout_seconds") or _plain(value):
            continue
        ident, why = value_identity(value)
        if ident is None:
            return None, f"its setting {name!r} cannot be identified ({why})"
        config[f"{name}#identity"] = ident
    return config, ""


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is JSON data that ``Metric.config`` keeps whole."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if depth > 8:
        return False
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _skipped(metric: Metric, reason: str) -> MetricResult:
    return MetricResult(
        name=metric.name,
        status="skipped",
        meta={"config": metric.config()},
        error={"type": "MetricSkipped", "message": reason, "traceback": ""},
    )


def _is_skip(err: BaseException) -> bool:
    return getattr(err, "uma_skip", False)


def _mean_over_ranks(collective: Collective, values: list[float]) -> list[float]:
    """The mean of ``values`` over the ranks (one sum all-reduce)."""
    total = torch.tensor(values, dtype=torch.float64)
    collective.sum_([total])
    return [float(v) / collective.world_size for v in total]


@dataclass(frozen=True)
class _FingerprintOnly:
    """A probe's fingerprint where :meth:`MetricSuite.unit_costs` needs only that (its batches are given)."""

    fingerprint: str


@dataclass
class _Decided:
    """What one save decides once and passes to every metric: the model's device and the resolved loss.

    ``loss`` is ``None`` when it could not be resolved; each metric then records why.
    """

    device: torch.device
    loss: ResolvedLoss | None
    optimizer: OptimizerSnapshot | None = None
    optimizer_key: str = ""
    handoff: Handoff | None = None


def _note_handoff(result: MetricResult, results: SaveResults | None, record: Record) -> None:
    """Say in the result's meta what a metric that reads other metrics' results went without at this save.

    ``meta["results_missing"]``: ``{provider (or provider/output): why}``; absent when
    everything asked for reached the metric or it reads none.
    """
    if results is None or not results.missing:
        return
    result.meta["results_missing"] = dict(results.missing)
    record.meta["results_missing"] = dict(results.missing)


def _optimizer_fingerprint(state: OptimizerSnapshot) -> str:
    """The optimizer state's identity for cache keys: its tensors' fingerprint and its groups, kind and shapes."""
    from uma_callbacks.engine.snapshot import weights_fingerprint

    tensors = state.flat_tensors()
    return f"{weights_fingerprint(tensors) if tensors else ''}:{state.fingerprint_of_meta()}"
