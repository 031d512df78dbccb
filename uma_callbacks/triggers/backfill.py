"""Offline backfill: measure checkpoints already on disk, at their own steps, into a run.

``backfill(run_dir, metrics=["fisher"], mlflow_run_id=...)`` walks the run's checkpoints
(:mod:`uma_callbacks.checkpoints`) in step order and, for each one:

1. loads its weights with safetensors on a background thread (the next checkpoint is
   read while the current one is measured) into a model built once from ``config.json``;
2. measures it on the *same* frozen probe the live callback used (rebuilt from
   ``<journal>/probe.safetensors``, or from the data and seed given; its fingerprint is
   checked against the journal's records) with a :class:`~uma_callbacks.engine.suite.MetricSuite`
   (``source="backfill"``) at the checkpoint's own global step;
3. measures the checkpoint-pair metrics against the previous checkpoint: the
   :class:`Trajectory` record (distance from the first checkpoint, norm and cosine of
   successive updates) and ``interpolation`` when asked for;
4. journals every record (same journal as the live run by default, ``<run_dir>/uma``) and
   delivers it to the sinks.

Resumable and idempotent: results are cached per (checkpoint fingerprint, metric config,
probe fingerprint), so a rerun, or a rerun after ``kill -9``, computes only what is
missing, and a sink gets each (key, step) point once (journal delivery log + the sinks'
own checks). A checkpoint that cannot be used (unreadable weights, another architecture)
becomes an ``error`` record with the reason (metric ``checkpoint``); the others go on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uma_callbacks.checkpoints import (
    Checkpoint,
    architecture_of,
    build_model,
    discover_checkpoints,
    load_into,
    load_weights,
    read_config,
)
from uma_callbacks.config import build_metric
from uma_callbacks.metrics.trajectory import Trajectory, trajectory_scalars
from uma_callbacks.engine.journal import DELIVERIES_FILE, Journal, read_lines
from uma_callbacks.metrics.base import Metric
from uma_callbacks.engine.probe import Probe, load_probe
from uma_callbacks.engine.records import Record
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.engine.budget import as_budget
from uma_callbacks.engine.suite import MetricSuite, deliver

logger = logging.getLogger(__name__)

#: Metrics measured on a checkpoint *pair* (current, previous): run after the first checkpoint.
PAIR_METRICS = ("interpolation", "trajectory")


# ---------------------------------------------------------------------- summary
@dataclass
class BackfillSummary:
    """What a backfill did.

    Attributes:
        checkpoints: the checkpoints found, in step order.
        records: every record produced (metrics and checkpoint errors).
        errors: ``(checkpoint folder, step, reason)`` for each checkpoint that could not be used,
            and each metric that failed.
        computed: records computed now; ``cached``: records read from the journal.
        seconds: wall time; ``load_seconds`` / ``compute_seconds``: summed per phase
            (loading overlaps computing, so their sum exceeds ``seconds``).
        per_checkpoint: ``{step: {"load": s, "compute": s, "wait": s}}``.
        journal: the journal folder.
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

    @property
    def ok(self) -> bool:
        """True when every checkpoint and metric succeeded."""
        return not self.errors

    def describe(self) -> str:
        """A few human lines: counts, errors with reasons, where the journal is."""
        lines = [
            f"backfill: {len(self.checkpoints)} checkpoint(s), {self.computed} record(s) computed, "
            f"{self.cached} from cache, {len(self.errors)} error(s) in {self.seconds:.1f} s "
            f"(load {self.load_seconds:.1f} s, compute {self.compute_seconds:.1f} s); journal {self.journal}"
        ]
        lines += [f"  error at step {step} ({path}): {reason}" for path, step, reason in self.errors]
        return "\n".join(lines)


@dataclass
class _Loaded:
    checkpoint: Checkpoint
    config: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None
    seconds: float = 0.0


