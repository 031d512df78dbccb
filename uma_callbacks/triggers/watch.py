"""``uma watch``: measure a training's checkpoints in a separate process, as they are saved.

A training with ``measure="async"`` does not measure: at each save it announces the
checkpoint (:mod:`~uma_callbacks.engine.announce`, ``<journal>/watch.jsonl``, its weight
files held by hard links) and goes on. :func:`watch` follows that file and measures each
announced complete checkpoint, oldest first, through one
:class:`~uma_callbacks.session.Session` for its whole life (the cache, the claims, the
checkpoint history: ``interpolation`` and ``trajectory`` from the second checkpoint on),
exactly as the in-process callback would have measured it:

- records belong to the training run (the run line's id, :meth:`Session.continue_run`) and
  go into the training's tracker runs at each checkpoint's step, while the training logs
  too: MLflow, the same run id through the announced tracking URI; W&B, the same run as a
  second writer (:class:`~uma_callbacks.integrations.wandb.WandbSink` ``writer_label``:
  W&B's shared mode, or an offline run file of the same id). Tracker calls are bounded
  and retried as the live sinks' are (re-armed at each checkpoint, pending records
  delivered at the end);
- the default metrics are those the training was configured with (the run line),
  overridden by ``metrics=`` / ``config=``; the probe is the journal's ``probe.safetensors``;
- a checkpoint is read from its held copy when there is one (so ``save_total_limit``
  rotation loses nothing), else from its folder; held copies are released once measured
  and no longer needed as history (the last measured ones a pair metric compares with, the
  first one when a metric needs it; everything at the end of a finished training). One
  already gone becomes an ``error`` record naming it (metric ``checkpoint``), with why the
  training could not hold it when it said so (a full disk);
- a metric that reads the optimizer (``needs_optimizer``: ``optimizer_state``) gets the
  checkpoint's saved optimizer state (``optimizer.pt``, ``optimizer.bin``), as a backfill
  does (:func:`~uma_callbacks.triggers.optimizer_file.read_optimizer_state`): from the held
  copy (the training holds it when one of its metrics reads the optimizer), else from the
  checkpoint folder while its run marker still names that step (a folder saved into again
  at a later step is not read);
- killed (even ``kill -9``) and started again, it resumes: a step whose metrics the run
  already holds finished records of is skipped, a partly measured one completes, and the
  history is refilled from the held copies without measuring
  (:func:`~uma_callbacks.triggers.history_seed.seed_history`), so pair metrics still
  equal an uninterrupted run's;
- ``stale_after``: a ``checkpoint-*`` folder that has gone that long without a
  complete-checkpoint line (or is still unannounced when the training has finished) becomes
  an ``error`` record naming it, once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.checkpoints import Checkpoint
from uma_callbacks.config import UMAConfig
from uma_callbacks.core.optimizer_state import OptimizerSnapshot
from uma_callbacks.core.process_identity import process_gone
from uma_callbacks.core.records import Record
from uma_callbacks.engine.announce import Announcements, CheckpointAnnouncement, read_announcements, release_held
from uma_callbacks.engine.budget import as_budget
from uma_callbacks.engine.run_identity import RUN_FILE, UNFINISHED, read_run_marker
from uma_callbacks.integrations.bounded import bounded_pair
from uma_callbacks.integrations.registry import make_sink, resolve_sinks
from uma_callbacks.metric_specs import build_metric
from uma_callbacks.metrics.base import Metric
from uma_callbacks.metrics.influence import saved_log_history
from uma_callbacks.session import Session
from uma_callbacks.triggers.history_seed import seed_history
from uma_callbacks.triggers.optimizer_file import OPTIMIZER_FILES, read_optimizer_state
from uma_callbacks.triggers.prefetch import ModelLoader, prefetched

logger = logging.getLogger(__name__)

#: The label this process writes under in a W&B run the training has open.
WRITER_LABEL = "uma-watch"
#: The metric name of a checkpoint's own error records (gone, unreadable, never completed).
CHECKPOINT_ERROR = "checkpoint"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_CONFIG_FIELDS = {f.name for f in fields(UMAConfig) if f.init}
_NO_RUN = (
    "{where}: no training to watch: {why}; start the training with measure=\"async\" "
    "(UMACallback(..., measure=\"async\") or attach(..., measure=\"async\")), then `uma watch` its output folder"
)


# ---------------------------------------------------------------------- summary
@dataclass
class WatchSummary:
    """What a watcher did.

    Attributes:
        run: the training run's id.
        measured: the steps measured by this process, in order.
        skipped: the announced steps the run already held finished records of (a restart).
        seeded: the steps loaded into the history only (a restart), not measured.
        records: every record produced (metrics and checkpoint errors).
        errors: ``(checkpoint folder, step, reason)`` for each checkpoint that could not be
            used and each metric that failed.
        computed: records computed; ``cached``: read from the journal.
        per_checkpoint: ``{step: {"load": s, "compute": s, "lag": s}}``; ``lag``: from the
            announcement (the save finished) to its records logged.
        released: held copies released.
        finished: whether the training's finished line was read.
        interrupted: stopped by ``KeyboardInterrupt`` (Ctrl-C).
        seconds: wall time.
        journal: the journal folder.
        sink_failures: sinks still failing at the end (their records stay in the journal).
        bad_lines: lines of ``watch.jsonl`` skipped (torn, of another shape, or naming a
            path outside the run or journal folder).
        died: with ``until_done``, the training process that ended without its finished line
            (it ran on this host; its pid is gone), or ``""``.
    """

    run: str = ""
    measured: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seeded: list[int] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    errors: list[tuple[str, int, str]] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    per_checkpoint: dict[int, dict[str, float]] = field(default_factory=dict)
    released: int = 0
    finished: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    journal: str = ""
    sink_failures: list[str] = field(default_factory=list)
    bad_lines: int = 0
    died: str = ""

    @property
    def ok(self) -> bool:
        """Whether everything went well.

        True when every checkpoint and metric succeeded, every sink took its records and the
        training did not end without its finished line.
        """
        return not self.errors and not self.sink_failures and not self.died

    def describe(self) -> str:
        """A few human lines: counts, errors with reasons, where the journal is."""
        state = (
            "training finished" if self.finished
            else f"training died: {self.died}" if self.died
            else "interrupted" if self.interrupted
            else "training still running"
        )  # fmt: skip
        lines = [
            f"watch: run {self.run}: {len(self.measured)} checkpoint(s) measured, {len(self.skipped)} already measured, "
            f"{self.computed} record(s) computed, {self.cached} from cache, {len(self.errors)} error(s) in "
            f"{self.seconds:.1f} s ({state}); journal {self.journal}"
        ]
        lines += [f"  error at step {step} ({path}): {reason}" for path, step, reason in self.errors]
        if self.bad_lines:
            lines.append(f"  watch.jsonl: {self.bad_lines} line(s) skipped (torn, of another shape, or a path outside the run folder)")
        lines += [f"  sink {name} failed: its records stay in the journal (`uma sync` replays them)" for name in self.sink_failures]
        return "\n".join(lines)


# ---------------------------------------------------------------------- the loop
def watch(
    run_dir: str | os.PathLike[str],
    metrics: Sequence[str | Metric | Mapping[str, Any]] | None = None,
    *,
    config: UMAConfig | None = None,
    device: str | torch.device | None = None,
    poll: float = 5.0,
    until_done: bool = False,
    stale_after: float | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    wandb_run_id: str | None = None,
    model_factory: Callable[[Path, dict[str, Any]], torch.nn.Module] | None = None,
    prefetch: bool = True,
    on_checkpoint: Callable[[int, list[Record]], None] | None = None,
    **options: Any,
) -> WatchSummary:
    """Follow a training run with ``measure="async"`` and measure each checkpoint it announces.

    Args:
        run_dir: the training's output folder (``checkpoint-*/`` and the journal ``uma/``).
        metrics: metric objects, names or specs; ``None``: those the training was
            configured with (its ``run`` announcement).
        config: a whole :class:`~uma_callbacks.config.UMAConfig` instead (not with ``metrics``
            or ``**options``).
        device: where to measure (default: CUDA if available, else CPU).
        poll: seconds between two reads of the announcements.
        until_done: return once the training has finished and every announced checkpoint is
            measured; else follow until interrupted (Ctrl-C).
        stale_after: seconds after which a ``checkpoint-*`` folder with no complete-checkpoint
            line becomes an error record (``None``: unannounced folders are ignored).
        output_dir: the journal folder (default ``run_dir/uma``).
        mlflow_run_id: the MLflow run to log into (default: the announced one).
        tracking_uri: the MLflow store (default: the announced one).
        wandb_run_id: the W&B run to log into (default: the announced one).
        model_factory: ``factory(folder, config_dict) -> nn.Module`` instead of building from
            ``config.json`` with transformers.
        prefetch: read the next checkpoint on a background thread while one is measured.
        on_checkpoint: called with ``(step, records)`` after each checkpoint (progress).
        **options: :class:`UMAConfig` fields (``trackers``, ``timeout_seconds``,
            ``memory_budget``, ``draw_figures``, ``use_cache``, ...).

    Returns:
        A :class:`WatchSummary`.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: no training to watch (no announcement of a run), a bad setting (naming
            it), or no usable probe in the journal.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"watch: run folder {run_dir} does not exist")
    _check_seconds("poll", poll, allow_none=False)
    _check_seconds("stale_after", stale_after, allow_none=True)
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"watch: unknown argument(s) {unknown}; UMAConfig fields are {sorted(_CONFIG_FIELDS)}")
    root = Path(output_dir) if output_dir is not None else run_dir / "uma"
    announced = read_announcements(root, run_dir)
    if announced.run is None:
        why = f"{root} holds no journal" if not root.is_dir() else f"{root / 'watch.jsonl'} announces no run"
        raise ValueError(_NO_RUN.format(where=run_dir, why=why))
    run = announced.run.run
    cfg = _config(config, metrics, announced.run.metrics, options)
    session = Session(cfg, root, source="watch")
    session.start(
        None,
        probe_options={"saved_roots": [root], "field": "watch probe"},
        known_probes=[session.journal] if session.journal is not None else [],
        save=False,
        run=run,
        sinks_later=True,
    )
    joined = _add_sinks(session, announced.run.trackers, mlflow_run_id, tracking_uri, wandb_run_id)
    target = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    watcher = _Watcher(session, run_dir, ModelLoader(model_factory, target), stale_after, prefetch, on_checkpoint)
    watcher.summary.journal = str(root)
    try:
        while True:
            announced = read_announcements(root, run_dir)
            if announced.run is not None and announced.run.run != run:
                logger.warning(
                    "uma: %s now announces another training run (%s); this watcher measured run %s and stops",
                    root, announced.run.run, run,
                )  # fmt: skip
                break
            if announced.run is not None and session.config.trackers is None:  # a tracker run announced since
                joined += _add_sinks(session, announced.run.trackers, mlflow_run_id, tracking_uri, wandb_run_id, joined, late=True)
            worked = watcher.step(announced)
            watcher.summary.finished = announced.finished is not None
            watcher.summary.bad_lines = announced.bad_lines
            if until_done and announced.finished is not None and not watcher.pending(announced):
                watcher.release_all(announced)
                break
            if until_done and announced.finished is None and _training_died(announced) and not watcher.pending(announced):
                again = read_announcements(root, run_dir)  # a finished line written just before it exited
                if again.finished is None and not watcher.pending(again):
                    watcher.training_died(again)
                    break
                continue
            if not worked:
                time.sleep(poll)
    except KeyboardInterrupt:
        watcher.summary.interrupted = True
        logger.warning("uma: watch interrupted; a restart resumes where it stopped")
    finally:
        session.finish()
    summary = watcher.summary
    summary.sink_failures = sorted(session.delivery.failing)
    summary.seconds = time.perf_counter() - started
    return summary


