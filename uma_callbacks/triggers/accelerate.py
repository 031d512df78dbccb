"""``attach(accelerator, ...)``: measure the model whenever ``accelerator.save_state()`` runs.

Custom Accelerate loops have no ``TrainerCallback`` events; they have
``accelerator.register_save_state_pre_hook``, which calls ``hook(models, weights,
output_dir)`` on every process inside ``save_state``, after the folder exists and before
anything is written to it. :func:`attach` registers such a hook. At each ``save_state``:

1. the step is the **global step the user gives** (``handle.step = N`` before
   ``save_state``, or ``attach(..., global_step=lambda: state.step)``): Accelerate's own
   counters (``save_iteration``, ``accelerator.step``) count saves and micro-batches, not
   optimizer steps, so they are never used;
2. every rank runs the suite on its shard of the probe (sums all-reduced; only world rank
   0 journals and logs), on the unwrapped model (``accelerator.unwrap_model``);
3. rank 0 writes ``<output_dir>/uma_state.json`` (:data:`STATE_FILE`) into the
   ``save_state`` folder: the step, the journal folder, the probe fingerprint and the
   records, so a later backfill knows the folder's global step.

Sinks, on rank 0, resolved at the first save (after ``accelerator.init_trackers``):

- ``trackers=None``: follow the accelerator's trackers: its W&B run and MLflow run are
  joined by our own sinks (:class:`~uma_callbacks.integrations.wandb.WandbSink`,
  :class:`~uma_callbacks.integrations.mlflow.MLflowSink`, for the ``uma/step`` axis,
  figures, tables and artifacts); any other tracker goes through
  :class:`AcceleratorTrackerSink` (``tracker.log(values, step=record.step)``);
- ``trackers=[]``: journal only; names (``"wandb"``, ``"mlflow"``) and/or sink objects as
  in ``UMACallback``.

``handle.remove()`` undoes :func:`attach`: the hook is unregistered, pending records are
delivered and the runs our sinks opened are finished.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.engine.budget import as_budget
from uma_callbacks.config import UMAConfig
from uma_callbacks.core.distributed import Collective, current_collective
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics.base import Metric
from uma_callbacks.engine.probe import Probe, pad_collate
from uma_callbacks.engine.records import Record
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.engine.suite import MetricSuite

logger = logging.getLogger(__name__)

#: The metadata file written into each ``save_state`` folder (read by the backfill).
STATE_FILE = "uma_state.json"
#: Version tag of :data:`STATE_FILE`'s layout.
STATE_FORMAT = "uma-state/1"


class AcceleratorTrackerSink:
    """Any Accelerate ``GeneralTracker`` as a sink: ``tracker.log(values, step=record.step)``.

    Scalars only (trackers have no common file API). Idempotent per (step, key) within a
    process; the journal's delivery log covers replays across processes.

    Args:
        tracker: an Accelerate tracker (``accelerator.get_tracker(name)``).
    """

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.name = f"accelerate-{getattr(tracker, 'name', type(tracker).__name__)}"
        self._logged: set[tuple[int, str]] = set()

    def start(self) -> None:
        """Nothing to open: the accelerator started the tracker."""

    def run_id(self) -> str:
        """The native run's id when it has one, else the tracker name."""
        native = getattr(self.tracker, "tracker", None)
        for attr in ("id", "run_id", "name"):
            value = getattr(native, attr, None)
            if isinstance(value, str) and value:
                return value
        return str(getattr(self.tracker, "name", "accelerate"))

    def log_record(self, record: Record, root: Path) -> None:
        """Log the record's finite scalars at ``record.step``."""
        values = {k: v for k, v in record.log_values().items() if (record.step, k) not in self._logged}
        if values:
            self.tracker.log(values, step=int(record.step))
            self._logged.update((record.step, k) for k in values)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params go through ``store_init_configuration`` when the tracker has it."""
        store = getattr(self.tracker, "store_init_configuration", None)
        if store is not None:
            store({f"uma.{k}": (v if isinstance(v, (str, int, float, bool)) else json.dumps(v)) for k, v in params.items()})

    def finish(self) -> None:
        """The accelerator finishes its trackers (``accelerator.end_training``)."""


class UMAHandle:
    """What :func:`attach` returns: the step to measure at, the results, and ``remove()``.

    Attributes:
        step: the global step of the next ``save_state`` (set it before each save, or
            give ``global_step=`` to :func:`attach`).
        records: every record measured through this handle (all ranks; only rank 0's
            carry files).
        journal: the journal (rank 0; ``None`` elsewhere).
        probe: the frozen probe.
        suite: the :class:`~uma_callbacks.engine.suite.MetricSuite`.
    """

    def __init__(
        self,
        accelerator: Any,
        config: UMAConfig,
        probe: Probe,
        global_step: Callable[[], int] | None,
        step: int | None,
        model_index: int,
        collective: Collective,
    ) -> None:
        self.accelerator = accelerator
        self.config = config
        self.probe = probe
        self.step = step
        self.records: list[Record] = []
        self._global_step = global_step
        self._model_index = model_index
        self._collective = collective
        self.root = Path(config.output_dir or os.path.join(accelerator.project_dir or os.getcwd(), "uma"))
        self.journal: Journal | None = Journal(self.root, save_tensors=config.save_tensors) if collective.rank == 0 else None
        self.suite = MetricSuite(
            metrics=config.metric_objects,
            journal=self.journal,
            sinks=[],
            collective=collective,
            loss_fn=config.loss_fn,
            use_cache=config.use_cache,
            draw_figures=config.draw_figures,
            source="accelerate",
            aggressive_cleanup=self.config.aggressive_cleanup,
            budget=as_budget(config.memory_budget),
            timeout_seconds=config.timeout_seconds,
        )
        self._sinks_ready = False
        self._own_sinks: list[Any] = []
        self._hook_handle: Any = None
        self._measured: set[int] = set()

    # ------------------------------------------------------------------ public
    @property
    def sinks(self) -> list[Any]:
        """The sinks records go to (rank 0, after the first save)."""
        return self.suite.sinks

    def current_step(self) -> int | None:
        """The step the next measurement is filed under (``global_step()`` wins over ``step``)."""
        if self._global_step is not None:
            return int(self._global_step())
        return None if self.step is None else int(self.step)

    def measure(self, step: int | None = None, model: torch.nn.Module | None = None) -> list[Record]:
        """Measure now (every rank must call it): e.g. between saves.

        Args:
            step: the global step; ``None`` uses :meth:`current_step`.
            model: the model; ``None`` unwraps the accelerator's ``model_index``-th model.

        Returns:
            The records (empty when the step is unknown or was measured already).
        """
        step = self.current_step() if step is None else int(step)
        if step is None:
            logger.warning(
                "uma: save_state without a global step; set handle.step = N before it, or "
                "attach(..., global_step=callable). Nothing measured."
            )
            return []
        if step in self._measured:
            return []
        if model is None:
            model = self.accelerator.unwrap_model(self.accelerator._models[self._model_index])
        self._start_sinks()
        if self._collective.world_size > 1:
            self._collective.barrier()
        self._measured.add(step)
        fingerprint = weights_fingerprint(model) if self.config.use_cache else ""
        logger.info("uma: measuring %s at step %d", ", ".join(self.config.metric_names), step)
        records = self.suite.run(model, self.probe, step=step, checkpoint=fingerprint)
        self.records.extend(records)
        return records

    def remove(self) -> None:
        """Undo :func:`attach`: unregister the hook, deliver pending records, finish our runs."""
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self.suite.deliver_pending()
        for sink in self._own_sinks:
            try:
                sink.finish()
            except Exception as err:  # a tracker outage must not fail the end of training
                logger.warning("uma: sink %s did not finish cleanly (%s)", sink.name, err)
        self._own_sinks = []

    # ------------------------------------------------------------------ internals
    def _hook(self, models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        step = self.current_step()
        model = self.accelerator.unwrap_model(models[self._model_index]) if models else None
        records = self.measure(step, model)
        if self._collective.rank == 0 and step is not None:
            write_state(output_dir, step, self.root, self.probe.fingerprint, records or self._records_at(step))

    def _records_at(self, step: int) -> list[Record]:
        return [r for r in self.records if r.step == step]

    def _start_sinks(self) -> None:
        if self._sinks_ready or self._collective.rank != 0:
            return
        self._sinks_ready = True
        self.suite.sinks = self._resolve_sinks()
        params = {"probe_fingerprint": self.probe.fingerprint, "probe_size": self.probe.n_samples}
        params.update({f"{m.name}.config": m.config() for m in self.config.metric_objects})
        for sink in self.suite.sinks:
            try:
                sink.start()
                sink.log_params(params)
            except Exception as err:  # a tracker outage must not stop training
                logger.warning(
                    "uma: sink %s could not start (%s: %s); journal only for now", sink.name, type(err).__name__, err
                )
                self.suite._failed_sinks.add(sink.name)

    def _resolve_sinks(self) -> list[Any]:
        from uma_callbacks.triggers.trainer import make_sink  # noqa: PLC0415 (transformers loads only when needed)

        requested = self.config.trackers
        if requested is not None:
            sinks = []
            for tracker in requested:
                if not isinstance(tracker, str):
                    sinks.append(tracker)
                    continue
                sink = make_sink(tracker, fallback_dir=self.root)
                if not sink.capture_active_run():
                    self._own_sinks.append(sink)
                sinks.append(sink)
            return sinks
        return [sink_for_tracker(t) for t in getattr(self.accelerator, "trackers", [])]


def sink_for_tracker(tracker: Any) -> Any:
    """Our sink for an Accelerate tracker: W&B and MLflow runs are joined by our own sinks
    (``uma/step`` axis, figures, artifacts); any other tracker is wrapped in
    :class:`AcceleratorTrackerSink`."""
    name = getattr(tracker, "name", "")
    native = getattr(tracker, "tracker", None)
    if name == "wandb" and native is not None:
        from uma_callbacks.integrations.wandb import WandbSink  # noqa: PLC0415

        return WandbSink(run=native)
    if name == "mlflow" and native is not None:
        from uma_callbacks.integrations.mlflow import MLflowSink  # noqa: PLC0415

        import mlflow  # noqa: PLC0415 (the accelerator already imported it)

        return MLflowSink(run_id=native.info.run_id, tracking_uri=mlflow.get_tracking_uri())
    return AcceleratorTrackerSink(tracker)


def write_state(
    folder: str | os.PathLike[str], step: int, journal_root: Path, probe_fingerprint: str, records: Sequence[Record]
) -> Path:
    """Write :data:`STATE_FILE` into a ``save_state`` folder (atomically).

    Layout: ``{"format", "step", "journal", "probe_fingerprint", "records": [{"metric",
    "status", "record_id"}]}``; ``step`` is the global step the folder was saved at.

    Returns:
        The file's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": STATE_FORMAT,
        "step": int(step),
        "journal": str(Path(journal_root).resolve()),
        "probe_fingerprint": probe_fingerprint,
        "records": [{"metric": r.metric, "status": r.status, "record_id": r.record_id} for r in records],
    }
    path = folder / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_state(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The :data:`STATE_FILE` of a ``save_state`` folder, or ``None`` when absent."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def attach(
    accelerator: Any,
    metrics: Sequence[str | Metric] = ("gradient_flow",),
    probe: Any = None,
    *,
    global_step: Callable[[], int] | int | None = None,
    trackers: Sequence[Any] | None = None,
    output_dir: str | None = None,
    loss_fn: Callable[..., Any] | None = None,
    model_index: int = 0,
    **config: Any,
) -> UMAHandle:
    """Measure the model at every ``accelerator.save_state()``.

    Call it on every process, after ``accelerator.prepare(model, ...)``.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        metrics: metric objects or names (``"gradient_flow"``, ``"fisher"``, ...).
        probe: a :class:`Probe`, a list of batches, a map-style dataset (sampled with
            ``seed``, padded by :func:`~uma_callbacks.engine.probe.pad_collate`) or an
            *unprepared* DataLoader (its first batches). Every rank must build the same
            probe (checked across ranks); each then measures its own shard.
        global_step: a callable returning the global step at save time (e.g.
            ``lambda: state.step``), or an int (the initial ``handle.step``); ``None``:
            set ``handle.step`` before each ``save_state``.
        trackers: ``None`` (the accelerator's trackers), ``[]`` (journal only), names
            (``"wandb"``, ``"mlflow"``) and/or sink objects.
        output_dir: the journal folder; ``None``: ``<accelerator.project_dir or cwd>/uma``.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; ``None`` for the HF default.
        model_index: which of the accelerator's prepared models to measure.
        **config: other :class:`~uma_callbacks.config.UMAConfig` fields (``probe_size``,
            ``probe_batch_size``, ``seed``, ``use_cache``, ``draw_figures``, ...).

    Returns:
        A :class:`UMAHandle`; ``handle.remove()`` undoes this call.

    Raises:
        ValueError: bad configuration (naming the field), no probe, probes that differ
            across ranks, or a ``global_step`` that is neither callable nor an int.
        ModuleNotFoundError: a named tracker's package is missing (names the pip extra).

    Example:
        >>> import tempfile
        >>> from accelerate import Accelerator
        >>> acc = Accelerator(cpu=True)
        >>> model = acc.prepare(torch.nn.Linear(3, 1))
        >>> batches = [{"x": torch.randn(4, 3)}]
        >>> out = tempfile.mkdtemp()
        >>> handle = attach(acc, ["gradient_flow"], batches, trackers=[], output_dir=out + "/uma",
        ...                 loss_fn=lambda m, b: m(b["x"]).sum(-1), draw_figures=False)
        >>> handle.step = 100  # the global step of the next save
        >>> _ = acc.save_state(out + "/ckpt")
        >>> [(r.step, r.metric, r.status) for r in handle.records]
        [(100, 'gradient_flow', 'ok')]
        >>> read_state(out + "/ckpt")["step"]
        100
        >>> handle.remove()
    """
    from uma_callbacks.triggers.trainer import _check_tracker_packages  # noqa: PLC0415

    if config.get("every_n_steps") is not None:
        raise ValueError("attach: every_n_steps is not supported (no step events); call handle.measure(step) instead")
    cfg = UMAConfig(metrics=metrics, trackers=trackers, output_dir=output_dir, loss_fn=loss_fn, **config)
    _check_tracker_packages(cfg.trackers)
    if probe is None:
        raise ValueError("attach: probe is required (a Probe, a list of batches, a dataset or an unprepared DataLoader)")
    step: int | None = None
    step_fn: Callable[[], int] | None = None
    if callable(global_step):
        step_fn = global_step
    elif isinstance(global_step, int) and not isinstance(global_step, bool) and global_step >= 0:
        step = global_step
    elif global_step is not None:
        raise ValueError(f"attach: global_step must be a callable, a non-negative int or None; got {global_step!r}")
    if isinstance(model_index, bool) or not isinstance(model_index, int) or model_index < 0:
        raise ValueError(f"attach: model_index must be a non-negative int; got {model_index!r}")
    frozen = _build_probe(probe, cfg)
    collective = current_collective()
    _check_same_probe(frozen, collective)
    handle = UMAHandle(accelerator, cfg, frozen, step_fn, step, model_index, collective)
    handle._hook_handle = accelerator.register_save_state_pre_hook(handle._hook)
    return handle


