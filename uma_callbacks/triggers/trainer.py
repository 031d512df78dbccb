"""``UMACallback``: measure the model whenever the Trainer saves a checkpoint.

Events used (every other ``TrainerCallback`` event keeps its no-op default):

- ``on_train_begin``: freeze the probe (from the dataset the user passed, else the eval
  dataset, else the train dataset, drawn with ``seed`` and collated by the Trainer's own
  collator; no RNG is consumed), check it, open the journal, join the tracker runs
  ``report_to`` opened (the MLflow run id is captured here, since ``MLflowCallback`` ends
  its run before user callbacks see ``on_train_end``);
- ``on_save``: the checkpoint folder is complete; measure at ``state.global_step``;
- ``on_step_end``: with ``every_n_steps``, also measure between saves;
- ``on_train_end``: deliver anything a tracker missed, finish the sinks we opened.

The model is left exactly as found (weights, ``training`` flags, ``.grad``, attention
implementation, global RNG state), so a run with the callback trains bit for bit like
one without it.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from uma_callbacks.engine.budget import as_budget, param_bytes
from uma_callbacks.config import TRACKER_NAMES, UMAConfig
from uma_callbacks.core.distributed import current_collective
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics.base import Metric
from uma_callbacks.engine.probe import Probe, count_samples, pad_collate, save_probe
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.engine.suite import MetricSuite

logger = logging.getLogger(__name__)


@contextmanager
def all_rngs_preserved():
    """Restore Python's, NumPy's and torch's global RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class UMACallback(TrainerCallback):
    """Training-geometry diagnostics at every checkpoint of a ``Trainer`` run.

    Args:
        metrics: metric objects or names (``"gradient_flow"``, ``"fisher"``, ...).
        probe: a ``datasets.Dataset`` (or any map-style dataset), a :class:`Probe`, a
            list of batches, or None (the eval dataset, else the train dataset).
        probe_size: samples in the frozen probe.
        every_n_steps: also measure every N steps between saves.
        trackers: None (follow ``args.report_to``), ``[]`` (journal only), or names
            (``"mlflow"``, ``"wandb"``) and/or sink objects.
        output_dir: the journal folder; None: ``<args.output_dir>/uma``.
        memory_budget: None, GB, or a ``MemoryBudget``.
        seed: picks the probe and seeds the estimators.
        **kwargs: any other :class:`~uma_callbacks.config.UMAConfig` field
            (``probe_batch_size``, ``timeout_seconds``, ``loss_fn``, ``save_tensors``, ...).

    Raises:
        ValueError: bad configuration (at construction), or an unusable probe
            (at ``on_train_begin``, before the first training step).

    Example:
        >>> cb = UMACallback(metrics=["gradient_flow"], probe_size=16)
        >>> cb.config.metric_names
        ['gradient_flow']
    """

    def __init__(
        self,
        metrics: Sequence[str | Metric] = ("gradient_flow",),
        probe: Any = None,
        probe_size: int = 64,
        every_n_steps: int | None = None,
        trackers: Sequence[Any] | None = None,
        output_dir: str | None = None,
        memory_budget: Any = None,
        seed: int = 42,
        **kwargs: Any,
    ) -> None:
        self.config = UMAConfig(
            metrics=metrics,
            probe_size=probe_size,
            every_n_steps=every_n_steps,
            trackers=trackers,
            output_dir=output_dir,
            memory_budget=memory_budget,
            seed=seed,
            **kwargs,
        )
        _check_probe_source(probe)
        _check_tracker_packages(self.config.trackers)
        self._probe_source = probe
        self.probe: Probe | None = None
        self.journal: Journal | None = None
        self.suite: MetricSuite | None = None
        self.sinks: list[Any] = []
        self._own_sinks: list[Any] = []
        self._measured: set[int] = set()
        self._previous: tuple[int, dict[str, torch.Tensor]] | None = None
        self.records: list[Any] = []

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None, **kwargs):
        collate = getattr(train_dataloader, "collate_fn", None)
        with all_rngs_preserved():
            self.probe = self._build_probe(train_dataloader, eval_dataloader, collate)
        _check_probe_usable(self.probe, self.config.loss_fn)
        collective = current_collective()
        root = Path(self.config.output_dir or os.path.join(args.output_dir, "uma"))
        if collective.rank == 0:
            self.journal = Journal(root, save_tensors=self.config.save_tensors)
            try:
                save_probe(self.probe, root)  # `uma backfill` rebuilds the very same probe from it
            except ValueError as err:  # custom batch types: the backfill then needs the probe passed in
                logger.warning("uma: the probe was not saved for backfills (%s)", err)
            self.sinks = self._resolve_sinks(args, root)
        self.suite = MetricSuite(
            metrics=self.config.metric_objects,
            journal=self.journal,
            sinks=self.sinks,
            collective=collective,
            loss_fn=self.config.loss_fn,
            use_cache=self.config.use_cache,
            draw_figures=self.config.draw_figures,
            source="callback",
            aggressive_cleanup=self.config.aggressive_cleanup,
            budget=as_budget(self.config.memory_budget),
            timeout_seconds=self.config.timeout_seconds,
        )
        for sink in self.sinks:
            try:
                sink.start()
                sink.log_params(self._params())
            except Exception as err:  # a tracker outage must not stop training
                logger.warning(
                    "uma: sink %s could not start (%s: %s); journal only for now, `uma sync` replays it later",
                    sink.name,
                    type(err).__name__,
                    err,
                )
                self.suite._failed_sinks.add(sink.name)  # one warning, not one per checkpoint

    def on_step_end(self, args, state, control, model=None, **kwargs):
        n = self.config.every_n_steps
        if n and state.global_step % n == 0 and not _is_save_step(args, state):
            self._measure(model, state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.suite is not None:
            self.suite.deliver_pending()
        for sink in self._own_sinks:
            try:
                sink.finish()
            except Exception as err:  # a tracker outage must not fail the run's end
                logger.warning("uma: sink %s did not finish cleanly (%s)", sink.name, err)

    # ------------------------------------------------------------------ internals
    def _measure(self, model: torch.nn.Module | None, step: int) -> None:
        if model is None or self.suite is None or self.probe is None or step in self._measured:
            return
        self._measured.add(step)
        if self.suite.collective is not None and self.suite.collective.world_size > 1:
            # every rank has finished writing the checkpoint before anyone measures or reads it
            self.suite.collective.barrier()
        fingerprint = weights_fingerprint(model) if self.config.use_cache else ""
        logger.info("uma: measuring %s at step %d", ", ".join(self.config.metric_names), step)
        context = {}
        if self._previous is not None:
            context = {"previous_weights": self._previous[1], "previous_label": f"step-{self._previous[0]}"}
        self.records.extend(self.suite.run(model, self.probe, step=step, checkpoint=fingerprint, context=context))
        if "interpolation" in self.config.metric_names:
            self._previous = self._keep_weights(model, step)

    def _keep_weights(self, model: torch.nn.Module, step: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """A CPU copy of the trainable weights for the next interpolation, if host memory allows."""
        self._previous = None  # free the older copy first
        needed = param_bytes(model)
        budget = as_budget(None).limit_bytes("cpu")
        if needed > budget:
            logger.warning(
                "uma: previous checkpoint not kept for interpolation: needs %.0f MiB, %.0f MiB free", needed / 2**20, budget / 2**20
            )
            return None
        return step, {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def _build_probe(self, train_dataloader: Any, eval_dataloader: Any, collate: Any) -> Probe:
        source = self._probe_source
        cfg = self.config
        if isinstance(source, Probe):
            return source
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], Mapping) and _is_batch(source[0]):
            return Probe(list(source))
        if source is None:
            for loader in (eval_dataloader, train_dataloader):
                dataset = getattr(loader, "dataset", None)
                if dataset is not None and hasattr(dataset, "__len__"):
                    source = dataset
                    collate = getattr(loader, "collate_fn", collate)
                    break
            else:
                if train_dataloader is None:
                    raise ValueError("UMACallback.probe is None and the Trainer has no dataloader to draw it from")
                return Probe.from_dataloader(train_dataloader, cfg.probe_size)
        return Probe.from_dataset(
            source, cfg.probe_size, batch_size=cfg.probe_batch_size, seed=cfg.seed, collate_fn=collate or pad_collate
        )

    def _resolve_sinks(self, args: Any, root: Path) -> list[Any]:
        requested = self.config.trackers
        if requested is None:
            report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
            requested = [name for name in report_to if name in TRACKER_NAMES]
        sinks = []
        for tracker in requested:
            if not isinstance(tracker, str):
                sinks.append(tracker)
                continue
            sink = make_sink(tracker, fallback_dir=root)
            if not sink.capture_active_run():
                self._own_sinks.append(sink)
            sinks.append(sink)
        return sinks

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"probe_fingerprint": self.probe.fingerprint if self.probe else ""}
        params["probe_size"] = self.probe.n_samples if self.probe else 0
        for metric in self.config.metric_objects:
            params[f"{metric.name}.config"] = metric.config()
        return params