class _Watcher:
    """The watcher's state across polls: what was measured, the held copies, the stale folders."""

    def __init__(
        self,
        session: Session,
        run_dir: Path,
        loader: ModelLoader,
        stale_after: float | None,
        prefetch: bool,
        on_checkpoint: Callable[[int, list[Record]], None] | None,
    ) -> None:
        assert session.journal is not None
        self.session, self.journal, self.run_dir = session, session.journal, run_dir
        self.loader, self.stale_after, self.prefetch, self.on_checkpoint = loader, stale_after, prefetch, on_checkpoint
        self.names = set(session.config.metric_names)
        self.reads_optimizer = any(m.needs_optimizer for m in session.config.metric_objects)
        self.summary = WatchSummary(run=session.run)
        self.handled: set[int] = set()  # steps this process measured or reported (a cache hit is not journalled as the run's)
        self.seeded = False
        self.skipped_seen: set[int] = set()

    # ------------------------------------------------------------------ journal state
    def _done(self) -> tuple[dict[int, set[str]], set[str]]:
        """``({step: metrics the run holds finished records of}, stale folders reported)``."""
        done: dict[int, set[str]] = {}
        stale: set[str] = set()
        for r in self.journal.records():
            if r.run != self.session.run or r.status in UNFINISHED:
                continue
            if r.metric == CHECKPOINT_ERROR and (r.meta or {}).get("stale"):
                stale.add(r.checkpoint)
                continue
            done.setdefault(int(r.step), set()).add(r.metric)
        return done, stale

    def _complete(self, step: int, done: Mapping[int, set[str]]) -> bool:
        got = done.get(step, set())
        return step in self.handled or CHECKPOINT_ERROR in got or self.names <= got

    def pending(self, announced: Announcements) -> list[CheckpointAnnouncement]:
        """The announced checkpoints not measured yet, oldest first."""
        done, _ = self._done()
        return [announced.checkpoints[s] for s in sorted(announced.checkpoints) if not self._complete(s, done)]

    # ------------------------------------------------------------------ one poll
    def step(self, announced: Announcements) -> bool:
        """Measure what ``announced`` holds that is not measured yet; report stale folders.

        Returns:
            Whether anything was measured or reported.
        """
        done, stale = self._done()
        worked = self._report_stale(announced, stale)
        todo = []
        for s in sorted(announced.checkpoints):
            if self._complete(s, done):
                if s not in self.handled and s not in self.skipped_seen:
                    self.skipped_seen.add(s)
                    self.summary.skipped.append(s)
                continue
            todo.append(announced.checkpoints[s])
        if not todo:
            return worked
        if not self.seeded:  # a restart: the history the pair metrics compare with, without measuring
            self._seed(announced, done, todo[0].step)
        usable: list[tuple[CheckpointAnnouncement, Checkpoint]] = []
        for ann in todo:
            source = _source(ann)
            if source is None:
                why = (
                    f"the training could not hold it: {ann.unheld}" if ann.unheld
                    else "save_total_limit rotation, or the held copy was removed"
                )  # fmt: skip
                err = FileNotFoundError(
                    f"checkpoint {ann.folder} (step {ann.step}) is gone before it was measured: its folder was deleted "
                    f"and no held copy of it exists ({why})"
                )
                self._finish_step(ann, [self.session.record_error(ann.step, CHECKPOINT_ERROR, err, {"path": str(ann.folder)})])
                continue
            usable.append((ann, Checkpoint(source, ann.step, "trainer")))
        budget = as_budget(self.session.config.memory_budget)
        by_step = {c.step: a for a, c in usable}
        for loaded, _waited in prefetched([c for _, c in usable], self.prefetch, budget):
            ann = by_step[loaded.checkpoint.step]
            t0 = time.perf_counter()
            try:
                model = self.loader.load(loaded)
            except Exception as err:  # this checkpoint is unusable; the others go on
                logger.warning("uma: checkpoint %s (step %d) not measured: %s: %s", ann.folder, ann.step, type(err).__name__, err)
                records = [self.session.record_error(ann.step, CHECKPOINT_ERROR, err, {"path": str(ann.folder)})]
            else:
                got = done.get(ann.step, set())
                only = sorted(self.names - got) if got else None  # a step cut off mid-measure: the rest of it
                history = saved_log_history(loaded.checkpoint.path)  # the held copy keeps trainer_state.json
                optimizer = self._optimizer(ann, loaded.checkpoint.path, model) if self.reads_optimizer else None
                records = self.session.measure(
                    model, ann.step, label=str(ann.folder), only=only, log_history=history, optimizer=optimizer
                )
                self.summary.measured.append(ann.step)
            compute = time.perf_counter() - t0
            self.summary.per_checkpoint[ann.step] = {
                "load": loaded.seconds, "compute": compute, "lag": max(0.0, time.time() - ann.time),
            }  # fmt: skip
            self._finish_step(ann, records)
            self._release_measured(announced)
        return True

    def _optimizer(self, ann: CheckpointAnnouncement, source: Path, model: torch.nn.Module) -> OptimizerSnapshot:
        """The optimizer state saved with ``ann``'s checkpoint, read from ``source`` (where its weights came from).

        A held copy without an optimizer file (the training held only its weights: none of
        its metrics read the optimizer) falls back to the checkpoint folder while its run
        marker names this step, checked before and after the read (a folder saved into again
        at a later step, as ``accelerator.save_state("ckpt")`` does, is not read).
        """
        files = " or ".join(OPTIMIZER_FILES)
        if source == ann.folder or any((source / name).is_file() for name in OPTIMIZER_FILES):
            return read_optimizer_state(source, model)
        if not ann.folder.is_dir():
            folder = "is gone"
        elif not any((ann.folder / name).is_file() for name in OPTIMIZER_FILES):
            folder = f"holds no {files}"
        elif not self._names_step(ann):
            folder = f"no longer holds step {ann.step} (its {RUN_FILE} names another step or run)"
        else:
            state = read_optimizer_state(ann.folder, model)
            if self._names_step(ann):
                return state
            folder = f"was saved into again while its {files} was read"
        return OptimizerSnapshot.unavailable(
            f"the held copy of {ann.folder.name} (step {ann.step}) has no {files}, and the checkpoint folder {folder}: "
            "the training holds the optimizer state only when one of its own metrics reads it (add optimizer_state "
            "to the training's metrics)", str(ann.folder),
        )  # fmt: skip

    def _names_step(self, ann: CheckpointAnnouncement) -> bool:
        """Whether ``ann``'s folder is still the checkpoint of its step (its run marker names this run and step)."""
        return read_run_marker(ann.folder, ann.step) == self.session.run

    def _finish_step(self, ann: CheckpointAnnouncement, records: list[Record]) -> None:
        self.handled.add(ann.step)
        self.summary.records.extend(records)
        for record in records:
            if record.status == "cached":
                self.summary.cached += 1
            elif record.status in ("ok", "partial"):
                self.summary.computed += 1
            elif record.status != "skipped":
                reason = (record.error or {}).get("message", record.status)
                label = "" if record.metric == CHECKPOINT_ERROR else f"{record.metric}: "
                self.summary.errors.append((str(ann.folder), ann.step, f"{label}{reason}"))
        if self.on_checkpoint is not None:
            self.on_checkpoint(ann.step, records)

    def _seed(self, announced: Announcements, done: Mapping[int, set[str]], first_todo: int) -> None:
        """Refill the history from the measured checkpoints before ``first_todo`` (held copies), once."""
        self.seeded = True
        history = self.session.history
        if not history.wanted:
            return
        earlier = [
            Checkpoint(_source(a) or a.folder, s, "trainer")
            for s, a in sorted(announced.checkpoints.items())
            if s < first_todo and CHECKPOINT_ERROR not in done.get(s, set())
        ]
        if earlier:
            self.summary.seeded = seed_history(self.session, self.loader, earlier, len(earlier))

    # ------------------------------------------------------------------ held copies
    def _kept(self) -> set[int]:
        """Steps whose held copies stay: those in the history (the last measured, the first one)."""
        history = self.session.history
        kept = {state.step for state in history.previous}
        if history.first is not None:
            kept.add(history.first.step)
        return kept

    def _release_measured(self, announced: Announcements) -> None:
        done, _ = self._done()
        kept = self._kept()
        for s, ann in announced.checkpoints.items():
            if ann.held is not None and ann.held.exists() and s not in kept and self._complete(s, done):
                release_held(self.journal.root, ann.held)
                self.summary.released += 1

    def release_all(self, announced: Announcements) -> None:
        """The training has finished and everything is measured: release every held copy."""
        for ann in announced.checkpoints.values():
            if ann.held is not None and ann.held.exists():
                release_held(self.journal.root, ann.held)
                self.summary.released += 1

    def training_died(self, announced: Announcements) -> None:
        """The training process ended without its finished line, and everything it announced is measured.

        Report it, report its unannounced checkpoint folders (with ``stale_after``), release the
        held copies.
        """
        process = announced.run.process if announced.run is not None else None
        where = f"process {process.pid} on {process.host}" if process is not None else "the training process"
        self.summary.died = f"{where} ended without writing its finished line (killed, crashed or out of memory?)"
        logger.warning("uma: %s; every checkpoint it announced is measured, and the watcher stops", self.summary.died)
        if self.stale_after is not None:
            self._report_stale(announced, set(self._done()[1]), ended="the training died without announcing it complete")
        self.release_all(announced)

    # ------------------------------------------------------------------ stale folders
    def _report_stale(self, announced: Announcements, reported: set[str], ended: str = "") -> bool:
        """An error record for each ``checkpoint-*`` folder that never got its complete-checkpoint line.

        ``ended``: why none will come, when the training ended without a finished line.
        """
        if self.stale_after is None:
            return False
        known = {a.folder for a in announced.checkpoints.values()}
        worked = False
        try:
            children = sorted(self.run_dir.iterdir())
        except OSError as err:
            logger.warning("uma: cannot list %s (%s)", self.run_dir, err)
            return False
        for child in children:
            match = _CHECKPOINT_NAME.fullmatch(child.name)
            if match is None or child.is_symlink() or not child.is_dir() or str(child) in reported:
                continue
            if child.resolve() in known:
                continue
            try:
                age = time.time() - child.stat().st_mtime
            except OSError:  # removed meanwhile
                continue
            if age < self.stale_after and announced.finished is None and not ended:
                continue
            why = (
                ended if ended
                else "the training finished without announcing it complete" if announced.finished is not None
                else f"it has gone {age:.0f} s without a complete-checkpoint line (stale_after={self.stale_after:g} s)"
            )  # fmt: skip
            stale = TimeoutError(f"checkpoint folder {child} never completed: {why}; not measured")
            step = int(match.group(1))
            record = self.session.record_error(step, CHECKPOINT_ERROR, stale, {"path": str(child), "stale": True})
            reported.add(str(child))
            self.summary.records.append(record)
            self.summary.errors.append((str(child), step, str(stale)))
            worked = True
        return worked


