"""Backfill fanned out on Ray: workers compute, the driver journals and delivers once.

``ray_backfill`` measures the same checkpoints, with the same configuration, as
:func:`~uma_callbacks.triggers.backfill.backfill` (same discovery, same metric objects and
seeds, ``trajectory`` added the same way, the same probe), but runs the work as Ray tasks:

- **one task per checkpoint** for the cheap metrics, and **one task per checkpoint x
  metric** for each expensive one. A metric is expensive when its declared time cost
  (:meth:`Metric.time_cost <uma_callbacks.metrics.base.Metric.time_cost>`), priced in
  nominal units (a backward over the probe = 1, a forward = 1/3, a Hessian-vector
  product = :data:`~uma_callbacks.engine.time_budget.HVP_OVER_BACKWARD`), exceeds
  :data:`EXPENSIVE_BACKWARDS` backward passes: then loading the checkpoint once more costs
  little beside it (by default ``hessian`` and ``landscape``; ``gradient_flow``, ``fisher``,
  ``interpolation`` and ``trajectory`` share their checkpoint's task). Under a compute
  budget (``seconds_per_save``) nothing is split: the budget is shared among a save's
  metrics, and splitting them would change each one's share. A metric that reads another
  one's results of the same save (:meth:`Metric.results_needed
  <uma_callbacks.metrics.base.Metric.results_needed>`: ``sharpness``'s Fisher direction,
  ``optimizer_state``'s Spearman correlation with the Fisher diagonal) shares a task with
  that metric, as it must: the results are handed over in memory, within one save.
- A **worker** gets the checkpoint, its step, the metrics of its task (the driver's metric
  objects, so configs and seeds are the driver's), the probe as its saved files' bytes, the
  journal's measured records of those metrics (so a result already journalled is a cache
  hit, as in process) and the earlier checkpoints its pair metrics compare with. It builds
  a :class:`~uma_callbacks.session.Session` whose journal is a temporary folder, with no
  trackers; loads the earlier checkpoints into ``session.history`` without measuring them
  (:func:`~uma_callbacks.triggers.history_seed.seed_history`: the first one when a metric
  ``needs_first``, the last ``history_needed`` ones), measures its checkpoint (with the
  checkpoint's ``optimizer.pt``/``optimizer.bin`` when a metric of the task reads the
  optimizer, read as the one-process backfill reads it), and returns the records with
  their result files as bytes.
- The **driver** writes each record's files into the run's journal under the same relative
  paths the in-process backfill would use (``step-<N>/<metric>.json``, or the variant folder
  the suite picks when another configuration or run holds that name), appends the record
  (stamped with the driver's run id), and delivers it through its own session's
  :class:`~uma_callbacks.engine.delivery.Delivery`: once per record. A record whose cache
  key the journal already holds (a concurrent backfill, or two identical checkpoints) is
  delivered as a cache hit, not journalled twice.
- A task lost with its worker (the process killed, the node gone) is retried by Ray
  (``max_retries``); its result is counted once, when it arrives. A task that still fails
  becomes an ``error`` record per metric it held; the others go on.

Ray is an optional extra (``pip install "uma-callbacks[ray]"``), imported only when a Ray
backfill starts. Checkpoint paths must be readable from the workers (a shared filesystem);
the probe and the results travel through Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.checkpoints import Checkpoint, architecture_of, discover_with_problems, read_config
from uma_callbacks.config import UMAConfig
from uma_callbacks.core.records import MEASURED, Record
from uma_callbacks.core.safe_write import open_folder, put_file
from uma_callbacks.engine.budget import as_budget
from uma_callbacks.engine.journal import Journal, safe_name
from uma_callbacks.engine.probe import PROBE_META, PROBE_TENSORS, Probe, load_probe, save_probe
from uma_callbacks.engine.probe_source import load_tokenizer
from uma_callbacks.engine.suite import _files_of_another_run, _variant_folder  # the suite's file-placement rules
from uma_callbacks.engine.time_budget import HVP_OVER_BACKWARD
from uma_callbacks.metrics.base import Metric, MetricResult
from uma_callbacks.metrics.influence import saved_log_history
from uma_callbacks.metrics.time_cost import UnitCosts
from uma_callbacks.session import Session
from uma_callbacks.triggers.backfill import (  # one discovery and one configuration for both executors
    _CONFIG_FIELDS,
    BackfillSummary,
    _config,
    _one_folder_per_step,
    _progress,
    _tally,
)
from uma_callbacks.triggers.history_seed import seed_history
from uma_callbacks.triggers.optimizer_file import read_optimizer_state
from uma_callbacks.triggers.prefetch import ModelLoader, read_checkpoint
from uma_callbacks.triggers.run_sinks import journal_runs

logger = logging.getLogger(__name__)

#: A metric predicted to take more than this many backward passes over the probe gets a
#: task of its own per checkpoint (see the module docstring).
EXPENSIVE_BACKWARDS = 8.0
#: What to install for ``--executor ray``.
RAY_EXTRA = 'pip install "uma-callbacks[ray]"'
#: Executors of ``uma backfill``.
EXECUTORS = ("local", "ray")
#: The most task attempts Ray makes after the first (a worker lost with its process or node).
MAX_RETRIES = 3


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ModuleNotFoundError: Ray is not installed (the message names the extra to install).
    """
    try:
        import ray
    except ImportError as err:
        raise ModuleNotFoundError(f"the Ray executor needs Ray: {RAY_EXTRA}") from err
    return ray