def _load(checkpoint: Checkpoint) -> _Loaded:
    started = time.perf_counter()
    try:
        config = read_config(checkpoint.path)
        weights = load_weights(checkpoint.path)
        return _Loaded(checkpoint, config, weights, seconds=time.perf_counter() - started)
    except Exception as err:  # reported as the checkpoint's error record
        return _Loaded(checkpoint, error=err, seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------- the loop
def backfill(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    metrics: Sequence[str | Metric] = ("gradient_flow",),
    probe: Any = None,
    *,
    steps: Mapping[str, int] | None = None,
    texts: Sequence[str] | None = None,
    tokenizer: Any = None,
    probe_size: int = 64,
    probe_batch_size: int = 8,
    max_length: int = 128,
    seed: int = 42,
    trackers: Sequence[Any] | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    wandb_run_id: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    model_factory: Callable[[Path, dict[str, Any]], torch.nn.Module] | None = None,
    trajectory: bool = True,
    use_cache: bool = True,
    check_probe: bool = True,
    draw_figures: bool = True,
    loss_fn: Callable[..., Any] | None = None,
    device: str | torch.device | None = None,
    chunk_sizes: Mapping[str, int] | None = None,
    prefetch: bool = True,
    progress: bool = True,
    source_name: str = "backfill",
    memory_budget: Any = None,
    aggressive_cleanup: bool = False,
) -> BackfillSummary:
    """Measure every checkpoint of a run and log the results at each checkpoint's step.

    Args:
        source: a run folder (``checkpoint-*/``, Accelerate state folders) or a list of
            checkpoint / HF model folders (see :func:`~uma_callbacks.checkpoints.discover_checkpoints`).
        metrics: metric objects or names (``"fisher"``, ``"landscape"``, ``"interpolation"``, ...).
        probe: a :class:`Probe`, a list of batches, a map-style dataset (drawn with
            ``probe_size``/``seed`` as the callback does), or None: the probe the run
            saved (``<journal>/probe.safetensors``), else one built from ``texts``.
        steps: ``{folder name or path: step}`` for folders whose step is not on disk.
        texts: raw texts for the probe (tokenised with ``tokenizer``, by default the one
            saved with the checkpoints).
        tokenizer: a tokenizer object or a local folder.
        probe_size, probe_batch_size, max_length, seed: how a probe is drawn from data.
        trackers: sink objects and/or ``"mlflow"``/``"wandb"``; with ``mlflow_run_id``,
            ``tracking_uri`` or ``wandb_run_id`` the matching sink is added. An MLflow sink
            without a run id joins the run this journal last delivered to.
        mlflow_run_id, tracking_uri: the existing MLflow run to log into.
        wandb_run_id: the existing W&B run to log into (resumed).
        output_dir: the journal folder; None: ``<run_dir>/uma`` (shared with the live callback).
        model_factory: ``factory(folder, config_dict) -> nn.Module`` instead of building
            from ``config.json`` with transformers.
        trajectory: add the :class:`Trajectory` record when there are several checkpoints.
        use_cache: reuse journalled results (False recomputes everything).
        check_probe: refuse a probe whose fingerprint the journal's records do not carry.
        draw_figures: draw PNGs next to the journal.
        loss_fn: per-sample loss; None for the HF default.
        device: where to measure (default: CUDA if available, else CPU).
        chunk_sizes: ``{metric name: samples per chunk}``.
        prefetch: read the next checkpoint on a background thread.
        progress: show a tqdm bar with ETA.
        source_name: written into each record's ``source``.
        memory_budget: None (free memory minus a margin), GiB, or a ``MemoryBudget``.
        aggressive_cleanup: a full ``gc.collect()`` after every metric.

    Returns:
        A :class:`BackfillSummary`.

    Raises:
        FileNotFoundError: the run folder does not exist.
        ValueError: no checkpoints, bad metric names, no usable probe, or a probe whose
            fingerprint differs from the journal's.
    """
    started = time.perf_counter()
    checkpoints = discover_checkpoints(source, steps)
    run_dir = Path(source) if isinstance(source, (str, os.PathLike)) else checkpoints[0].path.parent
    journal = Journal(Path(output_dir) if output_dir is not None else run_dir / "uma")
    metric_objs = [build_metric(m) for m in metrics]
    single = [m for m in metric_objs if m.name not in PAIR_METRICS]
    pair = [m for m in metric_objs if m.name in PAIR_METRICS]
    if trajectory and len(checkpoints) > 1 and not any(m.name == "trajectory" for m in pair):
        pair.append(Trajectory())
    probe_obj = resolve_probe(
        probe, [journal.root, run_dir / "uma"], checkpoints, texts, tokenizer, probe_size, probe_batch_size, max_length, seed
    )
    if check_probe:
        check_probe_matches(probe_obj, [journal] + ([Journal(run_dir / "uma")] if (run_dir / "uma").is_dir() else []))
    sinks = resolve_sinks(trackers, mlflow_run_id, tracking_uri, wandb_run_id, journal, run_dir)
    common = dict(journal=journal, sinks=sinks, loss_fn=loss_fn, use_cache=use_cache, draw_figures=draw_figures,
                  source=source_name, chunk_sizes=dict(chunk_sizes or {}), budget=as_budget(memory_budget),
                  aggressive_cleanup=aggressive_cleanup)
    suite = MetricSuite(metrics=single, **common)
    pair_suite = MetricSuite(metrics=pair, **common)
    for sink in sinks:
        try:
            sink.start()
            sink.log_params({"probe_fingerprint": probe_obj.fingerprint, "backfill.metrics": [m.name for m in metric_objs]})
        except Exception as err:  # the journal keeps everything; uma sync replays later
            logger.warning("uma: sink %s could not start (%s); journal only for now", getattr(sink, "name", sink), err)
    summary = BackfillSummary(checkpoints=checkpoints, journal=str(journal.root))
    target = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state: dict[str, Any] = {"model": None, "config": None, "arch": None, "history": []}
    bar = _progress(len(checkpoints), progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="uma-prefetch") as pool:
        pending: Future[_Loaded] | None = pool.submit(_load, checkpoints[0]) if prefetch else None
        for i, ckpt in enumerate(checkpoints):
            waited = time.perf_counter()
            loaded = pending.result() if pending is not None else _load(ckpt)
            waited = time.perf_counter() - waited
            pending = pool.submit(_load, checkpoints[i + 1]) if prefetch and i + 1 < len(checkpoints) else None
            t0 = time.perf_counter()
            records = _measure(loaded, state, suite, pair_suite, probe_obj, model_factory, target, journal, sinks)
            compute = time.perf_counter() - t0
            summary.load_seconds += loaded.seconds
            summary.compute_seconds += compute
            summary.per_checkpoint[ckpt.step] = {"load": loaded.seconds, "compute": compute, "wait": waited}
            _tally(summary, ckpt, records)
            if bar is not None:
                bar.set_postfix_str(f"step {ckpt.step}", refresh=False)
                bar.update(1)
            loaded.weights = None
    if bar is not None:
        bar.close()
    for sink in sinks:
        try:
            sink.finish()
        except Exception as err:  # finishing is best effort; the journal has it all
            logger.warning("uma: sink %s did not finish cleanly (%s)", getattr(sink, "name", sink), err)
    summary.seconds = time.perf_counter() - started
    return summary


def _tally(summary: BackfillSummary, ckpt: Checkpoint, records: list[Record]) -> None:
    summary.records.extend(records)
    for record in records:
        if record.status == "cached":
            summary.cached += 1
        elif record.status == "ok":
            summary.computed += 1
        else:
            reason = (record.error or {}).get("message", record.status)
            label = "" if record.metric == "checkpoint" else f"{record.metric}: "
            summary.errors.append((str(ckpt.path), ckpt.step, f"{label}{reason}"))


def _measure(
    loaded: _Loaded,
    state: dict[str, Any],
    suite: MetricSuite,
    pair_suite: MetricSuite,
    probe: Probe,
    model_factory: Callable[[Path, dict[str, Any]], torch.nn.Module] | None,
    device: torch.device,
    journal: Journal,
    sinks: list[Any],
) -> list[Record]:
    ckpt = loaded.checkpoint
    try:
        if loaded.error is not None:
            raise loaded.error
        assert loaded.config is not None and loaded.weights is not None
        arch = architecture_of(loaded.config)
        if state["arch"] is not None and arch != state["arch"]:
            raise ValueError(f"architecture {arch} differs from the run's {state['arch']}; checkpoint skipped")
        if state["model"] is None or loaded.config != state["config"]:
            model = model_factory(ckpt.path, loaded.config) if model_factory else build_model(ckpt.path, loaded.config)
            dtype = _weights_dtype(loaded.weights)
            if dtype is not None:
                model = model.to(dtype)
            state["model"], state["config"] = model.to(device).eval(), loaded.config
        load_into(state["model"], loaded.weights)
        state["arch"] = arch
    except Exception as err:  # this checkpoint is unusable; the others go on
        return [_checkpoint_error(ckpt, err, journal, sinks)]
    model = state["model"]
    fingerprint = weights_fingerprint(model)
    records = suite.run(model, probe, step=ckpt.step, checkpoint=fingerprint) if suite.metrics else []
    if not pair_suite.metrics:
        return records
    history: list[tuple[str, dict[str, torch.Tensor]]] = state["history"]
    if history:
        context = {"first_weights": history[0][1], "previous_weights": history[-1][1]}
        if len(history) >= 2:
            context["before_previous_weights"] = history[-2][1]
        chain = [fingerprint] + [fp for fp, _ in history[-2:]] + [history[0][0]]
        pair_key = hashlib.sha256("|".join(chain).encode()).hexdigest()
        records += pair_suite.run(model, probe, step=ckpt.step, checkpoint=pair_key, context=context)
    # keep the first checkpoint and the last two (the update cosine needs two updates)
    current = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    history = history + [(fingerprint, current)]
    state["history"] = history if len(history) <= 3 else [history[0]] + history[-2:]
    return records


def _checkpoint_error(ckpt: Checkpoint, err: BaseException, journal: Journal, sinks: list[Any]) -> Record:
    record = Record(
        step=ckpt.step,
        metric="checkpoint",
        status="error",
        error={
            "type": type(err).__name__,
            "message": str(err),
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-4000:],
        },
        meta={"path": str(ckpt.path), "timestamp_ms": int(time.time() * 1000)},
        checkpoint=str(ckpt.path),
        source="backfill",
    )
    logger.warning("uma: checkpoint %s (step %d) skipped: %s: %s", ckpt.path, ckpt.step, type(err).__name__, err)
    journal.append(record)
    for sink in sinks:
        deliver(journal, sink, [record])
    return record


