"""Tracker outages: a real MLflow server down mid-run, W&B unable to start.

Training finishes, the journal holds every record, and what a tracker missed reaches it
at the next save, at train end or via ``uma sync``, with no duplicate points.

The server goes down and comes back behind a :class:`~tests.reliability.servers.PortGate`
on its port (connections refused, open ones dropped, as when its process dies; the same
store once it is back): the test worker's one real ``mlflow server`` is started once.
"""

from __future__ import annotations

import logging
import os
import time

import pytest
from transformers import TrainerCallback

from tests.reliability.servers import PortGate, free_port
from tests.trainer_cases import run_trainer
from uma_callbacks import UMACallback
from uma_callbacks.engine.journal import Journal

pytest.importorskip("mlflow")

KEY = "uma/gradient_flow/total_norm"


class Outage(TrainerCallback):
    """Before the UMA callback sees a save: stop the server at some steps, start it at others."""

    def __init__(self, server: PortGate, stop_at: set[int], start_at: set[int], seen: dict) -> None:
        self.server, self.stop_at, self.start_at, self.seen = server, stop_at, start_at, seen

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        if step in self.start_at:
            self.server.start()
            self.seen[step] = "up"
        if step in self.stop_at:
            self.server.stop()
            self.seen[step] = "down"
        self.seen[f"t{step}"] = time.monotonic()


class Timer(TrainerCallback):
    """After the UMA callback: how long its on_save took."""

    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        self.seen[f"measure{step}"] = time.monotonic() - self.seen[f"t{step}"]


def _steps(uri: str, run_id: str, key: str = KEY) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_mlflow_server_down_mid_run_loses_nothing_and_duplicates_nothing(mlflow_server, tmp_path, monkeypatch, caplog):
    server = PortGate(mlflow_server.uri)
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)  # the sink's own bounds apply
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    seen: dict = {}
    try:
        server.start()
        cb = UMACallback(metrics=["gradient_flow"], probe_size=8, trackers=["mlflow"], draw_figures=False)
        # saves at 3, 6, 9: down before 3 (missed), up again before 6 (3 is replayed at 6)
        outage = Outage(server, stop_at={3}, start_at={6}, seen=seen)
        with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
            trainer, losses = run_trainer(tmp_path / "run", callbacks=[outage, cb, Timer(seen)], max_steps=9, save_steps=3)
        assert trainer.state.global_step == 9 and len(losses) == 9
        assert seen["measure3"] < 30, seen  # a down server costs seconds per save, not MLflow's minutes
        journal = Journal(tmp_path / "run" / "uma")
        assert sorted(r.step for r in journal.records() if r.metric == "gradient_flow") == [3, 6, 9]
        assert journal.bad_lines == 0
        warnings = [r.getMessage() for r in caplog.records if "sink mlflow failed" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once per outage, not once per call
        assert any("sink mlflow is back" in r.getMessage() for r in caplog.records)
        run_id = cb.sinks[0].run_id()
        keys = list(journal.records()[0].log_values())
        assert len(keys) > 3
        for key in keys:
            assert _steps(mlflow_server.store_uri, run_id, key) == [3, 6, 9], key  # every point once
        # `uma sync` afterwards finds nothing missing and adds no point
        from uma_callbacks.cli import main

        assert main(["sync", str(tmp_path / "run"), "--mlflow-run", run_id, "--tracking-uri", server.uri]) == 0
        for key in keys:
            assert _steps(mlflow_server.store_uri, run_id, key) == [3, 6, 9], key
    finally:
        server.stop()


def test_mlflow_sink_bounds_http_retries_for_a_remote_uri(monkeypatch):
    """MLflow's defaults retry a refused call for ~4 minutes; the sink's calls fail in seconds."""
    from uma_callbacks.integrations.mlflow import HTTP_DEFAULTS, MLflowSink

    for var in HTTP_DEFAULTS:
        monkeypatch.delenv(var, raising=False)
    sink = MLflowSink(tracking_uri=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(Exception, match="127.0.0.1"):
        sink.start()
    assert time.monotonic() - started < 15
    assert not any(var in os.environ for var in HTTP_DEFAULTS)  # restored after the call


def test_mlflow_sink_keeps_a_users_retry_settings(monkeypatch):
    from uma_callbacks.integrations.mlflow import bounded_http

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with bounded_http("http://127.0.0.1:1"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
    with bounded_http("sqlite:///x.db"):
        assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


@pytest.mark.slow
def test_wandb_that_cannot_start_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    import wandb

    wandb.teardown()  # wandb keeps its settings per process: this test's server address must not outlive it
    cb = UMACallback(metrics=["gradient_flow"], probe_size=8, trackers=["wandb"], draw_figures=False)
    try:
        with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
            trainer, losses = run_trainer(tmp_path / "run", callbacks=[cb], max_steps=4, save_steps=2)
    finally:
        wandb.teardown()
    assert trainer.state.global_step == 4 and len(losses) == 4
    journal = Journal(tmp_path / "run" / "uma")
    assert sorted(r.step for r in journal.records()) == [2, 4]
    messages = [r.getMessage() for r in caplog.records if "sink wandb" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "journal only" in messages[0]
    assert not (journal.root / "deliveries.jsonl").exists()  # nothing marked delivered: `uma sync` replays all
