"""MLflow sink: ``MlflowClient`` calls with an explicit run id only.

Fluent calls (``mlflow.log_metric``) open stray runs, so every write names the run.
The run is the one ``report_to=["mlflow"]`` opened (its id is captured at
``on_train_begin``: ``MLflowCallback`` ends its run before user callbacks see
``on_train_end``), a run id the user gives, or a new run in a local SQLite store.

Idempotent per (run, key, step): before logging a key, the sink reads that key's
history once and skips steps already present, so replaying a checkpoint adds no points.
A write that fails forgets those keys' history, so the retry re-reads it from the server.

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
from pathlib import Path
from typing import Any

from uma_callbacks.engine.records import Record

from uma_callbacks.integrations.base import Sink

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
def bounded_http(uri: str | None):
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
    """``sqlite:///<folder>/mlflow.db`` (MLflow 3's plain file store raises)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


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

    # ------------------------------------------------------------------ run
    def capture_active_run(self) -> bool:
        """Join the fluent active run (the one ``MLflowCallback`` opened), if any."""
        active = self._mlflow.active_run()
        if active is not None and self._run_id is None:
            self._run_id = active.info.run_id
            self._tracking_uri = self._tracking_uri or self._mlflow.get_tracking_uri()
            return True
        return False

    def start(self) -> None:
        if self._client is not None:
            return
        if self._run_id is None:
            self.capture_active_run()
        uri = self._tracking_uri
        if uri is None:
            env_uri = os.environ.get("MLFLOW_TRACKING_URI")
            if env_uri:
                uri = env_uri
            elif self._fallback_dir is not None:
                Path(self._fallback_dir).mkdir(parents=True, exist_ok=True)
                uri = default_tracking_uri(self._fallback_dir)
            else:
                uri = self._mlflow.get_tracking_uri()
        self._tracking_uri = uri
        self._client = _BoundedClient(self._mlflow.tracking.MlflowClient(tracking_uri=uri), uri)
        if self._run_id is None:
            experiment = self._client.get_experiment_by_name(self._experiment_name)
            experiment_id = (
                experiment.experiment_id if experiment else self._client.create_experiment(self._experiment_name)
            )
            run = self._client.create_run(experiment_id, run_name=self._run_name)
            self._run_id = run.info.run_id
            logger.info("uma: opened MLflow run %s in %s", self._run_id, uri)

    def run_id(self) -> str:
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

    def log_record(self, record: Record, root: Path) -> None:
        from mlflow.entities import Metric as MlflowMetric  # noqa: PLC0415 (optional extra)

        self.start()
        timestamp = int(record.meta.get("timestamp_ms", 0)) or None
        metrics = []
        for key, value in record.log_values().items():
            if not math.isfinite(value):
                continue
            steps = self._steps_logged(key)
            if record.step in steps:
                continue
            metrics.append(MlflowMetric(key, value, timestamp or _now_ms(), record.step))
        try:
            for start in range(0, len(metrics), 900):  # the batch API caps at 1000 entries
                self._client.log_batch(self._run_id, metrics=metrics[start : start + 900])
        except Exception:
            for metric in metrics:  # unknown what reached the server: re-read on the retry
                self._history.pop(metric.key, None)
            raise
        for metric in metrics:
            self._history[metric.key].add(record.step)
        if record.status not in ("ok", "cached"):
            message = (record.error or {}).get("message", "")
            self._client.set_tag(self._run_id, f"uma.{record.metric}.status", record.status)
            self._client.set_tag(self._run_id, f"uma.{record.metric}.error", f"step {record.step}: {message}"[:5000])
        for rel in record.files:
            path = Path(root) / rel
            if path.is_file():
                self._client.log_artifact(self._run_id, str(path), artifact_path=f"uma/step-{record.step}")

    def log_params(self, params: dict[str, Any]) -> None:
        self.start()
        for key, value in params.items():
            key = f"uma.{key}"
            if key in self._params_logged:
                continue
            text = str(value)[:_PARAM_MAX]
            try:
                self._client.log_param(self._run_id, key, text)
            except self._mlflow.exceptions.MlflowException as err:  # a param may not change value
                logger.warning("uma: MLflow kept the earlier value of param %s (%s)", key, err)
            self._params_logged.add(key)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
