"""MLflow sink: ``MlflowClient`` calls with an explicit run id only.

Fluent calls (``mlflow.log_metric``) open stray runs, so every write names the run.
The run is the one ``report_to=["mlflow"]`` opened (its id is captured at
``on_train_begin``: ``MLflowCallback`` ends its run before user callbacks see
``on_train_end``), a run id the user gives, or a new run in a local SQLite store.

Idempotent per (run, key, step): before logging a key, the sink reads that key's
history once and skips steps already present, so replaying a checkpoint adds no points.
A write that fails forgets those keys' history, so the retry re-reads it from the server.

Files keep their folder under ``uma/``: ``uma/step-N/<file>`` for the run's own,
``uma/step-N/<metric>-<config hash>/`` for a backfill with another config and
``uma/step-N/<metric>-run-<run>/`` for a second training in the same folder, as in the
journal; nothing replaces the live run's files. Params are logged once per value: a value
the run holds is not sent again, and another config's params go under
``uma.<metric>-<config hash>.config`` (MLflow refuses a changed param). Status tags follow
the latest outcome (:mod:`~uma_callbacks.integrations.status`): ``uma.<metric>.error`` only
while a failure is shown, ``uma.<metric>.skipped`` for a skip's reason; each record's outcome is
also a metric at its step, ``uma/<metric>/status_code`` (:mod:`~uma_callbacks.integrations.status_codes`).

Keys go through :func:`~uma_callbacks.integrations.base.tracker_key` (what MLflow
accepts; ``heads.c++.weight`` gets a safe, unique form). A batch MLflow refuses as
invalid (``INVALID_PARAMETER_VALUE``) is sent again point by point: the points MLflow
refuses are warned about once each and noted in :attr:`MLflowSink.rejected`, the others
arrive (a refused point is never retried, so it cannot block the records after it).

:meth:`MLflowSink.start` is retryable: it changes nothing until the run exists (client,
run id and URI are set together at the end), so a start that failed (server down) is
simply tried again at the next delivery; params given while it could not start are
logged at the first start that works. Every public method keeps the global RNGs as they
were (:func:`~uma_callbacks.integrations.base.rng_preserved`: MLflow names new runs with
Python's ``random``). Only files inside the journal folder are uploaded.

A tracking server that is down must not stall training: MLflow's own HTTP defaults
retry one call for about four minutes (7 retries, backoff factor 2, 120 s timeout;
measured 245 s against a closed port). For ``http(s)://`` and ``databricks`` URIs this
sink's calls run with :data:`HTTP_DEFAULTS` (2 retries, backoff factor 1, 10 s timeout;
a refused connection fails in about 2 s) unless the user set those variables.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import Record
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
from uma_callbacks.integrations.uris import no_stray_folders, sqlite_path, sqlite_uri

logger = logging.getLogger(__name__)

_INSTALL = "MLflowSink needs mlflow: pip install 'uma-callbacks[mlflow]'"
#: MLflow's limit on a param value's length.
_PARAM_MAX = 500
#: MLflow HTTP settings for this sink's calls to a remote store (variables already set win).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@contextlib.contextmanager
def bounded_http(uri: str | None) -> Iterator[None]:
    """Apply :data:`HTTP_DEFAULTS` (those not set by the user) for a remote ``uri``, and undo after."""
    remote = str(uri or "").startswith(("http://", "https://", "databricks"))
    missing = {k: v for k, v in HTTP_DEFAULTS.items() if remote and k not in os.environ}
    os.environ.update(missing)
    try:
        yield
    finally:
        for key in missing:
            os.environ.pop(key, None)


class _BoundedClient:
    """An ``MlflowClient`` whose every call runs under :func:`bounded_http`."""

    def __init__(self, client: Any, uri: str | None) -> None:
        self._inner, self._uri = client, uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with bounded_http(self._uri):
                return attr(*args, **kwargs)

        return call


def _import_mlflow() -> Any:
    try:
        import mlflow  # the only place the package is imported
    except ImportError as err:
        raise ModuleNotFoundError(_INSTALL) from err
    return mlflow


def default_tracking_uri(folder: str | os.PathLike[str]) -> str:
    """``sqlite:///<folder>/mlflow.db``, escaped; MLflow 3's plain file store raises.

    The escaping is :func:`~uma_callbacks.integrations.uris.sqlite_uri`'s: a folder named
    ``a%41b`` or ``a?b`` is reached as it is.

    Raises:
        ValueError: the folder's path is not valid UTF-8.
    """  # noqa: DOC502 (from sqlite_uri)
    return sqlite_uri(Path(folder).resolve() / "mlflow.db")


def _artifact_location(uri: str) -> str | None:
    """A new experiment's artifact folder in a local SQLite store: beside the store.

    MLflow's default, ``./mlruns``, is in the current directory, outside the run folder.
    """
    path = sqlite_path(uri)
    return (path.parent / "mlflow-artifacts").as_uri() if path is not None and path.is_absolute() else None


class MLflowSink(Sink):
    """Log records to an MLflow run.

    Args:
        run_id: join this run; ``None`` joins the active fluent run if any, else creates
            a run (in ``experiment_name``) at :meth:`start`.
        tracking_uri: where the store is; ``None`` uses MLflow's current URI
            (``MLFLOW_TRACKING_URI``), or ``fallback_dir``'s SQLite file if given.
        experiment_name: experiment for a new run.
        run_name: name of a new run.
        fallback_dir: folder of the SQLite store used when no URI is configured.

    Raises:
        ModuleNotFoundError: mlflow is not installed (names the pip extra).
    """

    name = "mlflow"

    def __init__(
        self,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str = "uma-callbacks",
        run_name: str | None = None,
        fallback_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self._mlflow = _import_mlflow()
        self._tracking_uri = tracking_uri
        self._fallback_dir = fallback_dir
        self._run_id = run_id
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._client: Any = None
        self._history: dict[str, set[int]] = {}
        self._params_logged: set[str] = set()
        #: ``{metric: (status, step)}`` the run shows (:mod:`~uma_callbacks.integrations.status`); read from it once
        self._shown: dict[str, tuple[str, int | None]] | None = None
        self._shown_tags: dict[str, str] = {}
        self._params_pending: dict[str, tuple[str, Any]] = {}
        #: ``{key: value}`` of the params the run holds (read once, then kept current); ``None`` until read
        self._held_params: dict[str, str] | None = None
        self._refused_files: set[str] = set()
        #: ``{tracker key: MLflow's reason}`` of points MLflow refused (warned about once each).
        self.rejected: dict[str, str] = {}

    # ------------------------------------------------------------------ run
    @keeps_rng
    def capture_active_run(self) -> bool:
        """Join the fluent active run (the one ``MLflowCallback`` opened), if any."""
        active = self._mlflow.active_run()
        if active is not None and self._run_id is None:
            self._run_id = active.info.run_id
            self._tracking_uri = self._tracking_uri or self._mlflow.get_tracking_uri()
            return True
        return False

    @keeps_rng
    def start(self) -> None:
        """Join or create the run; a no-op once started, and retryable after a failure.

        Nothing is kept from a failed attempt: the client, run id and URI are set only
        once the run exists (created here on the first start that reaches the store).

        Raises:
            Exception: whatever MLflow raised (server down, bad URI); the next call retries.
        """  # noqa: DOC502 (raised by MLflow, passed on)
        if self._client is not None:
            return
        run_id = self._run_id
        uri = self._tracking_uri
        if run_id is None:
            active = self._mlflow.active_run()
            if active is not None:
                run_id = active.info.run_id
                uri = uri or self._mlflow.get_tracking_uri()
        if uri is None:
            env_uri = os.environ.get("MLFLOW_TRACKING_URI")
            if env_uri:
                uri = env_uri
            elif self._fallback_dir is not None:
                Path(self._fallback_dir).mkdir(parents=True, exist_ok=True)
                uri = default_tracking_uri(self._fallback_dir)
            else:
                uri = self._mlflow.get_tracking_uri()
        with no_stray_folders(uri):  # MLflow makes a folder from an escaped URI's raw text
            client = _BoundedClient(self._mlflow.tracking.MlflowClient(tracking_uri=uri), uri)
            if run_id is None:
                experiment = client.get_experiment_by_name(self._experiment_name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment
                    else client.create_experiment(self._experiment_name, artifact_location=_artifact_location(uri))
                )
                run_id = client.create_run(experiment_id, run_name=self._run_name).info.run_id
                logger.info("uma: opened MLflow run %s in %s", run_id, uri)
        self._client, self._run_id, self._tracking_uri = client, run_id, uri
        self._flush_params()

    def run_id(self) -> str:
        """The MLflow run id (``""`` until :meth:`start` has joined or created the run)."""
        return self._run_id or ""

    @property
    def tracking_uri(self) -> str | None:
        """The store this sink writes to."""
        return self._tracking_uri

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` (after :meth:`start`)."""
        self.start()
        return self._client

    # ------------------------------------------------------------------ writes
    def _steps_logged(self, key: str) -> set[int]:
        if key not in self._history:
            history = self._client.get_metric_history(self._run_id, key)
            self._history[key] = {m.step for m in history}
        return self._history[key]

    @keeps_rng
    def log_record(self, record: Record, root: Path) -> None:
        """Log the record's finite values at ``record.step`` (steps the run holds are skipped), its status and files."""
        from mlflow.entities import Metric as MlflowMetric  # noqa: PLC0415 (optional extra)

        self.start()
        self._flush_params()
        timestamp = _timestamp_ms(record.meta)
        metrics = []
        for key, value in {**record.log_values(), **status_values(record)}.items():
            key = tracker_key(key)
            if not math.isfinite(value) or key in self.rejected:
                continue
            steps = self._steps_logged(key)
            if record.step in steps:
                continue
            metrics.append(MlflowMetric(key, value, timestamp or _now_ms(), record.step))
        for start in range(0, len(metrics), 900):  # the batch API caps at 1000 entries
            self._log_batch(metrics[start : start + 900])
        self._show_status(record)  # the latest outcome: status, error and skip tags
        for name, value in _summary(record).items():  # one-off findings (the early-bird step) as tags
            self._client.set_tag(self._run_id, tracker_key(f"uma.{record.metric}.{name}"), str(value)[:5000])
        for path in uploadable_files(Path(root), record, self._refused_files):
            # the file keeps its folder: step-N/fisher-<config hash>/ (a backfill's other config) or
            # step-N/fisher-run-<run>/ (a second training) never replaces the live step-N/fisher.json
            self._client.log_artifact(self._run_id, str(path), artifact_path=f"uma/{artifact_folder(Path(root), path)}")

    def _show_status(self, record: Record) -> None:
        """Tag the latest outcome by :func:`~uma_callbacks.integrations.status.status_updates`.

        ``uma.<metric>.status`` and ``.status_step``; ``.error`` only while a failure is shown
        (removed when a value is shown: a good rerun leaves no stale error); ``.skipped`` with
        the latest skip's reason, apart from errors. The tags follow from what the run shows
        (read once per sink: a backfill continues the live run's tags).
        """
        from mlflow.entities import RunTag  # noqa: PLC0415 (optional extra)

        if self._shown is None:
            self._shown_tags = dict(self._client.get_run(self._run_id).data.tags)
            self._shown = {}
        for update in status_updates(self._shown_of, record):
            key = tracker_key(f"uma.{update.metric}.status")
            step_key = tracker_key(f"uma.{update.metric}.status_step")
            tags = [RunTag(key, update.shown[0]), RunTag(step_key, str(update.shown[1]))]
            error_key = tracker_key(f"uma.{update.metric}.error")
            if update.error is not None:
                tags.append(RunTag(error_key, update.error))
            self._client.log_batch(self._run_id, tags=tags)
            self._shown[update.metric] = update.shown
            if update.error is not None:
                self._shown_tags[error_key] = update.error
            elif self._shown_tags.pop(error_key, None) is not None:  # a value is shown now: the error is stale
                self._delete_tag(error_key)
        skipped = skip_text(record)
        if skipped is not None:
            self._client.set_tag(self._run_id, tracker_key(f"uma.{record.metric}.skipped"), skipped)

    def _shown_of(self, metric: str) -> tuple[str, int | None] | None:
        """``(status, step)`` the run shows for ``metric`` (from this sink, else the run's tags)."""
        assert self._shown is not None
        if metric not in self._shown:
            key = tracker_key(f"uma.{metric}.status")
            if key not in self._shown_tags:
                return None
            step_key = tracker_key(f"uma.{metric}.status_step")
            self._shown[metric] = (self._shown_tags[key], parse_step(self._shown_tags.get(step_key)))
        return self._shown[metric]

    def _delete_tag(self, key: str) -> None:
        try:
            self._client.delete_tag(self._run_id, key)
        except self._mlflow.exceptions.MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":  # gone already: what was wanted
                raise

    def _log_batch(self, metrics: list[Any]) -> None:
        """One batch; if MLflow refuses it as invalid, point by point (refused points noted, the rest sent)."""
        if not metrics:
            return
        try:
            self._client.log_batch(self._run_id, metrics=metrics)
        except self._mlflow.exceptions.MlflowException as err:
            self._forget(metrics)
            if not _is_invalid(err) or len(metrics) == 1:
                if _is_invalid(err):
                    self._reject(metrics[0].key, err)
                    return
                raise
            for metric in metrics:
                try:
                    self._client.log_batch(self._run_id, metrics=[metric])
                except self._mlflow.exceptions.MlflowException as one:
                    if not _is_invalid(one):
                        self._forget([metric])
                        raise
                    self._reject(metric.key, one)
                    continue
                self._steps_logged(metric.key).add(metric.step)
            return
        except Exception:
            self._forget(metrics)
            raise
        for metric in metrics:
            self._history[metric.key].add(metric.step)

    def _forget(self, metrics: list[Any]) -> None:
        for metric in metrics:  # unknown what reached the server: re-read on the retry
            self._history.pop(metric.key, None)

    def _reject(self, key: str, err: BaseException) -> None:
        if key not in self.rejected:
            logger.error("uma: MLflow refused the key %r (%s); its points are skipped, the others go on", key, err)
        self.rejected[key] = str(err)[:500]

    @keeps_rng
    def log_params(self, params: dict[str, Any]) -> None:
        """Log ``uma.<key>`` params; kept until a start works if MLflow is down.

        A value the run holds is not logged again; another value for a key the run holds (a
        backfill's other config) goes under ``uma.<metric>-<config hash>.config``
        (:func:`~uma_callbacks.integrations.base.param_key`): MLflow never sees a param change.
        """
        for key, value in params.items():
            key = tracker_key(f"uma.{key}")
            if key not in self._params_logged:
                self._params_pending[key] = (str(value)[:_PARAM_MAX], value)
        self.start()
        self._flush_params()

    def _flush_params(self) -> None:
        if not self._params_pending:
            return
        if self._held_params is None:
            self._held_params = dict(self._client.get_run(self._run_id).data.params)
        for key, (text, value) in list(self._params_pending.items()):
            self._log_param(key, text, value)
            self._params_logged.add(key)
            del self._params_pending[key]

    def _log_param(self, key: str, text: str, value: Any) -> None:
        """Log one param where :func:`~uma_callbacks.integrations.base.param_key` says.

        MLflow refusing it (another process logged the key meanwhile) re-reads the run's
        params and tries once more; MLflow's own text (a page of advice) is never passed on.
        """
        assert self._held_params is not None
        for attempt in range(2):
            target = param_key(key, text, value, self._held_params)
            if target is None:
                return
            try:
                self._client.log_param(self._run_id, target, text)
            except self._mlflow.exceptions.MlflowException as err:
                if not _is_invalid(err):
                    raise  # the store is down: kept pending, retried at the next call
                self._held_params = dict(self._client.get_run(self._run_id).data.params)
                if attempt:
                    logger.warning("uma: MLflow did not take param %s (%s); the run keeps what it holds", target, err.error_code)
                continue
            self._held_params[target] = text
            return


