"""``UMACallback``: measure the model whenever the Trainer saves a checkpoint.

A thin adapter from ``TrainerCallback`` events onto a :class:`~uma_callbacks.session.Session`
(every other event keeps its no-op default):

- ``on_train_begin``: start the session (:meth:`~uma_callbacks.session.Session.start`)
  with this trigger's defaults: the probe (the dataset passed, else the eval, else the
  train dataset, drawn with ``seed`` and collated by the Trainer's own collator) and the
  trackers (``args.report_to``, when ``trackers`` is None; the MLflow run id is captured
  then, since ``MLflowCallback`` ends its run before user callbacks see ``on_train_end``);
  a fresh training is a new run (a new id, a new tracker run); a resumed one (``global_step``
  is already the checkpoint's) continues the run that saved the checkpoint: same id, same
  tracker run, and it measures now, on the checkpoint's weights, what that save left
  unmeasured (a ``kill -9`` mid-save), logged at the checkpoint's step;
- ``on_save``: the checkpoint folder is complete: mark it with the run's id
  (``uma_run.json``), then ``session.measure(model, global_step)``;
- ``on_step_end``: file the figures drawn since the last save (a worker thread draws them,
  off the training path: :mod:`~uma_callbacks.engine.late_figures`); with
  ``every_n_steps``, also measure between saves;
- ``on_log``: with ``spike``, offer the logged ``loss`` (or ``grad_norm``) to the spike
  detector; at a spike, measure ``spike_metrics`` on the model in memory, at that step
  (:mod:`~uma_callbacks.triggers.spike`: the weights after that step's update, records
  ``spike`` and ``spike/<metric>``);
- ``on_train_end``: ``session.finish()`` (file the figures still drawing, deliver what a
  tracker missed, close our runs); a training that ends by an exception has its figures
  filed at interpreter exit, or at ``callback.session.close()``.

With ``measure="async"`` nothing is measured in the training process; the session starts
as above (probe saved, tracker runs joined, params logged) and a watcher (``uma watch``)
measures each checkpoint beside the training, through the announcements of
:mod:`~uma_callbacks.engine.announce` (:class:`~uma_callbacks.triggers.announcing.Announcer`):

- ``on_train_begin``: the ``run`` line (run id, tracker runs, metrics); a resumed training
  continues its run id and writes the line again; its cut-off save is the watcher's;
- ``on_save`` (after the whole checkpoint is written, ``trainer_state.json`` last, and after
  rotation): the run marker and ``config.json``, then the checkpoint's weight files are
  hard-linked into the journal folder and its ``checkpoint`` line appended. Nothing else;
- ``on_train_end``: the ``finished`` line, then ``session.finish()``.

The model is left exactly as found, so a run with the callback trains bit for bit like
one without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from uma_callbacks.checkpoints import ensure_config_json
from uma_callbacks.config import UMAConfig
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe_source import check_probe_source
from uma_callbacks.engine.run_identity import measured_metrics, resumed_run, write_run_marker
from uma_callbacks.integrations.registry import resolve_sinks, tracker_names
from uma_callbacks.metrics.base import Metric
from uma_callbacks.session import Session
from uma_callbacks.triggers.announcing import Announcer, detach_held
from uma_callbacks.triggers.spike import SpikeTrigger, SpikeWatch
from uma_callbacks.triggers.trainer_tensorboard import tensorboard_run


class UMACallback(TrainerCallback):
    """Training-geometry diagnostics at every checkpoint of a ``Trainer`` run.

    Args:
        metrics: metric objects or names (``"gradient_flow"``, ``"fisher"``, ...).
        probe: a ``datasets.Dataset`` (or any map-style dataset), a :class:`Probe`, a
            list of batches, or None (the eval dataset, else the train dataset).
        probe_size: samples in the frozen probe.
        every_n_steps: also measure every N steps between saves.
        trackers: None (follow ``args.report_to``), ``[]`` (journal only), or names
            (``"mlflow"``, ``"wandb"``, registered ones) and/or sink objects.
        output_dir: the journal folder; None: ``<args.output_dir>/uma``.
        memory_budget: None, GB, or a ``MemoryBudget``.
        seed: picks the probe and seeds the estimators.
        measure: ``"inline"`` (measure at each save, in this process) or ``"async"``
            (announce each complete checkpoint for ``uma watch`` to measure beside the
            training; see the module doc).
        spike: a :class:`~uma_callbacks.core.spike.SpikeTrigger`: also measure at a training
            log whose ``loss`` (or ``grad_norm``) is a robust outlier of its window, on the
            model in memory (:mod:`~uma_callbacks.triggers.spike`); None: no detection.
        spike_metrics: the metric names measured at a spike; None: every configured one that
            neither compares checkpoints nor reads the optimizer.
        config: a whole :class:`~uma_callbacks.config.UMAConfig` instead of the arguments.
        **kwargs: any other ``UMAConfig`` field (``probe_batch_size``, ``timeout_seconds``,
            ``loss_fn``, ``save_tensors``, ...).

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
        measure: str = "inline",
        spike: SpikeTrigger | None = None,
        spike_metrics: Sequence[str] | None = None,
        config: UMAConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self.config = config or UMAConfig(
            metrics=metrics,
            probe_size=probe_size,
            every_n_steps=every_n_steps,
            trackers=trackers,
            output_dir=output_dir,
            memory_budget=memory_budget,
            seed=seed,
            measure=measure,
            spike=spike,
            spike_metrics=spike_metrics,
            **kwargs,
        )
        check_probe_source(probe, "UMACallback.probe")
        self._probe_source = probe
        self.session: Session | None = None
        self.announcer: Announcer | None = None
        cfg = self.config
        names = set(cfg.spike_metric_names)
        self.spike: SpikeWatch | None = (
            SpikeWatch(cfg.spike, [m for m in cfg.metric_objects if m.name in names]) if cfg.spike is not None else None
        )

    @property
    def records(self) -> list[Any]:
        """Every record measured so far (all ranks; only rank 0's carry files)."""
        return self.session.records if self.session else []

    @property
    def probe(self) -> Any:
        """The frozen probe (after ``on_train_begin``)."""
        return self.session.probe if self.session else None

    @property
    def journal(self) -> Any:
        """The journal (rank 0, after ``on_train_begin``)."""
        return self.session.journal if self.session else None

    @property
    def sinks(self) -> list[Any]:
        """The sinks (rank 0, after ``on_train_begin``)."""
        return self.session.sinks if self.session else []

    # ------------------------------------------------------------------ events
    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: torch.nn.Module | None = None,
        train_dataloader: Any = None,
        eval_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        """Start the session with this trigger's defaults; a resumed training continues its run and completes its cut-off save."""
        cfg = self.config
        root = cfg.output_dir or os.path.join(args.output_dir, "uma")
        session = Session(cfg, root, source="callback")
        step = int(state.global_step)  # > 0: resumed from a checkpoint saved at this step
        run = _resumed_run(session.journal, args, step) if step > 0 and session.journal is not None else None
        session.start(
            self._probe_source,
            _tracker_entries(args, None),  # report_to, when trackers is None
            probe_options={
                "collate_fn": getattr(train_dataloader, "collate_fn", None),
                "loaders": [loader for loader in (eval_dataloader, train_dataloader) if loader is not None],
                "field": "UMACallback.probe",
            },
            run=run,
            tracker_runs=tensorboard_run(args),  # report_to=["tensorboard"]: the Trainer's own log folder
        )
        self.session = session
        if cfg.measure == "async":
            self.announcer = Announcer(session, args.output_dir)
            self.announcer.run()
            return
        if model is not None:  # one line: what each metric will cost per save, before the first step
            session.predict_costs(model)
        if step > 0:
            self._complete_resumed_save(model, step)

    def _complete_resumed_save(self, model: Any, step: int) -> None:
        """Measure, at ``step``, the metrics the run holds no finished record of there (the save was cut off).

        The model is the one the Trainer just loaded from that checkpoint.
        """
        session = self.session
        if session is None or model is None:
            return
        names = session.config.metric_names
        done = measured_metrics(session.journal, session.run, step) if session.journal is not None else set()
        # every rank measures the same metrics: rank 0, which reads the journal, decides
        missing = torch.tensor([0.0 if name in done else 1.0 for name in names], dtype=torch.float64)
        if session.collective.world_size > 1:
            if not session.is_main:
                missing.zero_()
            session.collective.sum_([missing])
        todo = [name for name, flag in zip(names, missing.tolist()) if flag > 0]
        if todo:  # the budget of a save without training time before it: seconds_per_save only
            session.measure(model, step, only=todo, seconds=session.compute_budget(None))

    def on_step_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        """With ``every_n_steps``, measure between saves (a save step is measured by :meth:`on_save`).

        With ``measure="async"``, before a save into a checkpoint folder that exists already
        (a resumed training saving that step again), its held files are unlinked so that the
        save does not rewrite the watcher's copy in place.
        """
        if self.announcer is not None:
            self._before_save(args, state, control)
            return
        if self.session is not None:  # file the figures drawn off the training path since the last save
            self.session.collect_figures()
        n = self.config.every_n_steps
        if n and state.global_step % n == 0 and not _is_save_step(args, state):
            self._measure(model, state.global_step, state, kwargs.get("optimizer"))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, model: torch.nn.Module | None = None, **kwargs: Any
    ) -> None:
        """With ``spike``: offer the log to the spike detector; at a spike, measure at ``global_step`` (every rank).

        The cost of a log without a spike is stated in :mod:`uma_callbacks.core.spike`. The
        logged values are the same on every rank (the Trainer gathers the loss), so every
        rank decides alike.
        """
        if self.spike is not None:
            self.spike.on_log(self.session, model, int(state.global_step), logs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """With ``measure="async"``: as :meth:`on_step_end`, for a save at the end of an epoch."""
        if self.announcer is not None:
            self._before_save(args, state, control)

    def on_save(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        """Mark the checkpoint folder with the run's id, measure the model at the global step, and write a missing ``config.json``.

        With ``measure="async"``: mark it, write a missing ``config.json``, and announce it
        (its weight files held, then its line); nothing is measured.
        """
        if self.announcer is not None:
            self._announce_save(args, state, model)
            return
        if self.session is not None and self.session.is_main:  # before measuring: a kill -9 then keeps it
            write_run_marker(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), self.session.run, state.global_step)
        self._measure(model, state.global_step, state, kwargs.get("optimizer"))
        if self.session is not None and self.session.is_main and model is not None:
            # a sharded save (FSDP SHARDED_STATE_DICT) writes no config.json; the backfill needs it
            ensure_config_json(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), getattr(model, "module", model))

    def on_train_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        """Finish the session: deliver what a tracker missed, close the runs it opened.

        With ``measure="async"``, the ``finished`` line comes first.
        """
        if self.announcer is not None:
            self.announcer.finished(state.global_step)
        if self.session is not None:
            self.session.finish()

    def _announce_save(self, args: Any, state: Any, model: Any) -> None:
        """``measure="async"``: the checkpoint folder is complete; mark it and announce it (rank 0)."""
        session, announcer = self.session, self.announcer
        assert session is not None and announcer is not None
        if session.collective.world_size > 1:
            session.collective.barrier()  # every rank has written its part of the checkpoint
        if not session.is_main:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        write_run_marker(folder, session.run, state.global_step)
        if model is not None:
            ensure_config_json(folder, getattr(model, "module", model))
        announcer.checkpoint(state.global_step, folder)

    def _before_save(self, args: Any, state: Any, control: Any) -> None:
        if getattr(control, "should_save", False) and self.session is not None and self.session.is_main:
            detach_held(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def _measure(self, model: Any, step: int, state: Any = None, optimizer: Any = None) -> None:
        if model is None or self.session is None:
            return
        # the session counts the training time since its last measurement; the optimizer is the Trainer's (its state now)
        log_history = getattr(state, "log_history", None) if state is not None else None  # the learning rates so far
        records = self.session.measure(model, step, optimizer=optimizer, log_history=log_history)
        if self.config.log_scalars and state is not None and records:
            values = {
                f"uma/{r.metric}/{name}": value
                for r in records
                for name, value in r.scalars.items()
                if f"{r.metric}/{name}" in self.config.log_scalars and value == value
            }
            if values:
                state.log_history.append({**values, "step": step})


def trainer_sinks(
    args: Any,
    trackers: Sequence[Any] | None,
    root: str | os.PathLike[str],
    reopen: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[list[Any], list[Any]]:
    """``(sinks, own)`` for a Trainer run: ``trackers``, else the tracker names in ``args.report_to`` that have a sink.

    Other ``report_to`` names are the Trainer's business. The sinks come from the one resolver
    (:func:`~uma_callbacks.integrations.registry.resolve_sinks`, as
    :meth:`Session.add_sinks <uma_callbacks.session.Session.add_sinks>` calls it).

    ``reopen``: ``{tracker name: {"run", "uri"}}``, the tracker runs a resumed training
    continues; other names open or join runs as usual.
    """
    return resolve_sinks(trackers, default=_tracker_entries(args, None), runs=reopen, fallback_dir=root)


def _tracker_entries(args: Any, trackers: Sequence[Any] | None) -> list[Any]:
    if trackers is not None:
        return list(trackers)
    report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
    return [name for name in report_to if name in tracker_names()]


def _resumed_run(journal: Journal, args: Any, step: int) -> str | None:
    """The run a training resumed at ``step`` continues (its checkpoint folder's marker, else the journal)."""
    folders = [os.path.join(args.output_dir, f"checkpoint-{step}")]
    given = getattr(args, "resume_from_checkpoint", None)
    if isinstance(given, str) and given:
        folders.insert(0, given)
    return resumed_run(journal, step, folders)


def _is_save_step(args: Any, state: Any) -> bool:
    strategy = str(getattr(args, "save_strategy", ""))
    steps = getattr(args, "save_steps", 0)
    return strategy.endswith("steps") and isinstance(steps, int) and steps > 0 and state.global_step % steps == 0
