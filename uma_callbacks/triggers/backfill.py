"""Offline backfill: measure checkpoints already on disk, at their own steps, into a run.

A thin adapter from checkpoints on disk onto a :class:`~uma_callbacks.session.Session`:
discover the run's checkpoints (:mod:`uma_callbacks.checkpoints`), read the next one on a
background thread while the current one is measured, load its weights into a model built
once from ``config.json``, and ``session.measure(model, step)``. The probe is the one the
live run saved (``<journal>/probe.safetensors``, fingerprint checked), the journal is the
live run's (so its results are cache hits), and checkpoint-pair metrics (``interpolation``,
``trajectory``) get their history from the session exactly as live.

Resumable and idempotent: a rerun (also after ``kill -9``) computes only what is missing,
and a sink gets each (key, step) point once. A checkpoint that cannot be used becomes an
``error`` record (metric ``checkpoint``); the others go on.

Sharded (``shard=(K, N)``, ``uma backfill --shard K/N``: a Slurm job array, a Kubernetes
indexed job): each of N processes measures one contiguous block of the step-sorted
checkpoints into the shared journal and delivers nothing; one ``uma sync`` afterwards
delivers every shard's records (:func:`shard_block`, :func:`backfill`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.checkpoints import Checkpoint, discover_with_problems
from uma_callbacks.config import UMAConfig
from uma_callbacks.core.records import Record
from uma_callbacks.engine.budget import as_budget
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe_source import load_tokenizer
from uma_callbacks.engine.run_identity import read_run_marker
from uma_callbacks.metrics.base import Metric
from uma_callbacks.metrics.influence import saved_log_history
from uma_callbacks.metrics.trajectory import Trajectory, trajectory_scalars  # noqa: F401 (public here too)
from uma_callbacks.session import Session
from uma_callbacks.triggers.history_seed import seed_history
from uma_callbacks.triggers.optimizer_file import read_optimizer_state
from uma_callbacks.triggers.prefetch import ModelLoader, prefetched
from uma_callbacks.triggers.run_sinks import journal_runs, offline_trackers

logger = logging.getLogger(__name__)

#: Metrics that compare a checkpoint with earlier ones (they start at the second checkpoint).
PAIR_METRICS = ("interpolation", "trajectory")
_CONFIG_FIELDS = {f.name for f in fields(UMAConfig) if f.init}


# ---------------------------------------------------------------------- summary
@dataclass
class BackfillSummary:
    """What a backfill did.

    Attributes:
        checkpoints: the checkpoints measured, in step order (all found; a shard: its block).
        records: every record produced (metrics and checkpoint errors).
        errors: ``(checkpoint folder, step, reason)`` for each checkpoint that could not be used,
            and each metric that failed.
        computed: records computed now; ``cached``: records read from the journal.
        seconds: wall time; ``load_seconds`` / ``compute_seconds``: summed per phase
            (loading overlaps computing, so their sum exceeds ``seconds``).
        per_checkpoint: ``{step: {"load": s, "compute": s, "wait": s}}``; a sharded (DCP)
            checkpoint adds ``"shards"`` (data files gathered) and ``"gathered_bytes"``.
        journal: the journal folder.
        shard: ``(K, N)`` when this process was shard K of N, else ``None``.
        total_checkpoints: the checkpoints found in the whole run (a shard measures its block).
        seeded: steps loaded into the checkpoint history only (a shard's predecessors).
        sync_command: for a shard, the ``uma sync`` command that delivers every shard's
            records once all have finished (a shard delivers nothing itself).
    """

    checkpoints: list[Checkpoint] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    errors: list[tuple[str, int, str]] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    per_checkpoint: dict[int, dict[str, float]] = field(default_factory=dict)
    journal: str = ""
    skipped: int = 0
    sink_failures: list[str] = field(default_factory=list)
    shard: tuple[int, int] | None = None
    total_checkpoints: int = 0
    seeded: list[int] = field(default_factory=list)
    sync_command: str = ""

    @property
    def ok(self) -> bool:
        """True when every checkpoint and metric succeeded and every sink took its records."""
        return not self.errors and not self.sink_failures

    def describe(self) -> str:
        """A few human lines: counts, errors with reasons, where the journal is."""
        lines = [
            f"backfill: {len(self.checkpoints)} checkpoint(s), {self.computed} record(s) computed, "
            f"{self.cached} from cache, {self.skipped} skipped, {len(self.errors)} error(s) in {self.seconds:.1f} s "
            f"(load {self.load_seconds:.1f} s, compute {self.compute_seconds:.1f} s); journal {self.journal}"
        ]
        lines += [
            f"  error at step {step} ({path}): {reason}" if step >= 0 else f"  error in {path}: {reason}"
            for path, step, reason in self.errors
        ]
        lines += [f"  sink {name} failed: its records stay in the journal (`uma sync` replays them)" for name in self.sink_failures]
        if self.shard is not None:
            lines.append(self._describe_shard())
        return "\n".join(lines)

    def _describe_shard(self) -> str:
        k, n = self.shard or (0, 1)
        if not self.checkpoints:
            return (
                f"shard {k}/{n}: no checkpoint to measure ({self.total_checkpoints} checkpoint(s) for {n} shards); "
                "nothing to do"
            )
        steps = f"steps {self.checkpoints[0].step}..{self.checkpoints[-1].step}"
        seeded = f"; history seeded with step(s) {self.seeded} (not measured)" if self.seeded else ""
        return (
            f"shard {k}/{n}: {len(self.checkpoints)} of {self.total_checkpoints} checkpoint(s), {steps}{seeded}\n"
            "shard: nothing delivered to trackers (concurrent shards would race on the tracker run); "
            f"once every shard has finished, `{self.sync_command}` delivers all their records"
        )


# ---------------------------------------------------------------------- the loop
def backfill(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    metrics: Sequence[str | Metric] = ("gradient_flow",),
    probe: Any = None,
    *,
    config: UMAConfig | None = None,
    steps: Mapping[str, int] | None = None,
    texts: Sequence[str] | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    wandb_run_id: str | None = None,
    model_factory: Callable[[Path, dict[str, Any]], torch.nn.Module] | None = None,
    trajectory: bool = True,
    check_probe: bool = True,
    device: str | torch.device | None = None,
    prefetch: bool = True,
    progress: bool = True,
    source_name: str = "backfill",
    shard: tuple[int, int] | None = None,
    **options: Any,
) -> BackfillSummary:
    """Measure every checkpoint of a run and log the results at each checkpoint's step.

    Args:
        source: a run folder (``checkpoint-*/``, Accelerate state folders) or a list of
            checkpoint / HF model folders (see :func:`~uma_callbacks.checkpoints.discover_checkpoints`).
        metrics: metric objects or names (``"fisher"``, ``"landscape"``, ``"interpolation"``, ...).
        probe: a :class:`Probe`, a list of batches, a map-style dataset, or None: the probe
            the run saved (``<journal>/probe.safetensors``), else one built from ``texts``.
        config: a whole :class:`~uma_callbacks.config.UMAConfig` (else built from
            ``metrics`` and ``**options``).
        steps: ``{folder name or path: step}`` for folders whose step is not on disk.
        texts: raw texts for the probe (when no probe is given or saved), tokenised with
            ``tokenizer``.
        tokenizer: the tokenizer for ``texts``: an object or a local folder; by default the
            one saved with the checkpoints.
        max_length: tokens per text.
        mlflow_run_id: the MLflow run to log into (default: the run this journal last
            delivered to).
        tracking_uri: the MLflow store to log into (default: that delivery's, else
            ``MLFLOW_TRACKING_URI``, else a local ``mlflow.db``).
        wandb_run_id: the W&B run to log into (resumed).
        model_factory: ``factory(folder, config_dict) -> nn.Module`` instead of building
            from ``config.json`` with transformers.
        trajectory: add the ``trajectory`` metric when there are several checkpoints.
        check_probe: refuse a probe whose fingerprint the journal's records do not carry.
        device: where to measure (default: CUDA if available, else CPU).
        prefetch: read the next checkpoint on a background thread.
        progress: show a tqdm bar with ETA, and a line per metric start and end (stderr).
        source_name: written into each record's ``source``.
        shard: ``(K, N)``: measure only block K of N contiguous blocks of the step-sorted
            checkpoints (:func:`shard_block`), journal only (no tracker delivery: run
            ``uma sync`` once every shard has finished). The configuration, the automatic
            ``trajectory`` included, is the one the whole run's backfill uses; pair metrics
            get the checkpoints before the block as history (:func:`seed_history`); the
            journal's claims keep two shards given overlapping work (a shard run twice at
            once) from computing one result twice (claims need the cache: with
            ``use_cache=False`` run each shard once). Blocks are contiguous because then only a block's first
            checkpoints need their predecessors loaded (``depth`` of them, and the run's
            first when a metric needs it): N interleaved shares would load every
            predecessor of every checkpoint a second time.
        **options: any :class:`UMAConfig` field (``probe_size``, ``seed``, ``trackers``,
            ``output_dir``, ``use_cache``, ``draw_figures``, ``loss_fn``, ``chunk_sizes``,
            ``memory_budget``, ``timeout_seconds``, ...); the time limit and the memory
            budget apply as live.

    Returns:
        A :class:`BackfillSummary`.

    Raises:
        FileNotFoundError: the run folder does not exist.
        ValueError: no checkpoints, bad configuration, no usable probe, a probe whose
            fingerprint differs from the journal's, or a ``shard`` that is not ``(K, N)``
            with ``0 <= K < N``.
    """  # noqa: DOC502 (FileNotFoundError: from discover_with_problems)
    started = time.perf_counter()
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"backfill: unknown argument(s) {unknown}; UMAConfig fields are {sorted(_CONFIG_FIELDS)}")
    shard = check_shard(shard)
    checkpoints, problems = discover_with_problems(source, steps)
    checkpoints, duplicates = _one_folder_per_step(checkpoints)
    pair = trajectory and len(checkpoints) > 1  # the whole run's: every shard measures with one config
    cfg = _config(config, metrics, pair, [mlflow_run_id, tracking_uri, wandb_run_id], options)
    run_dir = Path(source) if isinstance(source, (str, os.PathLike)) else checkpoints[0].path.parent
    root = Path(cfg.output_dir) if cfg.output_dir is not None else run_dir / "uma"
    start, stop = shard_block(len(checkpoints), shard) if shard is not None else (0, len(checkpoints))
    summary = BackfillSummary(checkpoints=checkpoints[start:stop], journal=str(root), shard=shard)
    summary.total_checkpoints = len(checkpoints)
    if shard is not None:
        summary.sync_command = _sync_command(run_dir, cfg.trackers, mlflow_run_id, tracking_uri, wandb_run_id)
        if start == stop and not (shard[0] == 0 and (problems or duplicates)):  # more shards than checkpoints
            summary.seconds = time.perf_counter() - started
            return summary
        cfg = dataclasses.replace(cfg, metrics=list(cfg.metric_objects), trackers=[])  # journal only
        problems, duplicates = (problems, duplicates) if shard[0] == 0 else ([], [])  # recorded once, by shard 0
    session = Session(cfg, root, source=source_name)
    shared_run = _shard_run(root) if shard is not None else None  # one run for all shards: one `uma sync`
    assert session.journal is not None
    tok = load_tokenizer(tokenizer, [c.path for c in checkpoints]) if texts and not probe else None
    known = [session.journal] + ([Journal(run_dir / "uma")] if (run_dir / "uma").is_dir() else [])
    placeholder = _data_free_probe(cfg, probe, texts, [root, run_dir / "uma"])
    session.start(
        placeholder or probe,
        tracker_runs=journal_runs(session.journal, run_dir, mlflow_run_id, tracking_uri, wandb_run_id),
        probe_options={"saved_roots": [root, run_dir / "uma"], "texts": texts, "tokenizer": tok, "max_length": max_length},
        known_probes=known if check_probe and placeholder is None else (),
        save=placeholder is None and not (root / "probe.safetensors").exists(),
        params={"backfill.metrics": cfg.metric_names},
        run=shared_run,
    )
    for path, reason in problems + duplicates:  # unusable folders: error records, the rest goes on
        ckpt = Checkpoint(Path(path), -1, "problem")
        _tally(summary, ckpt, [session.record_error(-1, "checkpoint", ValueError(reason), {"path": str(path)})])
    target = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = ModelLoader(model_factory, target)
    summary.seeded = seed_history(session, loader, checkpoints, start)
    bar = _progress(stop - start, progress)
    reads_optimizer = any(m.needs_optimizer for m in cfg.metric_objects)
    if progress:
        session.suite.progress = _metric_lines(bar)
    for loaded, waited in prefetched(checkpoints[start:stop], prefetch, as_budget(cfg.memory_budget)):
        ckpt = loaded.checkpoint
        if shared_run is not None:  # a shard's records belong to the training run that made the checkpoint
            run = read_run_marker(ckpt.path, ckpt.step) or shared_run
            if run != session.run:
                session.continue_run(run)
        t0 = time.perf_counter()
        try:
            model = loader.load(loaded)
        except Exception as err:  # this checkpoint is unusable; the others go on
            logger.warning("uma: checkpoint %s (step %d) skipped: %s: %s", ckpt.path, ckpt.step, type(err).__name__, err)
            records = [session.record_error(ckpt.step, "checkpoint", err, {"path": str(ckpt.path)})]
        else:  # the checkpoint's optimizer.pt / optimizer.bin, read only for a metric that needs it
            optimizer = read_optimizer_state(ckpt.path, model) if reads_optimizer else None
            records = session.measure(
                model, ckpt.step, label=str(ckpt.path), optimizer=optimizer, log_history=saved_log_history(ckpt.path)
            )
        compute = time.perf_counter() - t0
        summary.load_seconds += loaded.seconds
        summary.compute_seconds += compute
        summary.per_checkpoint[ckpt.step] = {"load": loaded.seconds, "compute": compute, "wait": waited}
        if loaded.meta.get("format") == "dcp":  # a sharded checkpoint, gathered within the budget
            summary.per_checkpoint[ckpt.step].update(shards=loaded.meta["shards"], gathered_bytes=loaded.meta["gathered_bytes"])
            logger.info("uma: checkpoint %s gathered from %d shard file(s), %d bytes", ckpt.path, loaded.meta["shards"], loaded.meta["gathered_bytes"])
        _tally(summary, ckpt, records)
        if bar is not None:
            bar.set_postfix_str(f"step {ckpt.step}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    session.finish()
    summary.sink_failures = sorted(session.delivery.failing)
    summary.seconds = time.perf_counter() - started
    return summary


def _data_free_probe(cfg: UMAConfig, probe: Any, texts: Any, roots: Sequence[Path]) -> Any:
    """A one-token placeholder probe when no probe is given or saved and no metric reads one, else ``None``.

    A metric reads no probe when it says so (``needs_probe = False``: weights only, like
    ``weight_spectra``) or is ``trajectory``. The placeholder (label -100: no loss is ever
    taken on it) is neither saved nor checked against the journal's probe.
    """
    from uma_callbacks.engine.probe import Probe

    if probe is not None or texts or any((r / "probe.safetensors").exists() for r in roots):
        return None
    if not all(getattr(m, "needs_probe", True) is False or isinstance(m, Trajectory) for m in cfg.metric_objects):
        return None
    return Probe([{"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.full((1, 1), -100)}], name="none")


# ---------------------------------------------------------------------- shards
def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (the ``--shard`` option) as ``(K, N)``.

    Args:
        text: ``K/N`` with integers ``0 <= K < N`` (Slurm: ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``;
            Kubernetes: ``$JOB_COMPLETION_INDEX/<completions>``).

    Returns:
        ``(K, N)``.

    Raises:
        ValueError: ``text`` is not of the form ``K/N`` with ``0 <= K < N``.
    """
    match = re.fullmatch(r"(\d{1,9})/(\d{1,9})", str(text).strip())
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard must be K/N with integers 0 <= K < N (e.g. --shard 0/4); got {text!r:.40}")
    return int(match[1]), int(match[2])