def make_sink(name: str, fallback_dir: str | os.PathLike[str] | None = None) -> Any:
    """A sink from its tracker name.

    Raises:
        ValueError: unknown name.
        ModuleNotFoundError: the tracker's package is missing (names the pip extra).
    """
    if name == "mlflow":
        from uma_callbacks.integrations.mlflow import MLflowSink

        return MLflowSink(fallback_dir=fallback_dir)
    if name == "wandb":
        from uma_callbacks.integrations.wandb import WandbSink

        return WandbSink(dir=fallback_dir)
    raise ValueError(f"trackers entries must be one of {TRACKER_NAMES!r}; got {name!r}")


def _check_tracker_packages(trackers: Sequence[Any] | None) -> None:
    """Raise at construction when a named tracker's package is missing (names the extra)."""
    from uma_callbacks.integrations.base import require_tracker

    for tracker in trackers or ():
        if isinstance(tracker, str):
            require_tracker(tracker)


def _is_batch(obj: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in obj.values())


def _is_save_step(args: Any, state: Any) -> bool:
    strategy = str(getattr(args, "save_strategy", ""))
    steps = getattr(args, "save_steps", 0)
    return strategy.endswith("steps") and isinstance(steps, int) and steps > 0 and state.global_step % steps == 0


def _check_probe_source(probe: Any) -> None:
    if probe is None or isinstance(probe, Probe):
        return
    if isinstance(probe, (list, tuple)):
        if len(probe) == 0:
            raise ValueError("UMACallback.probe is empty; pass a dataset or batches with at least one sample")
        return
    if hasattr(probe, "__len__") and hasattr(probe, "__getitem__"):
        if len(probe) == 0:
            raise ValueError("UMACallback.probe is an empty dataset; it must hold at least one sample")
        return
    raise ValueError(
        "UMACallback.probe must be None, a Probe, a list of batches or a map-style dataset; "
        f"got {type(probe).__name__}"
    )


def _check_probe_usable(probe: Probe, loss_fn: Any) -> None:
    first = probe.batches[0]
    if count_samples(first) == 0:
        raise ValueError("UMACallback.probe: the probe has no samples")
    if loss_fn is None and (not isinstance(first, Mapping) or "labels" not in first):
        keys = sorted(first) if isinstance(first, Mapping) else type(first).__name__
        raise ValueError(
            f"UMACallback.probe batches have no 'labels' (keys: {keys}); the default loss needs them: "
            "add labels (e.g. DataCollatorForLanguageModeling) or pass loss_fn"
        )