def ray_missing() -> str | None:
    """Why the Ray executor cannot run here (the extra to install), or None when Ray imports."""
    try:
        import_ray()
    except ModuleNotFoundError as err:
        return str(err)
    return None


def check_task_resources(cpus_per_task: Any, gpus_per_task: Any, max_retries: Any = MAX_RETRIES) -> None:
    """Refuse task resources Ray cannot schedule.

    Raises:
        ValueError: ``cpus_per_task`` or ``gpus_per_task`` not a finite number >= 0, or
            ``max_retries`` not an integer >= 0 (naming the field).
    """
    for name, value in (("cpus_per_task", cpus_per_task), ("gpus_per_task", gpus_per_task)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"ray backfill: {name} must be a number >= 0; got {value!r:.40}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"ray backfill: max_retries must be an integer >= 0; got {max_retries!r:.40}")


# ---------------------------------------------------------------------- the plan
def nominal_units(n_batches: int) -> UnitCosts:
    """Unit costs in backward passes over the probe: backward 1, forward 1/3, HVP :data:`HVP_OVER_BACKWARD`."""
    return UnitCosts(forward=1.0 / 3.0, backward=1.0, hvp=HVP_OVER_BACKWARD, n_batches=max(1, int(n_batches)))


def is_expensive(metric: Metric, n_batches: int, threshold: float = EXPENSIVE_BACKWARDS) -> bool:
    """Whether ``metric`` gets a task of its own per checkpoint: its time cost exceeds ``threshold`` backwards.

    A metric whose time cost cannot be computed is counted cheap (it shares its checkpoint's task).
    """
    try:
        return float(metric.time_cost(nominal_units(n_batches))) > threshold
    except Exception as err:  # noqa: BLE001 (a registered metric's own cost model: never worth a failed backfill)
        logger.warning("uma: %s's time cost is unknown (%s: %s); it shares its checkpoint's task", metric.name, type(err).__name__, err)
        return False


@dataclass(frozen=True)
class Task:
    """One Ray task: the metrics ``metrics`` (by name) at checkpoint ``index`` of the run."""

    index: int
    metrics: tuple[str, ...]


def plan_tasks(
    n_checkpoints: int, config: UMAConfig, n_batches: int, threshold: float = EXPENSIVE_BACKWARDS
) -> list[Task]:
    """The tasks of a Ray backfill, checkpoint by checkpoint: the cheap metrics together, each expensive one alone.

    Nothing is split under a compute budget (``seconds_per_save``): the budget is shared
    among a save's metrics.
    """
    names = config.metric_names
    if config.seconds_per_save is not None:
        groups = [tuple(names)]
    else:
        expensive = [m.name for m in config.metric_objects if is_expensive(m, n_batches, threshold)]
        cheap = tuple(n for n in names if n not in expensive)
        groups = _handing_together(config.metric_objects, ([cheap] if cheap else []) + [(n,) for n in expensive])
    return [Task(i, group) for i in range(n_checkpoints) for group in groups]


def _handing_together(metrics: Sequence[Metric], groups: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """``groups`` with the groups of a metric and the metrics whose results it reads merged (in configured order).

    A metric reads another's results of the same save in memory (``results_needed``), so
    both must be measured in one task.
    """
    names = [m.name for m in metrics]
    merged = [set(g) for g in groups]
    for metric in metrics:
        for provider in metric.results_needed():
            if provider not in names or provider == metric.name:
                continue
            a = next(i for i, g in enumerate(merged) if metric.name in g)
            b = next(i for i, g in enumerate(merged) if provider in g)
            if a != b:
                merged[min(a, b)] |= merged[max(a, b)]
                del merged[max(a, b)]
    return [tuple(n for n in names if n in g) for g in merged]


# ---------------------------------------------------------------------- summary
@dataclass
class RayBackfillSummary(BackfillSummary):
    """What a Ray backfill did: :class:`BackfillSummary`, and how the work went.

    Attributes:
        tasks: tasks submitted.
        failed_tasks: tasks that failed after Ray's retries (their metrics are error records).
        ray_start_seconds: seconds spent starting or joining Ray (0 when already running).
        task_seconds: each task's seconds in its worker, in completion order.
        workers: the worker process ids that returned results.
        split: the metrics that had a task of their own per checkpoint.
    """

    tasks: int = 0
    failed_tasks: int = 0
    ray_start_seconds: float = 0.0
    task_seconds: list[float] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)
    split: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """:meth:`BackfillSummary.describe`, and a line on the Ray tasks."""
        split = f"; own task per checkpoint: {', '.join(self.split)}" if self.split else ""
        line = (
            f"ray: {self.tasks} task(s) on {len(set(self.workers))} worker process(es), {self.failed_tasks} failed"
            f"{split} (Ray start {self.ray_start_seconds:.1f} s)"
        )
        return super().describe() + "\n" + line


# ---------------------------------------------------------------------- the driver
def ray_backfill(
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
    device: str | None = None,
    progress: bool = True,
    source_name: str = "backfill",
    ray_address: str | None = None,
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 0.0,
    max_retries: int = MAX_RETRIES,
    expensive_backwards: float = EXPENSIVE_BACKWARDS,
    **options: Any,
) -> RayBackfillSummary:
    """Measure every checkpoint of a run as Ray tasks; journal and log the results at each checkpoint's step.

    The arguments :func:`~uma_callbacks.triggers.backfill.backfill` takes mean the same here
    (``prefetch`` aside: each worker reads its own checkpoint).

    Args:
        source: a run folder or a list of checkpoint folders (as for ``backfill``).
        metrics: metric objects or names.
        probe: the probe (default: the one the run saved).
        config: a whole :class:`~uma_callbacks.config.UMAConfig` instead of ``metrics`` and ``**options``.
        steps: ``{folder name or path: step}`` for folders whose step is not on disk.
        texts: raw texts for the probe when none is saved.
        tokenizer: the tokenizer for ``texts``.
        max_length: tokens per text.
        mlflow_run_id: the MLflow run to log into.
        tracking_uri: the MLflow store.
        wandb_run_id: the W&B run to log into.
        model_factory: ``factory(folder, config_dict) -> nn.Module`` (sent to the workers).
        trajectory: add the ``trajectory`` metric when there are several checkpoints.
        check_probe: refuse a probe the journal's records do not carry.
        device: where the workers measure (default: CUDA when the worker sees a GPU, else CPU).
        progress: a tqdm bar over the tasks.
        source_name: written into each record's ``source``.
        ray_address: the Ray cluster to join; ``None``: a running Ray in this process, else a
            local one started here (and shut down at the end).
        cpus_per_task: CPUs Ray reserves per task.
        gpus_per_task: GPUs Ray reserves per task (fractions share a GPU).
        max_retries: attempts Ray makes again for a task lost with its worker.
        expensive_backwards: the time cost, in backward passes over the probe, above which a
            metric gets a task of its own per checkpoint.
        **options: any :class:`UMAConfig` field.

    Returns:
        A :class:`RayBackfillSummary`.

    Raises:
        ModuleNotFoundError: Ray is not installed (naming the extra).
        FileNotFoundError: the run folder does not exist.
        ValueError: bad task resources, no checkpoints, bad configuration, no usable probe.
    """  # noqa: DOC502 (ModuleNotFoundError from import_ray; FileNotFoundError and ValueError from discovery and the config)
    started = time.perf_counter()
    check_task_resources(cpus_per_task, gpus_per_task, max_retries)
    ray = import_ray()
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"backfill: unknown argument(s) {unknown}; UMAConfig fields are {sorted(_CONFIG_FIELDS)}")
    checkpoints, problems = discover_with_problems(source, steps)
    checkpoints, duplicates = _one_folder_per_step(checkpoints)
    pair = trajectory and len(checkpoints) > 1
    cfg = _config(config, metrics, pair, [mlflow_run_id, tracking_uri, wandb_run_id], options)
    run_dir = Path(source) if isinstance(source, (str, os.PathLike)) else checkpoints[0].path.parent
    root = Path(cfg.output_dir) if cfg.output_dir is not None else run_dir / "uma"
    session = Session(cfg, root, source=source_name)
    assert session.journal is not None
    tok = load_tokenizer(tokenizer, [c.path for c in checkpoints]) if texts and not probe else None
    known = [session.journal] + ([Journal(run_dir / "uma")] if (run_dir / "uma").is_dir() else [])
    session.start(
        probe,
        tracker_runs=journal_runs(session.journal, run_dir, mlflow_run_id, tracking_uri, wandb_run_id),
        probe_options={"saved_roots": [root, run_dir / "uma"], "texts": texts, "tokenizer": tok, "max_length": max_length},
        known_probes=known if check_probe else (),
        save=not (root / "probe.safetensors").exists(),
        params={"backfill.metrics": cfg.metric_names, "backfill.executor": "ray"},
    )
    assert session.probe is not None
    summary = RayBackfillSummary(checkpoints=checkpoints, journal=str(root))
    for path, reason in problems + duplicates:  # unusable folders: error records, the rest goes on
        ckpt = Checkpoint(Path(path), -1, "problem")
        _tally(summary, ckpt, [session.record_error(-1, "checkpoint", ValueError(reason), {"path": str(path)})])
    tasks = plan_tasks(len(checkpoints), cfg, len(session.probe.batches), expensive_backwards)
    summary.split = sorted({t.metrics[0] for t in tasks if len(t.metrics) == 1 and len(cfg.metric_names) > 1})
    summary.tasks = len(tasks)
    if tasks:
        t0 = time.perf_counter()
        joined = _connect(ray, ray_address)
        summary.ray_start_seconds = time.perf_counter() - t0
        try:
            _run_tasks(ray, session, cfg, checkpoints, tasks, summary, {
                "device": device, "model_factory": model_factory, "source": source_name,
                "cpus": cpus_per_task, "gpus": gpus_per_task, "max_retries": max_retries, "progress": progress,
            })  # fmt: skip
        finally:
            if joined:
                ray.shutdown()
    session.finish()
    summary.sink_failures = sorted(session.delivery.failing)
    summary.seconds = time.perf_counter() - started
    return summary