def check_shard(shard: Any) -> tuple[int, int] | None:
    """``shard`` as ``(K, N)``, or ``None`` for no sharding.

    Raises:
        ValueError: not a pair of integers ``(K, N)`` with ``0 <= K < N`` (naming ``shard``
            and the ``--shard K/N`` form).
    """
    if shard is None:
        return None
    ok = (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise ValueError(f"backfill: shard must be (K, N) with integers 0 <= K < N (--shard K/N); got {shard!r:.40}")
    return int(shard[0]), int(shard[1])


def shard_block(count: int, shard: tuple[int, int]) -> tuple[int, int]:
    """``(start, stop)``: the indices of shard K's contiguous block among ``count`` checkpoints.

    The blocks are as even as can be (their sizes differ by one at most, the larger ones
    first), cover every checkpoint once, and keep step order; with more shards than
    checkpoints the last shards are empty.

    Example:
        >>> [shard_block(5, (k, 2)) for k in range(2)]
        [(0, 3), (3, 5)]
        >>> [shard_block(2, (k, 3)) for k in range(3)]
        [(0, 1), (1, 2), (2, 2)]
    """
    k, n = shard
    size, extra = divmod(count, n)
    start = k * size + min(k, extra)
    return start, start + size + (1 if k < extra else 0)


def _shard_run(root: Path) -> str:
    """The run id every shard of this journal stamps a checkpoint's records with when no marker names one.

    One id for all shards (derived from the journal folder), so ``uma sync`` replays them as
    one run; a checkpoint whose run marker names the training run that made it uses that.
    """
    return hashlib.sha256(f"uma-backfill-shards|{root.resolve()}".encode()).hexdigest()[:32]


def _sync_command(
    run_dir: Path, trackers: Sequence[Any] | None, mlflow_run_id: str | None, tracking_uri: str | None, wandb_run_id: str | None
) -> str:
    """The ``uma sync`` command line that delivers a sharded backfill's records to the trackers asked for."""
    words = ["uma", "sync", str(run_dir)]
    names = [t for t in (trackers or []) if isinstance(t, str)]
    if names:
        words += ["--trackers", ",".join(names)]
    for flag, value in (("--mlflow-run", mlflow_run_id), ("--tracking-uri", tracking_uri), ("--wandb-run", wandb_run_id)):
        if value:
            words += [flag, value]
    command = " ".join(shlex.quote(w) for w in words)
    return command if len(words) > 3 else f"{command} --trackers mlflow (or --mlflow-run/--tracking-uri, --wandb-run)"


def _config(
    config: UMAConfig | None, metrics: Sequence[str | Metric], pair: bool, run_ids: list[str | None], options: dict[str, Any]
) -> UMAConfig:
    """The backfill's configuration, built once: ``config``, or one from ``metrics`` and ``options``.

    It has ``trajectory`` when ``pair`` (several checkpoints) and the trackers the run ids name
    (:func:`~uma_callbacks.triggers.run_sinks.offline_trackers`). A given ``config`` is never
    changed: a copy is made when it lacks one of those.

    Raises:
        ValueError: ``config`` and more options at once, or a bad setting (naming the field).
    """
    if config is not None:
        if options:
            raise ValueError(f"backfill: give config= or UMAConfig options, not both; got config and {sorted(options)}")
        trackers = offline_trackers(config.trackers, *run_ids)
        extra = [Trajectory()] if pair and "trajectory" not in config.metric_names else []
        if not extra and trackers == list(config.trackers or []):
            return config
        return dataclasses.replace(config, metrics=[*config.metric_objects, *extra], trackers=trackers)
    specs = list(metrics)
    if pair and not any(_names_trajectory(spec) for spec in specs):
        specs.append(Trajectory())
    return UMAConfig(metrics=specs, trackers=offline_trackers(options.pop("trackers", None), *run_ids), **options)


def _names_trajectory(spec: Any) -> bool:
    """Whether a metric spec (object, ``name[:options]`` text or mapping) is the trajectory metric."""
    if isinstance(spec, Metric):
        return spec.name == "trajectory"
    if isinstance(spec, Mapping):
        return spec.get("name") == "trajectory"
    return isinstance(spec, str) and spec.partition(":")[0].strip() == "trajectory"


def _one_folder_per_step(checkpoints: list[Checkpoint]) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """One folder per step, and a problem naming both folders for every other folder claiming it.

    Of the folders claiming one step, the one whose name agrees with it measures it
    (:attr:`~uma_callbacks.checkpoints.Checkpoint.name_rank`: ``checkpoint-4`` over a
    ``checkpoint-10`` whose state file says step 4), then the first by path.
    """
    by_step: dict[int, list[Checkpoint]] = {}
    for ckpt in checkpoints:
        by_step.setdefault(ckpt.step, []).append(ckpt)
    kept: list[Checkpoint] = []
    duplicates: list[tuple[Path, str]] = []
    for step in sorted(by_step):
        claimants = sorted(by_step[step], key=lambda c: (c.name_rank, str(c.path)))
        winner = claimants[0]
        kept.append(winner)
        why = "whose name matches the step" if winner.name_rank < 2 else "first by path; neither name matches the step"
        for other in claimants[1:]:
            reason = f"{other.path} claims step {step}, as {winner.path} does ({why}); measured {winner.name} only"
            duplicates.append((other.path, reason))
    return kept, duplicates


def _tally(summary: BackfillSummary, ckpt: Checkpoint, records: list[Record]) -> None:
    summary.records.extend(records)
    for record in records:
        if record.status == "cached":
            summary.cached += 1
        elif record.status in ("ok", "partial"):  # partial: values kept, flagged
            summary.computed += 1
        elif record.status == "skipped":
            summary.skipped += 1
        else:
            reason = (record.error or {}).get("message", record.status)
            label = "" if record.metric == "checkpoint" else f"{record.metric}: "
            summary.errors.append((str(ckpt.path), ckpt.step, f"{label}{reason}"))


def _metric_lines(bar: Any) -> Callable[[str, str, int, Record | None], None]:
    """One line per metric start and end, as the live session's progress: ``uma: step N: fisher ok in 1.23 s``.

    On stderr, the bar's stream, above the per-checkpoint bar (``tqdm.write``) when there is one.
    """
    started = [time.perf_counter()]

    def line(event: str, metric: str, step: int, record: Record | None) -> None:
        if event == "start":
            started[0] = time.perf_counter()
            text = f"uma: step {step}: {metric} started"
        else:
            status = record.status if record is not None else "?"
            text = f"uma: step {step}: {metric} {status} in {time.perf_counter() - started[0]:.2f} s"
        if bar is not None:
            bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    return line


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="uma backfill", unit="ckpt")


__all__ = [
    "PAIR_METRICS",
    "BackfillSummary",
    "Trajectory",
    "backfill",
    "check_shard",
    "parse_shard",
    "shard_block",
    "trajectory_scalars",
]
