"""Issue 17 item 8: an MLflow server down when training begins loses nothing once it comes up.

A real ``mlflow server`` (tests/reliability/servers.py), unreachable at
``on_train_begin`` and up before the save at step 3: the sink's failed start leaves
nothing half-initialised, the session retries it at the next save and at the end, and
every journalled record and the params reach one run. Unreachable, then up: the test
worker's server behind a :class:`~tests.reliability.servers.PortGate` on its port, closed
then opened (the server itself is started once per worker).

The Trainer test needs both halves: ``MLflowSink.start`` retryable (integrations/mlflow.py)
and the session calling ``start`` again at every save and at the end (engine/delivery.py).
"""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from tests.reliability.servers import PortGate
from tests.trainer_cases import run_trainer
from uma_callbacks import UMACallback
from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal

pytest.importorskip("mlflow")

KEY = "uma/gradient_flow/total_norm"


@pytest.fixture
def server(mlflow_server, monkeypatch):
    """The worker's real ``mlflow server``, reached through a gate that is down until started."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)  # the sink's own bounds apply ...
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # ... retried at once: whether the
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")  # records arrive, not when (test_tracker_outage)
    gate = PortGate(mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", gate.uri)
    try:
        yield gate
    finally:
        gate.stop()


def _run_ids(client) -> set[str]:
    return {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


def test_mlflow_sink_start_fails_cleanly_then_works_when_the_store_is_there(tmp_path, monkeypatch):
    """The store unreachable (a file where its folder belongs), then there: the first start that works opens the run."""
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink, default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "later").write_text("not a folder")
    uri = default_tracking_uri(tmp_path / "later")
    sink = MLflowSink(tracking_uri=uri)
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 (whatever MLflow raises for an unreachable store)
            sink.start()
        assert sink.run_id() == "" and sink._client is None  # nothing half-initialised
    with pytest.raises(Exception):  # noqa: B017
        sink.log_params({"probe_fingerprint": "abc"})  # kept until a start works
    (tmp_path / "later").unlink()
    (tmp_path / "later").mkdir()
    sink.start()
    assert sink.run_id()
    sink.log_record(Record(step=1, metric="gradient_flow", status="ok", scalars={"total_norm": 1.0}), tmp_path)
    client = MlflowClient(uri)
    assert client.get_run(sink.run_id()).data.params == {"uma.probe_fingerprint": "abc"}
    assert [m.step for m in client.get_metric_history(sink.run_id(), KEY)] == [1]


class Up(TrainerCallback):
    """Before the UMA callback sees the save at ``at``: start the server."""

    def __init__(self, server: PortGate, at: int) -> None:
        self.server, self.at = server, at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.server.start()


@pytest.mark.slow
def test_server_down_at_train_begin_up_from_step_3_delivers_everything(server, mlflow_server, tmp_path):
    """Passes with the retryable sink start plus the session's start retries at each save and at the end."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    earlier = _run_ids(client)  # other tests' runs in the worker's store
    cb = UMACallback(metrics=["gradient_flow"], probe_size=4, trackers=["mlflow"], draw_figures=False)
    trainer, losses = run_trainer(tmp_path / "run", callbacks=[Up(server, 3), cb], max_steps=6, save_steps=3)
    assert trainer.state.global_step == 6 and len(losses) == 6
    journal = Journal(tmp_path / "run" / "uma")
    records = [r for r in journal.records() if r.metric == "gradient_flow"]
    assert [r.step for r in records] == [3, 6]
    added = _run_ids(client) - earlier
    assert len(added) == 1  # one run, however many starts were tried
    run_id = added.pop()
    assert [m.step for m in client.get_metric_history(run_id, KEY)] == [3, 6]
    assert "uma.probe_fingerprint" in client.get_run(run_id).data.params
    assert journal.delivered("mlflow", run_id) == {r.record_id for r in records}
