"""``attach(accelerator, ...)``: measure the model whenever ``accelerator.save_state()`` runs.

A thin adapter from Accelerate's save-state pre-hook (``hook(models, weights, output_dir)``,
called on every process inside ``save_state``) onto a :class:`~uma_callbacks.session.Session`:

1. the step is the **global step the user gives** (``handle.step = N`` or
   ``attach(..., global_step=lambda: state.step)``; Accelerate's own counters count saves);
2. every rank measures its shard of the probe on the unwrapped model; rank 0 journals and logs;
3. rank 0 writes ``uma_state.json`` (the step, the journal, the records) and the model's
   ``config.json`` into the folder, so ``uma backfill`` finds and rebuilds it alone.

Sinks are resolved at the first save (after ``accelerator.init_trackers``), by
:meth:`Session.add_sinks <uma_callbacks.session.Session.add_sinks>` with this trigger's
default, the accelerator's trackers (``trackers=None``: W&B and MLflow runs joined by our
own sinks, others wrapped); ``handle.remove()`` unregisters the hook and finishes what we
opened.

Settings: ``overhead`` is honoured (the compute budget of a save is that share of the
training time since the last measurement, as in ``UMACallback``); ``every_n_steps`` and
``log_scalars`` (Trainer features) are refused with a ``ValueError``
(:data:`~uma_callbacks.session.UNSUPPORTED`).

Run identity: each ``save_state`` folder is marked with the run's id (``uma_run.json``,
before the save is measured); an ``accelerator.load_state(folder)`` before the first
measurement continues that folder's run (same id: the journal's records of that run are
this session's, and only those are replayed).

``measure="async"``: nothing is measured at a save. The pre-hook runs before Accelerate
writes the state, so no "complete" announcement can be made there; instead the
accelerator instance's ``save_state`` is wrapped (``handle.remove()`` puts it back): after
the original returns on every rank (a barrier when there are several), rank 0 marks the
folder (``uma_run.json``, ``uma_state.json``, ``config.json``) and announces it
(:class:`~uma_callbacks.triggers.announcing.Announcer`: its weight files hard-linked into
``<journal>/held/<folder name>-step-<N>``, then the ``checkpoint`` line; a folder saved
into again keeps one held copy per step, its held files unlinked before the next save
rewrites them). The ``run`` line is written at ``attach`` and again when the tracker runs
are joined (first save) or a ``load_state`` continues another run; ``handle.remove()``
writes the ``finished`` line. The checkpoint folders must be inside the folder that holds
the journal (the watcher's ``RUN_DIR``: ``project_dir``, or ``output_dir``'s parent).
``handle.measure()`` still measures in this process when called.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.checkpoints import ensure_config_json
from uma_callbacks.config import UMAConfig
from uma_callbacks.core.optimizer_state import OptimizerSnapshot
from uma_callbacks.core.records import Record
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.run_identity import read_run_marker, write_run_marker
from uma_callbacks.engine.state_file import STATE_FILE, read_state, write_state  # noqa: F401 (public here too)
from uma_callbacks.integrations.accelerate import AcceleratorTrackerSink, sink_for_tracker  # noqa: F401
from uma_callbacks.metrics.base import Metric
from uma_callbacks.session import Session, check_trigger_settings
from uma_callbacks.triggers.announcing import Announcer, detach_held

logger = logging.getLogger(__name__)


class UMAHandle:
    """What :func:`attach` returns: the step to measure at, the results, and ``remove()``.

    Attributes:
        step: the global step of the next ``save_state`` (set it before each save, or
            give ``global_step=`` to :func:`attach`).
        session: the :class:`~uma_callbacks.session.Session` measuring the model.
    """

    def __init__(
        self,
        accelerator: Any,
        session: Session,
        global_step: Callable[[], int] | None,
        step: int | None,
        model_index: int,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.session = session
        self.step = step
        self._global_step = global_step
        self._model_index = model_index
        self._model = model
        self._hook_handle: Any = None
        self._load_hook_handle: Any = None
        self._sinks_ready = False
        self._predicted = False  # the cost prediction line, once, at the first measurement
        #: ``measure="async"``: the announcements, and the wrapper put on ``accelerator.save_state``
        self.announcer: Announcer | None = None
        self._save_wrapper: Any = None
        self._last_step: int | None = None

    @property
    def config(self) -> UMAConfig:
        """The configuration."""
        return self.session.config

    @property
    def records(self) -> list[Record]:
        """Every record measured through this handle (all ranks; only rank 0's carry files)."""
        return self.session.records

    @property
    def probe(self) -> Probe:
        """The frozen probe."""
        assert self.session.probe is not None
        return self.session.probe

    @property
    def journal(self) -> Any:
        """The journal (rank 0; ``None`` elsewhere)."""
        return self.session.journal

    @property
    def root(self) -> Path:
        """The journal folder."""
        return self.session.root

    @property
    def sinks(self) -> list[Any]:
        """The sinks records go to (rank 0, after the first save)."""
        return self.session.sinks

    def current_step(self) -> int | None:
        """The step the next measurement is filed under (``global_step()`` wins over ``step``)."""
        if self._global_step is not None:
            return int(self._global_step())
        return None if self.step is None else int(self.step)

    def measure(self, step: int | None = None, model: torch.nn.Module | None = None) -> list[Record]:
        """Measure now (every rank must call it): e.g. between saves.

        Args:
            step: the global step; ``None`` uses :meth:`current_step`.
            model: the model; ``None``: the one given to :func:`attach`, else the
                accelerator's ``model_index``-th model, unwrapped.

        Returns:
            The records (empty when the step is unknown or was measured already).

        Raises:
            ValueError: no model to measure (none given and none prepared).
        """  # noqa: DOC502 (from _the_model)
        step = self.current_step() if step is None else int(step)
        if step is None:
            logger.warning(
                "uma: save_state without a global step; set handle.step = N before it, or "
                "attach(..., global_step=callable). Nothing measured."
            )
            return []
        if model is None:
            model = self._the_model(list(getattr(self.accelerator, "_models", [])))
        self._start_sinks()
        if not self._predicted:  # attach has no train-begin event: the line comes before the first save's metrics
            self._predicted = True
            self.session.predict_costs(model)
        # the prepared optimizers' state now, named after the model's parameters (by identity)
        optimizers = list(getattr(self.accelerator, "_optimizers", []))
        optimizer = optimizers or OptimizerSnapshot.unavailable("the accelerator holds no prepared optimizer")
        return self.session.measure(model, step, optimizer=optimizer)

    def remove(self) -> None:
        """Undo :func:`attach`: unregister the hook, deliver pending records, finish our runs.

        With ``measure="async"``: put ``save_state`` back and announce the end of training.
        """
        if self._save_wrapper is not None:
            if vars(self.accelerator).get("save_state") is self._save_wrapper:
                del self.accelerator.save_state
            self._save_wrapper = None
            if self.announcer is not None:
                step = self.current_step() if self._last_step is None else self._last_step
                self.announcer.finished(step if step is not None else 0)
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        if self._load_hook_handle is not None:
            self._load_hook_handle.remove()
            self._load_hook_handle = None
        self.session.finish()

    # ------------------------------------------------------------------ internals
    def _the_model(self, models: list[torch.nn.Module]) -> torch.nn.Module:
        """The model given to :func:`attach`, else the ``model_index``-th prepared one, unwrapped.

        Raises:
            ValueError: none given and the accelerator holds no ``model_index``-th prepared model.
        """
        if self._model is not None:
            return self._model
        if self._model_index >= len(models):
            raise ValueError(
                f"attach: no model to measure: the accelerator holds {len(models)} prepared model(s) and "
                f"model_index is {self._model_index}; prepare the model first, or give it as attach(..., model=model) "
                "(an FSDP2 fully_shard model that accelerator.prepare cannot take)"
            )
        return self.accelerator.unwrap_model(models[self._model_index])

    def _hook(self, models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        step = self.current_step()
        model = self._the_model(list(models)) if step is not None else None
        if self.session.is_main and step is not None:  # before measuring: a kill -9 then keeps it
            os.makedirs(output_dir, exist_ok=True)
            write_run_marker(output_dir, self.session.run, step)
        records = self.measure(step, model)
        if self.session.is_main and step is not None:
            at_step = records or [r for r in self.records if r.step == step]
            write_state(output_dir, step, self.root, self.probe.fingerprint, at_step)
            ensure_config_json(output_dir, model)  # the backfill rebuilds the model from it

    def _wrap_save_state(self) -> None:
        """``measure="async"``: announce each folder after ``accelerator.save_state`` has written it."""
        original = self.accelerator.save_state  # the bound method (or an earlier wrapper)

        def save_state(*args: Any, **kwargs: Any) -> Any:
            folder = args[0] if args else kwargs.get("output_dir")
            step = self.current_step()
            if self.session.is_main and folder is not None and step is not None:
                detach_held(folder)  # the save rewrites files in place: keep the held copies' contents
            location = original(*args, **kwargs)
            self._announce(location if location is not None else folder, step)
            return location

        save_state.__wrapped__ = original  # type: ignore[attr-defined]
        save_state.__doc__ = getattr(original, "__doc__", None)
        self._save_wrapper = save_state
        self.accelerator.save_state = save_state

    def _announce(self, folder: Any, step: int | None) -> None:
        """The save into ``folder`` finished on this rank: mark and announce it (rank 0, after every rank)."""
        if step is None:
            logger.warning(
                "uma: save_state without a global step; set handle.step = N before it, or "
                "attach(..., global_step=callable). Nothing announced."
            )
            return
        if folder is None:
            return
        self._start_sinks()  # the tracker runs exist now (after init_trackers): the run line names them
        if self.session.collective.world_size > 1:
            self.session.collective.barrier()  # every rank has written its part of the state
        if not self.session.is_main or self.announcer is None:
            return
        model = self._the_model(list(getattr(self.accelerator, "_models", [])))
        write_run_marker(folder, self.session.run, step)
        write_state(folder, step, self.root, self.probe.fingerprint, [])
        ensure_config_json(folder, model)  # the watcher and the backfill rebuild the model from it
        self.announcer.checkpoint(step, folder, held_name=f"{Path(folder).name}-step-{step}")
        self._last_step = step

    def _on_load(self, models: list[torch.nn.Module], input_dir: str) -> None:
        """``accelerator.load_state(input_dir)``: a resume continues the folder's run.

        Only when this session has measured nothing yet (else its records already belong to
        its own run).
        """
        run = read_run_marker(input_dir)
        if run is None or run == self.session.run:
            return
        if self.records:
            logger.warning("uma: load_state(%s) after measurements: this session stays run %s", input_dir, self.session.run)
            return
        self.session.continue_run(run)

    def _start_sinks(self) -> None:
        """Resolve the sinks at the first save (after ``accelerator.init_trackers``).

        This trigger's default is the accelerator's trackers.
        """
        if self._sinks_ready:
            return
        self._sinks_ready = True
        self.session.add_sinks(list(getattr(self.accelerator, "trackers", [])))


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
    model: torch.nn.Module | None = None,
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
        model: the model to measure instead of a prepared one. For an FSDP2 model
            (``fully_shard`` applied by the user): on CPU (``MULTI_CPU``) and plain
            multi-GPU runs ``accelerator.prepare(model)`` wraps it in DDP, which fails on its
            DTensor parameters; prepare only the optimizer and dataloaders and give the
            sharded model here. Every rank measures its probe shard on it, each parameter
            staying sharded (see :mod:`uma_callbacks.core.sharding`).
        **config: other :class:`~uma_callbacks.config.UMAConfig` fields (``probe_size``,
            ``probe_batch_size``, ``seed``, ``use_cache``, ``draw_figures``, ``overhead``,
            ``seconds_per_save``, ``measure``, ...); ``every_n_steps`` and ``log_scalars``
            are refused. ``measure="async"`` announces each folder after ``save_state``
            returns, for ``uma watch`` to measure (see the module doc).

    Returns:
        A :class:`UMAHandle`; ``handle.remove()`` undoes this call.

    Raises:
        ValueError: bad configuration (naming the field; ``every_n_steps`` and
            ``log_scalars`` are Trainer settings), no probe, probes that differ across
            ranks, a ``global_step`` that is neither callable nor an int, or a ``model``
            that is not a module.
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
    """  # noqa: DOC502 (ModuleNotFoundError: from UMAConfig's tracker check)
    cfg = config.pop("config", None) or UMAConfig(
        metrics=metrics, trackers=trackers, output_dir=output_dir, loss_fn=loss_fn, **config
    )
    check_trigger_settings(cfg, "accelerate")  # before anything else is checked or built
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
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"attach: model must be a torch.nn.Module or None; got {type(model).__name__}")
    root = Path(cfg.output_dir or os.path.join(accelerator.project_dir or os.getcwd(), "uma"))
    session = Session(cfg, root, source="accelerate")  # refuses the settings attach cannot honour
    # the probe is built and checked across ranks now; the sinks join at the first save,
    # after accelerator.init_trackers (UMAHandle._start_sinks)
    session.start(probe, probe_options={"field": "attach: probe"}, sinks_later=True)
    handle = UMAHandle(accelerator, session, step_fn, step, model_index, model)
    if cfg.measure == "async":
        handle.announcer = Announcer(session, root.parent)
        handle.announcer.run()  # the tracker runs join it at the first save
        handle._wrap_save_state()
    else:
        handle._hook_handle = accelerator.register_save_state_pre_hook(handle._hook)
    handle._load_hook_handle = accelerator.register_load_state_pre_hook(handle._on_load)
    return handle
