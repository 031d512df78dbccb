"""MetricSuite: failures isolated, cache hits, sink outages lose nothing."""

from __future__ import annotations

import pytest
import torch

from tests.cases import mlp_case
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.integrations.base import MemorySink, Sink
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult


class Counting(Metric):
    name = "counting"

    def __init__(self):
        super().__init__()
        self._calls = 0  # private: public attributes are configuration (the cache key)

    @property
    def calls(self):
        return self._calls

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        self._calls += 1
        return MetricResult(name=self.name, scalars={"calls": float(self._calls)})


class Broken(Metric):
    name = "broken"

    def _compute(self, ctx):
        raise FloatingPointError("NaN in gradient of fc1.weight")


class FlakySink(Sink):
    name = "flaky"

    def __init__(self):
        super().__init__()
        self.down = True
        self.got = []

    def run_id(self):
        return "r"

    def log_record(self, record, root):
        if self.down:
            raise ConnectionError("tracker unreachable")
        self.got.append((record.step, record.metric))


def _setup(tmp_path, metrics, sinks=()):
    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    journal = Journal(tmp_path)
    delivery = Delivery(journal, list(sinks))
    suite = MetricSuite(
        metrics=metrics, journal=journal, on_record=lambda r: delivery.send([r]), loss_fn=loss_fn, draw_figures=False
    )
    suite.delivery = delivery  # the test reads it back
    return suite, model, Probe(batches)


def test_failure_becomes_error_record_and_others_run(tmp_path):
    suite, model, probe = _setup(tmp_path, [Broken(), GradientFlow()])
    records = suite.run(model, probe, step=1, checkpoint="c1")
    assert [r.status for r in records] == ["error", "ok"]
    assert records[0].error["type"] == "FloatingPointError" and "fc1.weight" in records[0].error["message"]
    assert [r.status for r in suite.journal.records()] == ["error", "ok"]


def test_cache_hit_computes_nothing(tmp_path):
    counting = Counting()
    suite, model, probe = _setup(tmp_path, [counting])
    fp = weights_fingerprint(model)
    first = suite.run(model, probe, step=1, checkpoint=fp)
    second = suite.run(model, probe, step=1, checkpoint=fp)
    assert counting.calls == 1
    assert first[0].status == "ok" and second[0].status == "cached"
    assert second[0].scalars == first[0].scalars
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    suite.run(model, probe, step=2, checkpoint=weights_fingerprint(model))
    assert counting.calls == 2


def test_sink_outage_loses_nothing(tmp_path, caplog):
    sink, memory = FlakySink(), MemorySink()
    suite, model, probe = _setup(tmp_path, [Counting()], sinks=[sink, memory])
    suite.run(model, probe, step=1, checkpoint="a")
    suite.run(model, probe, step=2, checkpoint="b")
    assert sink.got == [] and len(memory.records) == 2
    assert sum("tracker unreachable" in m for m in caplog.messages) == 1  # one warning, not one per record
    sink.down = False
    assert suite.delivery.send_pending() == 2
    assert sink.got == [(1, "counting"), (2, "counting")]
    assert suite.delivery.send_pending() == 0  # idempotent: nothing delivered twice
    assert len(memory.records) == 2


def test_sink_without_name_is_refused():
    class Nameless(Sink):
        def log_record(self, record, root):
            pass

    with pytest.raises(NotImplementedError, match="name"):
        Nameless()


def test_a_metric_not_ready_is_skipped_before_any_planning(tmp_path, monkeypatch):
    """Interpolation at a first checkpoint: a skip with its reason, and nothing planned or measured
    (it cost 0.7 s of planning on MiniLM before it skipped on entry, counted against the save's budget)."""
    import uma_callbacks.engine.suite as suite_module
    from uma_callbacks.engine.budget import MemoryBudget
    from uma_callbacks.engine.history import CheckpointHistory
    from uma_callbacks.metrics import CheckpointInterpolation

    calls = []
    planned = suite_module.compute_within_budget
    monkeypatch.setattr(suite_module, "compute_within_budget", lambda *a, **k: calls.append(a[0].name) or planned(*a, **k))
    model, batches, loss_fn = mlp_case()
    metrics = [CheckpointInterpolation(n_points=5), GradientFlow()]
    suite = MetricSuite(metrics, journal=Journal(tmp_path), loss_fn=loss_fn, draw_figures=False, budget=MemoryBudget(max_gb=1))
    skipped, measured = suite.run(model, Probe(batches), step=1, history=CheckpointHistory(metrics))
    assert skipped.status == "skipped" and skipped.error["message"].startswith("no previous checkpoint yet"), skipped.error
    assert measured.status == "ok" and calls == ["gradient_flow"]


def test_a_full_collection_follows_a_failure_only(tmp_path, monkeypatch):
    """A full ``gc.collect`` (0.2 to 0.3 s with transformers imported) runs after a metric that
    failed, whose traceback may hold its tensors; not after one the memory planner refused
    before it ran (12 such skips cost 3 s in the 512-to-4096-token budget run), nor after an ok."""
    import uma_callbacks.engine.suite as suite_module
    from uma_callbacks.engine.budget import MemoryBudget

    asked = []
    monkeypatch.setattr(suite_module, "release_memory", lambda device, full=False: asked.append(full))
    model, batches, loss_fn = mlp_case()
    suite = MetricSuite([GradientFlow(), Broken()], journal=Journal(tmp_path), loss_fn=loss_fn, draw_figures=False)
    records = suite.run(model, Probe(batches), step=1)
    assert [r.status for r in records] == ["ok", "error"] and asked == [False, True]
    refused = MetricSuite([GradientFlow()], journal=Journal(tmp_path / "tight"), loss_fn=loss_fn, draw_figures=False,
                          budget=MemoryBudget(max_bytes=1))  # fmt: skip
    (record,) = refused.run(model, Probe(batches), step=1)
    assert record.status == "skipped" and "memory budget" in record.error["message"], record.error
    assert asked[2:] == [False]