def _connect(ray: Any, address: str | None) -> bool:
    """Join Ray: the one this process runs, the cluster at ``address``, or a new local one; True when joined here."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


def _run_tasks(
    ray: Any,
    session: Session,
    cfg: UMAConfig,
    checkpoints: list[Checkpoint],
    tasks: list[Task],
    summary: RayBackfillSummary,
    how: dict[str, Any],
) -> None:
    """Submit every task, then journal and deliver each result as it arrives."""
    assert session.journal is not None and session.probe is not None
    names = set(cfg.metric_names)
    groups = sorted({t.metrics for t in tasks})
    shared = ray.put({
        "probe": _probe_bytes(session.probe),
        "fingerprint": session.probe.fingerprint,
        # measured records of these metrics: a result already journalled is a cache hit in the worker too
        "journalled": [r.to_dict() for r in session.journal.records() if r.status in MEASURED and r.cache_key and r.metric in names],
        "configs": {g: dataclasses.replace(cfg, metrics=[m for m in cfg.metric_objects if m.name in g], trackers=[], output_dir=None)
                    for g in groups},
        "arch": _run_architecture(checkpoints),
        "source": how["source"],
        "device": how["device"],
        "model_factory": how["model_factory"],
    })  # fmt: skip
    remote = ray.remote(uma_backfill_task).options(
        num_cpus=how["cpus"], num_gpus=how["gpus"], max_retries=how["max_retries"], retry_exceptions=False
    )
    pending: dict[Any, Task] = {}
    for task in tasks:
        earlier = checkpoints[: task.index] if _needs_history(cfg, task) else []
        pending[remote.remote({"checkpoint": checkpoints[task.index], "earlier": earlier, "group": task.metrics}, shared)] = task
    bar = _progress(len(tasks), how["progress"])
    if bar is not None:
        bar.set_description("uma backfill (ray)")
    seen: set[tuple[int, str]] = set()
    order = {name: i for i, name in enumerate(["checkpoint", *cfg.metric_names])}
    measured: list[tuple[Checkpoint, Record]] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        ckpt = checkpoints[task.index]
        try:
            out = ray.get(done[0])
        except Exception as err:  # retries spent (or the worker code failed): error records, the rest goes on
            summary.failed_tasks += 1
            logger.warning("uma: ray task for step %d (%s) failed: %s: %s", ckpt.step, ", ".join(task.metrics), type(err).__name__, err)
            records = [session.record_error(ckpt.step, name, err, {"path": str(ckpt.path), "executor": "ray"}) for name in task.metrics]
        else:
            records = _accept(session, out, ckpt, task, seen)
            summary.task_seconds.append(float(out.get("seconds", 0.0)))
            summary.workers.append(int(out.get("pid", -1)))
            slot = summary.per_checkpoint.setdefault(ckpt.step, {"load": 0.0, "compute": 0.0, "wait": 0.0})
            slot["load"] += float(out.get("load_seconds", 0.0))
            slot["compute"] += float(out.get("compute_seconds", 0.0))
            summary.load_seconds += float(out.get("load_seconds", 0.0))
            summary.compute_seconds += float(out.get("compute_seconds", 0.0))
        measured.extend((ckpt, r) for r in records)
        if bar is not None:
            bar.set_postfix_str(f"step {ckpt.step}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    for ckpt, record in sorted(measured, key=lambda cr: (cr[1].step, order.get(cr[1].metric, len(order)))):
        _tally(summary, ckpt, [record])


def _needs_history(cfg: UMAConfig, task: Task) -> bool:
    """Whether a metric of ``task`` compares with earlier checkpoints."""
    return any((m.history_needed or m.needs_first) for m in cfg.metric_objects if m.name in task.metrics)


def _run_architecture(checkpoints: list[Checkpoint]) -> str | None:
    """The run's architecture: the first checkpoint's whose ``config.json`` reads (later ones must match it)."""
    for ckpt in checkpoints:
        try:
            return architecture_of(read_config(ckpt.path))
        except (OSError, ValueError):
            continue
    return None


def _probe_bytes(probe: Probe) -> dict[str, bytes]:
    """The probe's saved files (safetensors + JSON) as bytes, for the workers."""
    with tempfile.TemporaryDirectory(prefix="uma-probe-") as tmp:
        save_probe(probe, tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in (PROBE_TENSORS, PROBE_META)}