def _weights_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="uma backfill", unit="ckpt")


# ---------------------------------------------------------------------- probe
def resolve_probe(
    probe: Any,
    roots: Sequence[Path],
    checkpoints: Sequence[Checkpoint],
    texts: Sequence[str] | None,
    tokenizer: Any,
    probe_size: int,
    probe_batch_size: int,
    max_length: int,
    seed: int,
) -> Probe:
    """The probe to measure with (see :func:`backfill`'s ``probe`` argument).

    Raises:
        ValueError: nothing to build a probe from, or no tokenizer for ``texts``.
    """
    if isinstance(probe, Probe):
        return probe
    if isinstance(probe, (list, tuple)) and probe and isinstance(probe[0], Mapping):
        if any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in probe[0].values()):
            return Probe(list(probe))
    if probe is not None and hasattr(probe, "__len__") and hasattr(probe, "__getitem__"):
        return Probe.from_dataset(probe, probe_size, batch_size=probe_batch_size, seed=seed)
    if probe is not None:
        raise ValueError(f"probe must be None, a Probe, a list of batches or a dataset; got {type(probe).__name__}")
    if texts:
        tok = load_tokenizer(tokenizer, [c.path for c in checkpoints])
        chosen = list(texts)
        if len(chosen) > probe_size:
            index = np.sort(np.random.default_rng(seed).choice(len(chosen), size=probe_size, replace=False))
            chosen = [chosen[int(i)] for i in index]
        return Probe.from_texts(chosen, tok, max_length=max_length, batch_size=probe_batch_size)
    for root in roots:
        try:
            return load_probe(root)
        except FileNotFoundError:
            continue
    raise ValueError(
        "probe: none given and no saved probe (probe.safetensors) in "
        + ", ".join(str(r) for r in roots)
        + "; pass probe=/texts= (CLI: --texts FILE) with the data and seed the run used"
    )


