"""Issue 29 item 4b: a tracker that stalls never holds training.

A tracker that accepts connections but does not answer held every save for MLflow's own
HTTP timeouts (minutes). Every tracker call on the training path now takes at most
``UMAConfig.tracker_timeout_seconds`` (integrations/bounded.py); past it the session warns
once and goes journal-only until the next save, which retries once the stuck call has
returned. The records reach the tracker afterwards, each point once.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
import torch
from transformers import TrainerCallback

from uma_callbacks import UMAConfig
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.journal import Journal
from uma_callbacks.integrations.base import MemorySink, keeps_rng
from uma_callbacks.integrations.bounded import BoundedSink, TrackerStalled, rearm

KEY = "uma/gradient_flow/total_norm"


class Hanging(MemorySink):
    """A sink whose ``log_record`` waits for ``gate`` (a tracker that does not answer)."""

    name = "hanging"

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.calls = 0

    @keeps_rng
    def log_record(self, record, root):
        self.calls += 1
        random.random(), torch.rand(1)  # a tracker drawing from the global RNGs
        self.gate.wait(30)
        super().log_record(record, root)


def _record(step: int) -> Record:
    return Record(step=step, metric="m", status="ok", scalars={"x": float(step)})


def test_a_call_that_overruns_goes_journal_only_until_the_next_save(tmp_path):
    inner = Hanging()
    sink = BoundedSink(inner, timeout=0.3)
    assert isinstance(sink, MemorySink) and sink.name == "hanging"  # transparent
    started = time.monotonic()
    with pytest.raises(TrackerStalled, match="no answer within 0.3 s"):
        sink.log_record(_record(1), tmp_path)
    assert 0.3 <= time.monotonic() - started < 2
    started = time.monotonic()
    with pytest.raises(TrackerStalled, match="journal only until the next save"):
        sink.log_record(_record(2), tmp_path)
    with pytest.raises(TrackerStalled):
        sink.start()
    assert time.monotonic() - started < 0.1 and inner.calls == 1  # no call reached the tracker
    rearm([sink])  # the next save, the stuck call still waiting: no second call piles up
    assert sink.stalled and inner.calls == 1
    inner.gate.set()
    sink._uma_stuck[1].join(5)
    rearm([sink])
    assert not sink.stalled
    sink.log_record(_record(3), tmp_path)
    assert [r.step for r in inner.records] == [1, 3]  # the abandoned call finished on its own


def test_an_abandoned_call_does_not_rewind_the_training_rngs(tmp_path):
    inner = Hanging()
    sink = BoundedSink(inner, timeout=0.2)
    torch.manual_seed(0)
    random.seed(0)
    with pytest.raises(TrackerStalled):
        sink.log_record(_record(1), tmp_path)
    torch.rand(5), random.random()  # training goes on
    expected = torch.get_rng_state(), random.getstate()
    inner.gate.set()
    sink._uma_stuck[1].join(5)  # the abandoned call returns now
    assert torch.equal(torch.get_rng_state(), expected[0])
    assert random.getstate() == expected[1]


def test_a_call_in_time_keeps_the_rngs_and_raises_what_the_sink_raised(tmp_path):
    class Broken(MemorySink):
        name = "broken"

        def log_record(self, record, root):
            torch.rand(3)
            raise ConnectionError("tracker down")

    sink = BoundedSink(Broken(), timeout=5)
    before = torch.get_rng_state()
    with pytest.raises(ConnectionError, match="tracker down"):
        sink.log_record(_record(1), tmp_path)
    assert torch.equal(before, torch.get_rng_state()) and not sink.stalled


def test_delivery_warns_once_and_keeps_the_records_pending(tmp_path, caplog):
    inner = Hanging()
    sink = BoundedSink(inner, timeout=0.2)
    journal = Journal(tmp_path / "uma")
    delivery = Delivery(journal, [sink])
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        for step in (1, 2, 3):
            record = _record(step)
            journal.append(record)
            delivery.send([record])
    warnings = [r.getMessage() for r in caplog.records if "sink hanging failed" in r.getMessage()]
    assert len(warnings) == 1 and "TrackerStalled" in warnings[0], warnings
    inner.gate.set()
    sink._uma_stuck[1].join(5)
    rearm([sink])
    delivery.send_pending()
    # step 1 arrives twice (the abandoned call did reach the sink): MLflow skips steps its run
    # holds (the slow test below), MemorySink keeps both
    assert sorted(r.step for r in inner.records) == [1, 1, 2, 3]
    assert len(journal.delivered("hanging", "memory")) == 3


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True, "30"])
def test_tracker_timeout_is_validated(bad):
    with pytest.raises(ValueError, match="tracker_timeout_seconds"):
        UMAConfig(tracker_timeout_seconds=bad)


class Stall(TrainerCallback):
    """Before the UMA callback: the proxy stalls from the save at 2; released at the save at 6,
    after which this waits until the stuck call has returned (so the save at 6 retries)."""

    def __init__(self, proxy, seen: dict, uma) -> None:
        self.proxy, self.seen, self.uma = proxy, seen, uma

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        if step == 2:
            self.proxy.set("stall")
        if step == 6:
            self.proxy.release()
            stuck = getattr(self.uma.sinks[0], "_uma_stuck", None)
            if stuck is not None:
                stuck[1].join(30)
        self.seen[f"t{step}"] = time.monotonic()


class Timer(TrainerCallback):
    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def on_save(self, args, state, control, **kwargs):
        self.seen[f"measure{state.global_step}"] = time.monotonic() - self.seen[f"t{state.global_step}"]


@pytest.mark.slow
def test_trainer_run_with_a_stalling_mlflow_server_finishes_and_loses_nothing(mlflow_server, tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tests.reliability.servers import FaultProxy
    from tests.trainer_cases import run_trainer
    from uma_callbacks import UMACallback
    from uma_callbacks.cli import main

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    server = mlflow_server  # the test worker's, shared: this test's run is found by its id
    proxy = None
    try:
        proxy = FaultProxy(server.uri, stall_max=60)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
        seen: dict = {}
        timeout = 6.0  # above a normal call's time on a loaded machine (one history read per key)
        cb = UMACallback(metrics=["gradient_flow"], probe_size=8, trackers=["mlflow"], draw_figures=False,
                         tracker_timeout_seconds=timeout)  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
            trainer, _ = run_trainer(tmp_path / "run", callbacks=[Stall(proxy, seen, cb), cb, Timer(seen)],
                                     max_steps=6, save_steps=2)  # fmt: skip
        assert trainer.state.global_step == 6
        assert proxy.hits >= 1  # the tracker did stall
        assert seen["measure2"] < timeout + 10, seen  # one bounded wait (MLflow alone: 30 s and more)
        assert seen["measure4"] < 10, seen  # journal-only: no call, no wait
        warnings = [r.getMessage() for r in caplog.records if "sink mlflow failed" in r.getMessage()]
        assert warnings and "TrackerStalled" in warnings[0], warnings
        sink = cb.sinks[0]
        if getattr(sink, "stalled", False):  # a call at the end overran too (a loaded machine): let it land first
            sink._uma_stuck[1].join(60)
        run_id = getattr(sink, "wrapped", sink).run_id()
        client = MlflowClient(server.store_uri)  # what reached the server, read from its store
        journal = Journal(tmp_path / "run" / "uma")
        keys = list(journal.records()[0].log_values())
        for key in keys:  # the save at 6 (or the end) delivered what the stall held back: each point once
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)
        assert main(["sync", str(tmp_path / "run"), "--mlflow-run", run_id, "--tracking-uri", server.uri]) == 0
        for key in keys:
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [2, 4, 6], key
    finally:
        if proxy is not None:
            proxy.stop()