def _build_probe(probe: Any, cfg: UMAConfig) -> Probe:
    if isinstance(probe, Probe):
        return probe
    if isinstance(probe, (list, tuple)):
        if not probe:
            raise ValueError("attach: probe is empty; pass batches with at least one sample")
        if isinstance(probe[0], Mapping) and not any(isinstance(v, torch.Tensor) for v in probe[0].values()):
            return Probe.from_dataset(
                list(probe), cfg.probe_size, batch_size=cfg.probe_batch_size, seed=cfg.seed, collate_fn=pad_collate
            )
        return Probe(list(probe))
    if hasattr(probe, "__len__") and hasattr(probe, "__getitem__"):
        return Probe.from_dataset(probe, cfg.probe_size, batch_size=cfg.probe_batch_size, seed=cfg.seed, collate_fn=pad_collate)
    if hasattr(probe, "__iter__"):
        return Probe.from_dataloader(probe, cfg.probe_size)
    raise ValueError(
        f"attach: probe must be a Probe, a list of batches, a map-style dataset or a DataLoader; got {type(probe).__name__}"
    )


def _check_same_probe(probe: Probe, collective: Collective) -> None:
    """Ranks must share the probe (a prepared DataLoader would give each rank its own)."""
    if collective.world_size == 1:
        return
    mine = float(int(probe.fingerprint[:8], 16))
    total = torch.tensor([mine, mine * mine], dtype=torch.float64)
    collective.sum_([total])
    if abs(collective.world_size * total[1].item() - total[0].item() ** 2) > 1e-6 * max(1.0, total[1].item()):
        raise ValueError(
            "attach: probe differs across ranks; build it from the dataset (not a prepared DataLoader) "
            "so every rank holds the same samples"
        )
