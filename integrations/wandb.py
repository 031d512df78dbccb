"""W&B sink: the ``uma/*`` history on its own ``uma/step`` axis, figures, tables, artifacts.

The run is the one ``report_to=["wandb"]`` opened (``wandb.run``, joined at
``on_train_begin``), a run object the user gives (e.g. Accelerate's
``accelerator.get_tracker("wandb", unwrap=True)``), or a new run opened at :meth:`start`
(``wandb.init``; the mode follows ``WANDB_MODE``, so ``offline`` needs no network).

The x-axis: W&B drops a ``step=`` lower than the run's current step, and
``wandb.log(commit=False)`` inside ``on_save`` lands on the next history row. So the sink
never passes ``step=``: it binds ``uma/*`` to ``uma/step`` (``define_metric("uma/*",
step_metric="uma/step")``, plus each exact key as it first appears, since exact
definitions outrank the ``"*"`` glob the Trainer's ``WandbCallback`` defines) and logs
each record as one committed row holding ``uma/step`` and the record's values.

Per record, in that one row:

- scalars ``uma/<metric>/<scalar>`` (and ``seconds``, ``peak_mb``);
- the record's outcome as a number, ``uma/<metric>/status_code`` (0 ok, 1 partial, 2 skipped,
  3 timeout, 4 interrupted, 5 error: :mod:`~uma_callbacks.integrations.status_codes`), in
  every record's row, so a chart shows at which steps a metric failed;
- figures: each PNG in ``record.files`` as ``uma/<metric>/figures/<name>`` (a
  ``wandb.Image``: landscape heatmap, spectrum, gradient flow per layer);
- per-module values as a ``wandb.Table`` ``uma/<metric>/modules`` with columns
  ``step, module, metric, value`` (from the ``layers/<module>/<scalar>`` scalars);
- native charts under ``uma/<metric>/charts/`` (:mod:`~uma_callbacks.integrations.wandb_charts`):
  ``top_eigenvalues`` (``wandb.plot.line_series`` over the steps, the earlier ones read from
  the journal), ``grid`` (the landscape as a ``wandb.Table`` heatmap), ``layers/<scalar>``
  (``wandb.plot.bar``, one bar per module); a chart that fails is left out, never the values;

then the record's files (JSON, npz, PNG, safetensors) as an artifact of type
``uma-results`` named ``uma-<run id>-<metric>-step-<N>``, each file keeping its journal folder
(``step-N/fisher.json``, ``step-N/fisher-<config hash>/fisher.json`` for a backfill's other
config). The latest outcome goes to the run summary (``uma/<metric>/status``;
``uma/<metric>/error`` only while a failure is shown; ``uma/<metric>/skipped`` for a skip's
reason, apart from errors). Params merge into the run config once per value: another
config's under ``uma.<metric>-<config hash>.config``.

Keys go through :func:`~uma_callbacks.integrations.base.tracker_key` (the same mapping
as MLflow's, so both trackers show the same names). Only files inside the journal folder
are logged. Every public method keeps the global RNGs as they were. A failed
``wandb.init`` is retried, at most once per :attr:`WandbSink.retry_interval` seconds (an
unreachable server costs ``WANDB_INIT_TIMEOUT`` per try), with nothing kept from the
failed try.

Idempotent per (run, step, key): the journal's delivery log skips records delivered in an
earlier process, and the sink keeps the (step, key) pairs it logged in this one.

A second process writing into a run another process has open (``uma watch`` beside a
training, ``writer_label=``) joins it the way W&B documents for several processes logging to
one run: shared mode, ``wandb.init(id=run, settings=wandb.Settings(mode="shared",
x_primary=False, x_label=writer_label, x_update_finish_state=False))``: the training's
process stays the primary writer and alone decides the run's final state, and this one's
rows carry no ``step=`` (shared mode ignores it; the ``uma/step`` axis is used). Shared mode
needs a W&B server: with ``WANDB_MODE=offline`` the process writes its own offline run file
under the same run id (``resume="allow"``), which ``wandb sync --id RUN`` uploads into the
run after the training's own file (files synced together go in order of start time).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import PREFIX, Record
from uma_callbacks.integrations.base import (
    Sink,
    artifact_folder,
    keeps_rng,
    param_key,
    tracker_key,
    uploadable_files,
)
from uma_callbacks.integrations.status import parse_step, skip_text, status_updates
from uma_callbacks.integrations.status_codes import status_values
from uma_callbacks.integrations.wandb_charts import SeriesHistory, record_charts

logger = logging.getLogger(__name__)

_INSTALL = "WandbSink needs wandb: pip install 'uma-callbacks[wandb]'"
#: The step metric every ``uma/*`` key is plotted against.
STEP_KEY = f"{PREFIX}/step"
_LAYER_KEY = re.compile(r"^layers/(?P<module>.+)/(?P<scalar>[^/]+)$")
_ARTIFACT_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _import_wandb() -> Any:
    try:
        import wandb  # the only place the package is imported
    except ImportError as err:
        raise ModuleNotFoundError(_INSTALL) from err
    if wandb is None:  # pragma: no cover - sys.modules entry blocked
        raise ModuleNotFoundError(_INSTALL)
    return wandb


class WandbSink(Sink):
    """Log records to a W&B run.

    Args:
        run: a ``wandb`` Run to log to; ``None`` joins ``wandb.run`` if one is open, else
            opens a run at :meth:`start`.
        project: project of a new run (default ``WANDB_PROJECT``, else ``uma-callbacks``).
        run_name: name of a new run.
        dir: folder of a new run's files when ``WANDB_DIR`` is unset.
        log_artifacts: upload each record's files as an artifact.
        init_kwargs: more keyword arguments for ``wandb.init`` (``entity``, ``tags``, ...).
        retry_interval: seconds after a failed ``wandb.init`` during which :meth:`start`
            raises again at once instead of trying (0: try at every call).
        run_id: the id of a run to resume (``wandb.init(id=..., resume="allow")``).
        fallback_dir: ``dir`` when none is given (the registry's common option: the journal folder).
        writer_label: join ``run_id`` as a second writer while another process has it open
            (shared mode, labelled so; offline: a run file of its own under that id); see
            the module docstring.
        log_charts: log the native charts of :mod:`~uma_callbacks.integrations.wandb_charts`
            (eigenvalues over steps, the landscape heatmap, per-module bars).

    Raises:
        ModuleNotFoundError: wandb is not installed (names the pip extra).
    """

    name = "wandb"

    def __init__(
        self,
        run: Any = None,
        project: str | None = None,
        run_name: str | None = None,
        dir: str | os.PathLike[str] | None = None,  # noqa: A002 (wandb's own name)
        log_artifacts: bool = True,
        init_kwargs: dict[str, Any] | None = None,
        retry_interval: float = 60.0,
        run_id: str | None = None,
        fallback_dir: str | os.PathLike[str] | None = None,
        writer_label: str | None = None,
        log_charts: bool = True,
    ) -> None:
        super().__init__()
        self._wandb = _import_wandb()
        self._run = run
        self._project = project
        self._run_name = run_name
        self._dir = dir if dir is not None else fallback_dir
        self._log_artifacts = log_artifacts
        self._init_kwargs = dict(init_kwargs or {})
        if run_id:
            self._init_kwargs.setdefault("id", run_id)
            self._init_kwargs.setdefault("resume", "allow")
        if writer_label and run_id and not _offline(self._init_kwargs.get("mode")):
            self._init_kwargs.pop("resume", None)  # shared mode joins the open run; it does not resume it
            self._init_kwargs.setdefault(
                "settings",
                self._wandb.Settings(mode="shared", x_primary=False, x_label=writer_label, x_update_finish_state=False),
            )
        self._writer_label = writer_label if run_id else None
        self._own = False
        self._bound_run: str | None = None
        self._defined: set[str] = set()
        self._logged: set[tuple[int, str]] = set()
        #: ``{metric: (status, step)}`` the run's summary shows (:mod:`~uma_callbacks.integrations.status`)
        self._shown: dict[str, tuple[str, int | None]] = {}
        self._init_error: BaseException | None = None
        self._failed_at = -math.inf
        self.retry_interval = float(retry_interval)
        self._refused_files: set[str] = set()
        self._log_charts = bool(log_charts)
        self._history = SeriesHistory()

    # ------------------------------------------------------------------ run
    @keeps_rng
    def capture_active_run(self) -> bool:
        """Join ``wandb.run`` (the run ``report_to=["wandb"]`` opened), if one is open."""
        active = self._wandb.run
        if self._run is None and active is not None:
            self._run = active
            return True
        return False

    @keeps_rng
    def start(self) -> None:
        """Join or open the run, and bind ``uma/*`` to ``uma/step``.

        A failed ``wandb.init`` is raised again at once for :attr:`retry_interval`
        seconds (an unreachable server would stall training at every checkpoint), then
        tried again; the records stay in the journal meanwhile. Nothing of a failed try
        is kept.

        Raises:
            RuntimeError: ``wandb.init`` failed less than :attr:`retry_interval` seconds ago
                (chained from that failure); nothing is tried.
            Exception: whatever ``wandb.init`` raised.
        """  # noqa: DOC502 (Exception: wandb.init's own, re-raised)
        if self._run is None and self._writer_label is None:  # a second writer joins its run id, not this process's run
            self.capture_active_run()
        if self._run is None:
            if self._init_error is not None and time.monotonic() - self._failed_at < self.retry_interval:
                raise RuntimeError(f"wandb.init failed earlier: {self._init_error}") from self._init_error
            kwargs: dict[str, Any] = {
                "project": self._project or os.environ.get("WANDB_PROJECT") or "uma-callbacks",
                "name": self._run_name,
                **self._init_kwargs,
            }
            # read WANDB_DIR now: wandb caches its settings from the first run in a process
            folder = os.environ.get("WANDB_DIR") or self._dir
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
                kwargs.setdefault("dir", str(folder))
            if self._writer_label:
                # a second writer needs a wandb service of its own: one inherited from the process
                # that started this one (WANDB_SERVICE) already streams this run id and refuses it
                os.environ.pop("WANDB_SERVICE", None)
            try:
                run = self._wandb.init(**kwargs)
            except Exception as err:  # remembered, re-raised to the caller that reports it
                self._init_error, self._failed_at = err, time.monotonic()
                raise
            self._run, self._init_error = run, None
            self._own = True
            logger.info("uma: opened W&B run %s (mode %s)", self._run.id, os.environ.get("WANDB_MODE", "online"))
        if self._bound_run != self._run.id:
            self._run.define_metric(STEP_KEY)
            self._run.define_metric(f"{PREFIX}/*", step_metric=STEP_KEY)
            self._bound_run = self._run.id
            self._defined = set()

    def run_id(self) -> str:
        """The W&B run id (empty before :meth:`start`)."""
        return str(self._run.id) if self._run is not None else ""

    @property
    def run(self) -> Any:
        """The wandb Run (after :meth:`start`)."""
        return self._run

    @property
    def owns_run(self) -> bool:
        """Whether this sink opened the run (and :meth:`finish` closes it)."""
        return self._own

    # ------------------------------------------------------------------ writes
    def _bind(self, key: str) -> None:
        if key not in self._defined:
            self._run.define_metric(key, step_metric=STEP_KEY)
            self._defined.add(key)

    @keeps_rng
    def log_record(self, record: Record, root: Path) -> None:
        """Log one record as one row on the ``uma/step`` axis (see the module docstring)."""
        self.start()
        wandb = self._wandb
        step = int(record.step)
        row: dict[str, Any] = {}
        for key, value in {**record.log_values(), **status_values(record)}.items():
            key = tracker_key(key)
            if math.isfinite(value) and (step, key) not in self._logged:
                row[key] = value
        files = uploadable_files(Path(root), record, self._refused_files)
        for path in (p for p in files if p.suffix == ".png"):
            key = tracker_key(f"{PREFIX}/{record.metric}/figures/{_figure_name(record.metric, path)}")
            if (step, key) not in self._logged:
                try:
                    row[key] = wandb.Image(str(path), caption=f"{record.metric} at step {step}")
                except Exception as err:  # noqa: BLE001 (a damaged PNG on disk: left out, the record goes on)
                    logger.warning("uma: figure %s not logged to W&B: unreadable (%s: %.200s)", path, type(err).__name__, err)
        for path in (p for p in files if p.suffix == ".csv"):
            key = tracker_key(f"{PREFIX}/{record.metric}/tables/{_figure_name(record.metric, path)}")
            if (step, key) not in self._logged:
                table = _csv_table(wandb, path)
                if table is not None:
                    row[key] = table
        table_key = tracker_key(f"{PREFIX}/{record.metric}/modules")
        rows = _module_rows(record)
        if rows and (step, table_key) not in self._logged:
            row[table_key] = wandb.Table(columns=["step", "module", "metric", "value"], data=rows)
        charts = {k: v for k, v in self._charts(record, Path(root), files).items() if (step, k) not in self._logged}
        if row or charts:
            for key in (*row, *(f"{k}_table" for k in charts)):  # a chart's history key is its table's
                self._bind(key)
            try:
                self._run.log({STEP_KEY: step, **row, **charts})
            except Exception as err:
                if not charts:
                    raise
                # a chart W&B could not take never costs the record's values: the row again without them
                logger.debug("uma: charts of %s at step %d not logged (%s: %.200s)", record.metric, step, type(err).__name__, err)
                charts = {}
                if row:
                    self._run.log({STEP_KEY: step, **row})
            self._logged.update((step, key) for key in (*row, *charts))
        self._show_status(record)  # the latest step with a value, or a newer failure
        summary = record.meta.get("summary") if isinstance(record.meta, dict) else None
        for name, value in (summary if isinstance(summary, dict) else {}).items():  # one-off findings (early bird)
            if isinstance(value, (int, float, str)):
                self._run.summary[tracker_key(f"{PREFIX}/{record.metric}/{name}")] = value
        folders = sorted({artifact_folder(Path(root), p) for p in files})
        artifact_key = f"artifact:{record.metric}:{','.join(folders)}"  # another folder (config, run) is other files
        if self._log_artifacts and files and (step, artifact_key) not in self._logged:
            name = _ARTIFACT_SAFE.sub("-", f"uma-{self.run_id()}-{record.metric}-step-{step}")
            artifact = wandb.Artifact(name=name, type="uma-results", metadata={"step": step, "metric": record.metric})
            for path in files:  # each file keeps its folder (step-N/fisher-<config hash>/ for another config)
                artifact.add_file(str(path), name=f"{artifact_folder(Path(root), path)}/{path.name}")
            self._run.log_artifact(artifact)
            self._logged.add((step, artifact_key))

    def _charts(self, record: Record, root: Path, files: list[Path]) -> dict[str, Any]:
        """The record's native charts (:func:`~uma_callbacks.integrations.wandb_charts.record_charts`); ``{}`` if off or failing."""
        if not self._log_charts:
            return {}
        try:
            return record_charts(self._wandb, record, root, files, self._history)
        except Exception as err:  # noqa: BLE001 (a chart never costs the record's values)
            logger.debug("uma: charts of %s at step %s skipped (%s: %.200s)", record.metric, record.step, type(err).__name__, err)
            return {}

    def _show_status(self, record: Record) -> None:
        """Set the summary's latest outcome by :func:`~uma_callbacks.integrations.status.status_updates`.

        ``uma/<metric>/status`` and ``status_step``; ``error`` only while a failure is shown
        (removed when a value is shown: a good rerun leaves no stale error); ``skipped`` with
        the latest skip's reason, apart from errors. The values follow from what the run's
        summary shows (a resumed run keeps the live run's).
        """
        for update in status_updates(self._shown_of, record):
            key = tracker_key(f"{PREFIX}/{update.metric}/status")
            step_key = tracker_key(f"{PREFIX}/{update.metric}/status_step")
            error_key = tracker_key(f"{PREFIX}/{update.metric}/error")
            self._run.summary[key], self._run.summary[step_key] = update.shown
            self._shown[update.metric] = update.shown
            if update.error is not None:
                self._run.summary[error_key] = update.error
            elif self._summary_get(error_key) is not None:  # a value is shown now: the error is stale
                del self._run.summary[error_key]
        skipped = skip_text(record)
        if skipped is not None:
            self._run.summary[tracker_key(f"{PREFIX}/{record.metric}/skipped")] = skipped

    def _shown_of(self, metric: str) -> tuple[str, int | None] | None:
        """``(status, step)`` the run shows for ``metric`` (from this sink, else the run's summary)."""
        if metric not in self._shown:
            old = self._summary_get(tracker_key(f"{PREFIX}/{metric}/status"))
            if not isinstance(old, str):
                return None
            self._shown[metric] = (old, parse_step(self._summary_get(tracker_key(f"{PREFIX}/{metric}/status_step"))))
        return self._shown[metric]

    def _summary_get(self, key: str) -> Any:
        try:
            return self._run.summary.get(key)
        except Exception:  # noqa: BLE001 (a summary that cannot be read back: as if empty)
            return None

    @keeps_rng
    def log_params(self, params: dict[str, Any]) -> None:
        """Merge ``params`` into the run config under ``uma.``: each value once.

        A value the run's config holds is not set again; another value for a key it holds (a
        backfill's other config) goes under ``uma.<metric>-<config hash>.config``
        (:func:`~uma_callbacks.integrations.base.param_key`), the first kept.
        """
        self.start()
        config = self._run.config
        held = {k: _canonical(config.get(k)) for k in config.keys() if str(k).startswith("uma.")}
        fresh = {}
        for key, value in params.items():
            target = param_key(f"uma.{key}", _canonical(value), value, held)
            if target is not None:
                fresh[target] = value
                held[target] = _canonical(value)
        if fresh:
            self._run.config.update(fresh, allow_val_change=True)

    @keeps_rng
    def finish(self) -> None:
        """Finish the run if this sink opened it (flushes the run file)."""
        if self._own and self._run is not None:
            self._run.finish()
            self._run = None
            self._own = False
            self._bound_run = None


def _canonical(value: Any) -> str:
    """``value`` as sorted JSON (a config read back from the run compares equal to the one given)."""
    import json

    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):  # keys that do not sort (mixed types): their text
        return str(value)


def _offline(mode: Any) -> bool:
    """Whether runs are written locally only (``mode`` given, else ``WANDB_MODE``): no shared mode then."""
    chosen = mode if isinstance(mode, str) and mode else os.environ.get("WANDB_MODE", "")
    return chosen.lower() in ("offline", "dryrun", "disabled")


def _figure_name(metric: str, path: Path) -> str:
    stem = path.stem
    for prefix in (f"{metric}-", f"{metric}_"):
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    return stem


_CSV_MAX_BYTES = 4 * 2**20
_CSV_MAX_ROWS = 10_000
_CSV_MAX_COLUMNS = 256


def _csv_table(wandb: Any, path: Path) -> Any:
    """A record's CSV file as a ``wandb.Table`` (numbers as floats, empty cells as None), or None.

    Bounded: at most 4 MiB, 10,000 rows and 256 columns; a ragged, unreadable or larger file
    is left out with a warning (it still travels in the record's artifact).
    """  # noqa: DOC501 (raised and caught inside: the file is left out)
    import csv

    try:
        if path.stat().st_size > _CSV_MAX_BYTES:
            raise ValueError(f"over {_CSV_MAX_BYTES} bytes")
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or len(header) > _CSV_MAX_COLUMNS:
                raise ValueError("no header, or too many columns")
            data: list[list[Any]] = []
            for cells in reader:
                if len(data) >= _CSV_MAX_ROWS:
                    raise ValueError(f"over {_CSV_MAX_ROWS} rows")
                if len(cells) != len(header):
                    raise ValueError(f"row {len(data) + 2} has {len(cells)} cells, the header {len(header)}")
                data.append([_csv_cell(cell) for cell in cells])
        return wandb.Table(columns=header, data=data)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as err:
        logger.warning("uma: table %s not logged to W&B (%s: %.200s); it is in the record's artifact", path, type(err).__name__, err)
        return None


def _csv_cell(cell: str) -> Any:
    if cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _module_rows(record: Record) -> list[list[Any]]:
    rows = []
    for key, value in sorted(record.scalars.items()):
        match = _LAYER_KEY.match(key)
        if match and isinstance(value, (int, float)) and math.isfinite(value):
            rows.append([int(record.step), match["module"], match["scalar"], float(value)])
    return rows
