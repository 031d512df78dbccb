"""Issue 29, section 5: attacks that held, kept held.

- a tracking server behind a proxy that answers 503, then one that applies each write and
  answers 500 (the client cannot know the write landed): nothing lost, no point twice,
  after the retry at the next delivery and after ``uma sync``;
- a model whose submodule names contain ``c++``, an emoji and a newline: every key MLflow
  receives is valid and distinct, every value arrives intact;
- 24 SIGINTs, each at a different point inside one of three metrics: the journal reads back
  whole, the model, its hooks, grad mode, the RNG and the SIGTERM handler are as they were,
  and the process goes on measuring the same values (tests/scripts/sigint_trials.py).

The server going down mid-run is tests/reliability/test_tracker_outage.py; keys MLflow
refuses as strings, test_tracker_keys.py; SIGTERM during a metric, test_crash_safety.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.mlflow_store import mlflow_store
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.journal import Journal
from uma_callbacks.integrations.base import tracker_key

REPO = Path(__file__).resolve().parents[2]
HTTP_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


# ---------------------------------------------------------------------- 503, 500 after apply
@pytest.fixture(scope="module")
def tracked(mlflow_server):
    """The test worker's real ``mlflow server`` and a fault-injecting proxy in front of it (one per module)."""
    from tests.reliability.servers import FaultProxy

    proxy = FaultProxy(mlflow_server.uri, stall_max=30)
    try:
        yield mlflow_server, proxy
    finally:
        proxy.stop()


def _records(steps) -> list[Record]:
    return [
        Record(step=s, metric="gradient_flow", status="ok", scalars={"total_norm": 0.1 * s + 1 / 3, "max_norm": 2.0**-s})
        for s in steps
    ]


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _check_once_each(uri: str, run_id: str, records: list[Record]) -> None:
    for name in records[0].scalars:
        expected = sorted((r.step, r.scalars[name]) for r in records)
        assert _history(uri, run_id, f"uma/gradient_flow/{name}") == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["503", "500_after_apply"])
def test_a_proxy_answering_503_or_500_after_apply_loses_nothing_and_duplicates_nothing(fault, tracked, tmp_path, monkeypatch):
    from uma_callbacks.cli import main
    from uma_callbacks.integrations.mlflow import MLflowSink

    server, proxy = tracked
    for var in HTTP_VARS:
        monkeypatch.delenv(var, raising=False)  # the sink's own bounded retries ...
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # ... at once: what is retried, not when
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    journal = Journal(tmp_path / "run" / "uma")
    sink = MLflowSink(tracking_uri=proxy.uri)
    sink.start()
    run_id = sink.run_id()
    delivery = Delivery(journal, [sink])
    records = _records([1, 2, 3])
    delivery.send([])  # nothing yet: the run exists, healthy
    journal.append(records[0])
    assert delivery.send([records[0]]) == 1
    proxy.set(fault, match="" if fault == "503" else "log-batch")
    try:
        for record in records[1:]:
            journal.append(record)
            delivery.send([record])
        assert proxy.hits >= 1 and delivery.failing == {"mlflow"}
    finally:
        proxy.release()
    if fault == "500_after_apply":  # the server holds step 2 although the client was told 500
        assert (2, records[1].scalars["total_norm"]) in _history(server.store_uri, run_id, "uma/gradient_flow/total_norm")
    delivery.send_pending()
    assert delivery.failing == set()
    assert len(journal.delivered("mlflow", run_id)) == 3
    _check_once_each(server.store_uri, run_id, records)
    assert main(["sync", str(tmp_path / "run"), "--mlflow-run", run_id, "--tracking-uri", server.uri]) == 0
    _check_once_each(server.store_uri, run_id, records)


# ---------------------------------------------------------------------- hostile module names
HOSTILE_MODULES = ("c++", "emoji🙂", "new\nline")


class HostileNames(torch.nn.Module):
    """3 -> 4 -> 4 -> 2, its layers named ``c++``, ``emoji🙂`` and ``new\\nline``."""

    def __init__(self) -> None:
        super().__init__()
        for name, (n_in, n_out) in zip(HOSTILE_MODULES, [(3, 4), (4, 4), (4, 2)]):
            self.add_module(name, torch.nn.Linear(n_in, n_out, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, head = (self._modules[n] for n in HOSTILE_MODULES)
        return head(torch.tanh(second(torch.tanh(first(x)))))


def test_module_names_with_cpp_emoji_and_newline_reach_mlflow_valid_and_intact(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import _validate_metric_name

    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite
    from uma_callbacks.integrations.mlflow import MLflowSink
    from uma_callbacks.metrics import GradientFlow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    gen = torch.Generator().manual_seed(0)
    probe = Probe([{"x": torch.randn(6, 3, generator=gen, dtype=torch.float64),
                    "y": torch.randn(6, 2, generator=gen, dtype=torch.float64)}])  # fmt: skip
    journal = Journal(tmp_path / "uma")
    suite = MetricSuite([GradientFlow()], journal=journal, draw_figures=False,
                        loss_fn=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1))  # fmt: skip
    (record,) = suite.run(HostileNames(), probe, step=5)
    assert record.status == "ok", record.error
    values = record.log_values()
    for name in HOSTILE_MODULES:
        assert any(name in key for key in values), name  # the metric reports per layer, by name
    sink = MLflowSink(tracking_uri=mlflow_store(tmp_path))
    assert Delivery(journal, [sink]).send_pending() == 1
    mapped = {tracker_key(key): value for key, value in values.items()}
    assert len(mapped) == len(values)  # distinct keys stay distinct
    client = MlflowClient(sink.tracking_uri)
    run = client.get_run(sink.run_id())
    finite = {k: v for k, v in mapped.items() if v == v and abs(v) != float("inf")}
    # every value intact, under its mapped key, and nothing else but the record's outcome (0: ok)
    assert run.data.metrics == {**finite, "uma/gradient_flow/status_code": 0.0}
    for key in mapped:
        _validate_metric_name(key)
    assert not sink.rejected


# ---------------------------------------------------------------------- SIGINT mid-metric
@pytest.mark.slow
def test_24_sigints_mid_metric_leave_journal_model_and_process_whole(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "sigint_trials.py"), str(tmp_path / "uma"), "24"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    trials = [t for t in lines if "trial" in t]
    assert len(trials) == 24
    checks = ("same_values", "same_objects", "same_weights", "same_flags", "same_modes", "same_hooks",
              "grad_enabled", "same_rng", "same_sigterm")  # fmt: skip
    for trial in trials:
        assert trial["bad_lines"] == 0, trial  # no torn line
        assert all(trial[c] for c in checks), trial
        statuses = [status for _, status in trial["records"]]
        assert "error" not in statuses, trial  # an interrupt is not a metric's error
    interrupted = [t for t in trials if t["outcome"] == "interrupted"]
    assert len(interrupted) >= 12, [t["outcome"] for t in trials]  # most land inside the metric
    assert len({t["metric"] for t in interrupted}) == 3  # inside each of the three metrics
    assert len({len(t["records"]) for t in interrupted}) >= 2  # at different points of the save
    assert lines[-1] == {"final_same": True}  # the process goes on with the same values
    journal = Journal(tmp_path / "uma")
    assert journal.bad_lines == 0