def _accept(session: Session, out: Mapping[str, Any], ckpt: Checkpoint, task: Task, seen: set[tuple[int, str]]) -> list[Record]:
    """Journal and deliver a task's records: each (step, metric) once, files under the run's journal."""
    journal = session.journal
    assert journal is not None and session.probe is not None
    accepted = []
    for item in out.get("records", []):
        record = Record.from_dict(item["record"])
        if record.step != ckpt.step or record.metric not in (*task.metrics, "checkpoint"):
            logger.warning("uma: a ray worker returned %s at step %d for step %d (%s); ignored",
                           record.metric, record.step, ckpt.step, ", ".join(task.metrics))  # fmt: skip
            continue
        if record.probe and record.probe != session.probe.fingerprint:
            logger.warning("uma: a ray worker measured %s at step %d on another probe; ignored", record.metric, record.step)
            continue
        if (record.step, record.metric) in seen:  # a checkpoint error reported by each of its tasks: once
            continue
        seen.add((record.step, record.metric))
        hit = journal.lookup(record.cache_key) if record.status in MEASURED and record.cache_key and session.config.use_cache else None
        if hit is not None:  # journalled meanwhile (two identical checkpoints, a concurrent backfill): a cache hit
            record = Record(**{**hit.to_dict(), "step": record.step, "status": "cached", "source": session.source})
        elif record.status != "cached":
            if record.status in MEASURED:
                _write_files(journal, record, item.get("files", []))
            journal.append(record)  # stamped with the driver's run
        session.delivery.send([record])
        session.records.append(record)
        accepted.append(record)
    journal.flush()
    return accepted