def _is_invalid(err: BaseException) -> bool:
    """Whether MLflow refused the request itself (bad key or value), not failed to reach the store."""
    return getattr(err, "error_code", "") == "INVALID_PARAMETER_VALUE"


#: The latest timestamp a record may carry (9999-12-31 in ms); beyond it MLflow's store overflows.
_MAX_TIMESTAMP_MS = 253_402_300_799_999


def _timestamp_ms(meta: Any) -> int | None:
    """``meta["timestamp_ms"]`` when it is a plausible time in ms (1970 to 9999), else None (now is used).

    Records come from disk: ``"abc"``, ``10**30``, ``-5``, ``NaN`` or ``True`` must not stop a
    record, nor every record after it, from being delivered.
    """
    value = meta.get("timestamp_ms") if isinstance(meta, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not (isinstance(value, int) or math.isfinite(value)) or not 0 < value <= _MAX_TIMESTAMP_MS:
        return None
    return int(value)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _summary(record: Record) -> dict[str, Any]:
    """``record.meta["summary"]``: values a metric found once (e.g. ``early_bird_step``), as a dict."""
    summary = record.meta.get("summary") if isinstance(record.meta, dict) else None
    return {str(k): v for k, v in summary.items() if isinstance(v, (int, float, str))} if isinstance(summary, dict) else {}