# ---------------------------------------------------------------------- helpers
def _training_died(announced: Announcements) -> bool:
    """The announced training ran on this host and its process has ended."""
    return announced.run is not None and announced.run.process is not None and process_gone(announced.run.process)


def _source(ann: CheckpointAnnouncement) -> Path | None:
    """Where to read a checkpoint: its held copy when there is one, else its folder while it exists."""
    if ann.held is not None and ann.held.is_dir():
        return ann.held
    if ann.folder.is_dir():
        return ann.folder
    return None


def _config(
    config: UMAConfig | None,
    metrics: Sequence[Any] | None,
    announced: Sequence[Mapping[str, Any]],
    options: dict[str, Any],
) -> UMAConfig:
    """The watcher's configuration: ``config``, else ``metrics`` (default: the announced ones) and ``options``.

    Raises:
        ValueError: ``config`` together with ``metrics`` or options, no metric at all, or a
            bad setting (naming the field).
    """
    if config is not None:
        if options or metrics is not None:
            given = sorted(options) + (["metrics"] if metrics is not None else [])
            raise ValueError(f"watch: give config= or metrics/UMAConfig options, not both; got config and {given}")
        return config
    seed = options.get("seed", UMAConfig.seed)
    specs = list(metrics) if metrics else [_announced_metric(entry, seed) for entry in announced]
    if not specs:
        raise ValueError("watch: the training announced no metrics; pass metrics (CLI: --metrics, --metric or --config)")
    return UMAConfig(metrics=specs, **options)