def _write_files(journal: Any, record: Record, files: Sequence[tuple[str, bytes]]) -> None:
    """Write a worker's result files for ``record`` where the suite would have: ``step-<N>/[variant/]<name>``.

    Sets ``record.files``, ``file_ids`` and ``missing_files`` (a refused or failed write is
    named there, never raised).
    """
    probe_result = MetricResult(name=record.metric, meta={"config": record.meta.get("config")})
    sub = _variant_folder(journal.root / f"step-{int(record.step)}", probe_result)
    run = str(getattr(journal, "run", "") or "")
    if not sub and run and _files_of_another_run(journal, int(record.step), record.metric, run):
        sub = f"{record.metric}-run-{run[:12]}"
    folder = f"step-{int(record.step)}" + (f"/{safe_name(sub)}" if sub else "")
    missing = {f"{folder}/{Path(rel).name}": why for rel, why in record.missing_files.items()}
    record.files, record.file_ids, record.missing_files = [], {}, missing
    try:
        fd = open_folder(journal.root, folder.split("/"))
    except OSError as err:
        for name, _ in files:
            record.missing_files[f"{folder}/{name}"] = f"{type(err).__name__}: {err}"[:300]
        return
    try:
        for name, data in files:
            rel = f"{folder}/{name}"
            if safe_name(name) != name or not isinstance(data, bytes):
                record.missing_files[rel] = "refused: not a plain file name"
                continue
            try:
                record.file_ids[rel] = put_file(fd, name, data)
            except OSError as err:  # RefusedPath (a link in the way) included
                record.missing_files[rel] = f"{type(err).__name__}: {err}"[:300]
            else:
                record.files.append(rel)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the worker
