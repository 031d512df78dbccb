"""``UMALightningCallback``: measure the model whenever a Lightning ``Trainer`` saves a checkpoint.

Needs the ``lightning`` package (``pip install 'uma-callbacks[lightning]'``); importing
``uma_callbacks`` never imports it, only this module does. A thin adapter from Lightning's
callback hooks onto a :class:`~uma_callbacks.session.Session`, like ``UMACallback`` for the
HF Trainer:

- ``on_train_start``: start the session with this trigger's defaults: the probe (the
  dataset passed, else the datamodule's val, then train dataloader, else the trainer's train
  dataloader; drawn with ``seed`` and collated by the train dataloader's ``collate_fn``) and
  the trackers (``trackers=None``: the runs of ``trainer.loggers`` are joined:
  ``MLFlowLogger`` by its run id and tracking URI, ``WandbLogger`` by its run,
  ``TensorBoardLogger`` by its ``log_dir``); a training resumed from a ``.ckpt``
  (``ckpt_path=``) continues the run id this callback saved in it (Lightning keeps a
  callback's ``state_dict`` in the checkpoint);
- ``on_save_checkpoint``: ``session.measure(model, trainer.global_step, optimizer=trainer.optimizers)``,
  on every rank (Lightning calls it on every rank while it builds the checkpoint); the
  session shards the probe across ranks and sums, rank 0 journals and logs, as under the HF
  Trainer. The trainer's live optimizers (their state now, named after the measured
  model's parameters by identity) reach the metrics that read them (``optimizer_state``);
- ``on_train_end`` (and ``on_exception``): ``session.finish()``.

The model measured is ``model=`` (a module, an attribute name of the LightningModule or a
callable of it); by default the LightningModule's only direct child that is a transformers
``PreTrainedModel`` (the usual ``self.model``), else the LightningModule itself (then give
``loss_fn``). It is left exactly as found, so training goes on bit for bit as without the
callback. ``ModelCheckpoint(save_weights_only=True)`` skips callbacks' ``on_save_checkpoint``
(Lightning's choice): those saves are not measured, and a warning says so at train start.
The journal is ``<trainer.default_root_dir>/uma`` unless ``output_dir`` is given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from uma_callbacks.config import UMAConfig
from uma_callbacks.core.optimizer_state import OptimizerSnapshot
from uma_callbacks.engine.probe_source import check_probe_source
from uma_callbacks.metrics.base import Metric
from uma_callbacks.session import Session, check_trigger_settings

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("UMALightningCallback needs lightning: pip install 'uma-callbacks[lightning]'") from err

logger = logging.getLogger(__name__)


class UMALightningCallback(Callback):
    """Training-geometry diagnostics at every checkpoint of a Lightning ``Trainer`` run.

    Args:
        metrics: metric objects or names (``"gradient_flow"``, ``"fisher"``, ...).
        probe: a ``datasets.Dataset`` (or any map-style dataset), a :class:`Probe`, a list
            of batches, or None (the datamodule's val, then train dataloader, else the
            trainer's train dataloader).
        probe_size: samples in the frozen probe.
        trackers: None (join ``trainer.loggers``' runs), ``[]`` (journal only), or names
            (``"mlflow"``, ``"wandb"``, ``"tensorboard"``, registered ones) and/or sink objects.
        output_dir: the journal folder; None: ``<trainer.default_root_dir>/uma``.
        memory_budget: None, GB, or a ``MemoryBudget``.
        seed: picks the probe and seeds the estimators.
        model: the module to measure: a module, the name of an attribute of the
            LightningModule (``"model"``), a callable ``f(pl_module) -> Module``, or None
            (see the module docstring).
        config: a whole :class:`~uma_callbacks.config.UMAConfig` instead of the arguments.
        **kwargs: any other ``UMAConfig`` field (``probe_batch_size``, ``loss_fn``,
            ``overhead``, ``timeout_seconds``, ...); ``every_n_steps``, ``log_scalars`` and
            ``measure="async"`` are refused.

    Raises:
        ValueError: bad configuration (at construction), or an unusable probe (at
            ``on_train_start``, before the first training step).

    Example:
        >>> cb = UMALightningCallback(metrics=["gradient_flow"], probe_size=16)
        >>> cb.config.metric_names
        ['gradient_flow']
    """

    def __init__(
        self,
        metrics: Sequence[str | Metric] = ("gradient_flow",),
        probe: Any = None,
        probe_size: int = 64,
        trackers: Sequence[Any] | None = None,
        output_dir: str | None = None,
        memory_budget: Any = None,
        seed: int = 42,
        model: torch.nn.Module | str | Callable[[Any], torch.nn.Module] | None = None,
        config: UMAConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.config = config or UMAConfig(
            metrics=metrics,
            probe_size=probe_size,
            trackers=trackers,
            output_dir=output_dir,
            memory_budget=memory_budget,
            seed=seed,
            **kwargs,
        )
        check_trigger_settings(self.config, "lightning")
        check_probe_source(probe, "UMALightningCallback.probe")
        if model is not None and not (isinstance(model, (torch.nn.Module, str)) or callable(model)):
            raise ValueError(
                f"UMALightningCallback.model must be a module, an attribute name, a callable or None; got {type(model).__name__}"
            )
        self._probe_source = probe
        self._model = model
        self._run: str | None = None  # the run id a resumed training continues (from the .ckpt)
        self.session: Session | None = None

    @property
    def records(self) -> list[Any]:
        """Every record measured so far (all ranks; only rank 0's carry files)."""
        return self.session.records if self.session else []

    @property
    def probe(self) -> Any:
        """The frozen probe (after ``on_train_start``)."""
        return self.session.probe if self.session else None

    @property
    def journal(self) -> Any:
        """The journal (rank 0, after ``on_train_start``)."""
        return self.session.journal if self.session else None

    @property
    def sinks(self) -> list[Any]:
        """The sinks (rank 0, after ``on_train_start``)."""
        return self.session.sinks if self.session else []

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        """What Lightning keeps in the ``.ckpt``: the run id, so a resume continues the run."""
        return {"run": self.session.run} if self.session is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Read the run id back from a ``.ckpt`` (checked when the session continues it)."""
        run = state_dict.get("run") if isinstance(state_dict, dict) else None
        self._run = run if isinstance(run, str) else None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the session: the probe, the trackers (``trainer.loggers``' runs), the cost line."""
        cfg = self.config
        root = cfg.output_dir or os.path.join(trainer.default_root_dir, "uma")
        session = Session(cfg, root, source="lightning")
        names, runs = logger_runs(trainer) if session.is_main else ([], {})
        train_loader = _loader(getattr(trainer, "train_dataloader", None))
        session.start(
            self._probe_source,
            names,
            tracker_runs=runs,
            probe_options={
                "collate_fn": getattr(train_loader, "collate_fn", None),
                "loaders": [*_datamodule_loaders(trainer), *([train_loader] if train_loader is not None else [])],
                "field": "UMALightningCallback.probe",
            },
            run=self._run if int(trainer.global_step) > 0 else None,
        )
        self.session = session
        for callback in getattr(trainer, "checkpoint_callbacks", []):
            if getattr(callback, "save_weights_only", False) and session.is_main:
                logger.warning(
                    "uma: %s saves weights only: Lightning does not call on_save_checkpoint then, so its saves are not measured",
                    type(callback).__name__,
                )
        session.predict_costs(self._the_model(pl_module))

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Measure the model at ``trainer.global_step`` (every rank; a step is measured once), with the trainer's optimizers."""
        if self.session is None:  # a save outside fit (trainer.save_checkpoint before training)
            return
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        optimizer = optimizers or OptimizerSnapshot.unavailable("the Lightning trainer holds no optimizer")
        self.session.measure(self._the_model(pl_module), int(trainer.global_step), optimizer=optimizer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Finish the session: deliver what a tracker missed, close the runs it opened."""
        if self.session is not None:
            self.session.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training failed: deliver what is journalled and close the runs the session opened."""
        if self.session is not None:
            self.session.finish()

    def _the_model(self, pl_module: Any) -> torch.nn.Module:
        """The module measured: ``model=`` as given, else the LightningModule's only transformers model, else itself.

        Raises:
            ValueError: ``model`` names an attribute that is not a module.
        """
        chosen = self._model
        if isinstance(chosen, torch.nn.Module):
            return chosen
        if isinstance(chosen, str):
            found = pl_module
            for part in chosen.split("."):
                found = getattr(found, part, None)
            if not isinstance(found, torch.nn.Module):
                raise ValueError(f"UMALightningCallback.model: {chosen!r} is not a module of {type(pl_module).__name__}")
            return found
        if chosen is not None:
            return chosen(pl_module)
        try:
            from transformers import PreTrainedModel
        except ImportError:  # transformers is a dependency; without it, the module itself
            return pl_module
        inner = [child for child in pl_module.children() if isinstance(child, PreTrainedModel)]
        return inner[0] if len(inner) == 1 else pl_module


def logger_runs(trainer: Any) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The tracker names and runs of ``trainer.loggers``: ``(names, {name: {"run", "uri"}})``.

    ``MLFlowLogger``: its run id and tracking URI; ``WandbLogger``: its run's id (the run
    this process has open is joined); ``TensorBoardLogger``: its ``log_dir``. Other loggers
    are left out (pass ``trackers=`` for them).
    """
    names: list[str] = []
    runs: dict[str, dict[str, str]] = {}
    for item in getattr(trainer, "loggers", None) or []:
        kind = type(item).__name__
        if kind == "MLFlowLogger":
            run = item.run_id  # creates the run if the logger has not yet
            uri = getattr(item, "_tracking_uri", None) or ""
            names.append("mlflow")
            runs["mlflow"] = {"run": str(run or ""), "uri": str(uri)}
        elif kind == "WandbLogger":
            experiment = item.experiment  # wandb.init if the logger has not yet
            names.append("wandb")
            runs["wandb"] = {"run": str(getattr(experiment, "id", "") or ""), "uri": ""}
        elif kind == "TensorBoardLogger":
            names.append("tensorboard")
            runs["tensorboard"] = {"run": os.path.abspath(item.log_dir), "uri": ""}
    return list(dict.fromkeys(names)), runs


def _loader(obj: Any) -> Any:
    """A DataLoader from what ``trainer.train_dataloader`` holds (a loader, or the first of a list or dict)."""
    if isinstance(obj, dict):
        obj = next(iter(obj.values()), None)
    elif isinstance(obj, (list, tuple)):
        obj = obj[0] if obj else None
    return obj if obj is not None and hasattr(obj, "dataset") else None


def _datamodule_loaders(trainer: Any) -> list[Any]:
    """The datamodule's val, then train dataloader (those it defines)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return []
    out = []
    for name in ("val_dataloader", "train_dataloader"):
        try:
            loader = _loader(getattr(datamodule, name)())
        except Exception as err:  # noqa: BLE001 (a datamodule that does not define it raises)
            logger.debug("uma: datamodule.%s() not used for the probe (%s)", name, err)
            continue
        if loader is not None:
            out.append(loader)
    return out