def _announced_metric(entry: Mapping[str, Any], seed: int) -> Metric:
    """A metric of the run line (``{"name", option: value}``) rebuilt by the one builder.

    Raises:
        ValueError: an unknown metric or option (a training of another version).
    """  # noqa: DOC502 (from build_metric)
    spec = {k: v for k, v in entry.items() if not (k == "metric" and v == entry.get("name"))}  # a config() copy's own tag
    return build_metric(spec, seed=seed, field="announced metrics")


def _add_sinks(
    session: Session,
    announced: Mapping[str, Mapping[str, str]],
    mlflow_run_id: str | None,
    tracking_uri: str | None,
    wandb_run_id: str | None,
    joined: Collection[Any] = (),
    late: bool = False,
) -> list[Any]:
    """Join the training's tracker runs (``UMAConfig.trackers``, else those announced), bounded as live sinks are.

    ``joined``: the entries joined already; a ``late`` call joins only the tracker runs
    announced since (the training's tracker was down when it started, and its run line was
    written again once it came up), and replays to them what the journal holds.

    Returns:
        The entries joined by this call (tracker names or sink objects).

    Raises:
        ValueError: an unknown tracker name.
        ModuleNotFoundError: a named tracker's package is missing.
    """  # noqa: DOC502 (from resolve_sinks and make_sink)
    if not session.is_main:
        return []
    cfg = session.config
    mlflow = dict(announced.get("mlflow") or {})
    wandb = dict(announced.get("wandb") or {})
    if cfg.trackers is not None:
        names = list(cfg.trackers)
    else:
        names = [n for n, given in (("mlflow", mlflow_run_id or tracking_uri or mlflow.get("run")),
                                    ("wandb", wandb_run_id or wandb.get("run"))) if given]  # fmt: skip
    names = [n for n in names if n not in joined]
    if not names:
        return []
    runs = {"mlflow": {"run": mlflow_run_id or mlflow.get("run", ""), "uri": tracking_uri or mlflow.get("uri", "")}}
    entries: list[Any] = []
    extra: list[Any] = []
    for entry in names:
        run_id = wandb_run_id or wandb.get("run")
        if entry == "wandb" and run_id:  # a second writer into the training's open run
            init = {"entity": wandb["entity"]} if wandb.get("entity") else None
            sink = make_sink(
                "wandb", run_id=run_id, project=wandb.get("project") or None, init_kwargs=init,
                writer_label=WRITER_LABEL, fallback_dir=session.root,
            )  # fmt: skip
            entries.append(sink)
            extra.append(sink)
        else:
            entries.append(entry)
    sinks, own = resolve_sinks(entries, runs=runs, capture=False, fallback_dir=session.root)
    sinks, own = bounded_pair(sinks, [*own, *extra], cfg.tracker_timeout_seconds)
    session.delivery.sinks += sinks
    session.delivery.own += own
    session.delivery.start(session.params({"watch.metrics": cfg.metric_names}))
    if late:  # a tracker run announced late: it gets what was measured before
        session.delivery.send_pending()
    return names


def _check_seconds(name: str, value: Any, allow_none: bool) -> None:
    """Refuse a bad number of seconds.

    Raises:
        ValueError: ``value`` is not a positive finite number (or None where allowed), naming ``name``.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        allowed = "a positive number of seconds" + (" or None" if allow_none else "")
        raise ValueError(f"watch: {name} must be {allowed}; got {value!r}")


__all__ = ["CHECKPOINT_ERROR", "WRITER_LABEL", "WatchSummary", "watch"]