def uma_backfill_task(task: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
    """Measure one checkpoint's metrics of one task in a Ray worker; the records and their files as bytes.

    Args:
        task: ``{"checkpoint", "earlier", "group"}``: the checkpoint, the run's earlier
            checkpoints (for pair metrics; empty when none is needed), the metric names.
        shared: what every task shares (probe bytes, journalled records, configs by group,
            the run's architecture, source, device, model factory).

    Returns:
        ``{"records": [{"record": dict, "files": [(name, bytes)]}], "pid", "seconds",
        "load_seconds", "compute_seconds"}``.

    Raises:
        ValueError: the probe's files do not give the driver's probe.
    """
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="uma-ray-task-"))
    try:
        for name, data in shared["probe"].items():
            (tmp / "probe").mkdir(exist_ok=True)
            (tmp / "probe" / name).write_bytes(data)
        probe = load_probe(tmp / "probe")
        if probe.fingerprint != shared["fingerprint"]:
            raise ValueError("ray backfill: the probe a worker rebuilt differs from the driver's")
        root = tmp / "uma"
        seed = Journal(root)
        seed.pending.extend(Record.from_dict(d) for d in shared["journalled"] if d.get("metric") in task["group"])
        seed.flush()
        cfg: UMAConfig = shared["configs"][tuple(task["group"])]
        session = Session(cfg, root, source=shared["source"])
        session.open(probe, save=False)
        wanted = shared["device"]
        device = torch.device(wanted) if wanted else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loader = ModelLoader(shared["model_factory"], device)
        loader.arch = shared["arch"]
        budget = as_budget(cfg.memory_budget)
        t0 = time.perf_counter()
        ckpt: Checkpoint = task["checkpoint"]
        earlier = list(task["earlier"])
        seed_history(session, loader, [*earlier, ckpt], upto=len(earlier))  # pair metrics' earlier checkpoints, unmeasured
        loaded = read_checkpoint(ckpt, budget)
        load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            model = loader.load(loaded)
        except Exception as err:  # this checkpoint is unusable: its error record, as in process
            records = [session.record_error(ckpt.step, "checkpoint", err, {"path": str(ckpt.path)})]
        else:  # the checkpoint's optimizer.pt / optimizer.bin, read only for a metric that needs it (as in process)
            optimizer = read_optimizer_state(ckpt.path, model) if any(m.needs_optimizer for m in cfg.metric_objects) else None
            records = session.measure(
                model, ckpt.step, label=str(ckpt.path), optimizer=optimizer, log_history=saved_log_history(ckpt.path)
            )
        compute_seconds = time.perf_counter() - t1
        out = []
        for record in records:
            files = _result_files(root, record)  # notes a file it cannot read in the record first
            out.append({"record": record.to_dict(), "files": files})
        return {
            "records": out, "pid": os.getpid(), "seconds": time.perf_counter() - started,
            "load_seconds": load_seconds, "compute_seconds": compute_seconds,
        }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _result_files(root: Path, record: Record) -> list[tuple[str, bytes]]:
    """``[(file name, bytes)]`` of the result files the worker's journal wrote for ``record`` (none for a cache hit)."""
    if record.status not in MEASURED:
        return []
    files = []
    for rel in record.files:
        try:
            files.append((Path(rel).name, (root / rel).read_bytes()))
        except OSError as err:
            record.missing_files[rel] = f"{type(err).__name__}: {err}"[:300]
    return files