def load_tokenizer(tokenizer: Any, folders: Sequence[Path]) -> Any:
    """A tokenizer object: ``tokenizer`` itself, its local folder, or the first checkpoint that has one.

    Raises:
        ValueError: none found.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    candidates = [Path(tokenizer)] if tokenizer is not None else list(folders)
    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    raise ValueError(f"tokenizer: no tokenizer files in {[str(c) for c in candidates]}; pass tokenizer=FOLDER")


def check_probe_matches(probe: Probe, journals: Sequence[Journal]) -> None:
    """Refuse a probe whose fingerprint the journals' measured records do not carry.

    Raises:
        ValueError: the journals hold results on other probes only.
    """
    known: set[str] = set()
    for journal in journals:
        known |= {r.probe for r in journal.records() if r.probe and r.status in ("ok", "cached")}
    if known and probe.fingerprint not in known:
        raise ValueError(
            f"probe fingerprint {probe.fingerprint[:12]} differs from the journal's "
            f"({', '.join(sorted(k[:12] for k in known))}): the run was measured on other data. "
            "Rebuild it with the same data and seed (or from the saved probe.safetensors), "
            "or pass check_probe=False (CLI: --new-probe) to measure on a new probe anyway"
        )


# ---------------------------------------------------------------------- sinks
def resolve_sinks(
    trackers: Sequence[Any] | None,
    mlflow_run_id: str | None,
    tracking_uri: str | None,
    wandb_run_id: str | None,
    journal: Journal,
    run_dir: Path,
) -> list[Any]:
    """The sinks a backfill (or ``uma sync``) logs to.

    Raises:
        ValueError: unknown tracker name.
    """
    names = list(trackers or [])
    if (mlflow_run_id or tracking_uri) and "mlflow" not in names:
        names.append("mlflow")
    if wandb_run_id and "wandb" not in names:
        names.append("wandb")
    sinks = []
    for tracker in names:
        if not isinstance(tracker, str):
            sinks.append(tracker)
        elif tracker == "mlflow":
            from uma_callbacks.integrations.mlflow import MLflowSink

            run_id = mlflow_run_id or delivered_run(journal, "mlflow")
            uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _local_store(run_dir, journal.root)
            sinks.append(MLflowSink(run_id=run_id, tracking_uri=uri, fallback_dir=journal.root))
        elif tracker == "wandb":
            sinks.append(_wandb_sink(wandb_run_id))
        else:
            raise ValueError(f"trackers entries must be sink objects or one of ('mlflow', 'wandb'); got {tracker!r}")
    return sinks


def delivered_run(journal: Journal, sink: str) -> str | None:
    """The run this journal last delivered to for ``sink`` (``None`` if it never did)."""
    payloads, _ = read_lines(journal.root / DELIVERIES_FILE)
    runs = [p.get("run") for p in payloads if p.get("sink") == sink and p.get("run")]
    return runs[-1] if runs else None


def _local_store(run_dir: Path, root: Path) -> str | None:
    for folder in (run_dir, root):
        if (folder / "mlflow.db").is_file():
            return f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    return None


def _wandb_sink(run_id: str | None) -> Any:
    import inspect

    from uma_callbacks.triggers.trainer import make_sink

    if run_id:
        from uma_callbacks.integrations.wandb import WandbSink

        if "run_id" in inspect.signature(WandbSink).parameters:
            return WandbSink(run_id=run_id)
        os.environ["WANDB_RUN_ID"] = run_id
        os.environ.setdefault("WANDB_RESUME", "allow")
    return make_sink("wandb")


__all__ = ["PAIR_METRICS", "BackfillSummary", "Trajectory", "backfill", "trajectory_scalars"]

