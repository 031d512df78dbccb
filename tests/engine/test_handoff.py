"""Results handed between the metrics of one save: order, what reaches a consumer, why not, and its cache key."""

from __future__ import annotations

import pytest
import torch

from tests.cases import mlp_case
from uma_callbacks.engine.handoff import Handoff, asked_outputs, run_order
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult, MetricSkipped, MetricTimeout, SaveResults


class Provider(Metric):
    """The probe loss; hands on ``loss_tensor`` when a later metric asks (or fails, skips or times out, as told)."""

    name = "provider"
    needs_grad = False

    def __init__(self, fail: str = "") -> None:
        super().__init__()
        self.fail = fail

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        if self.fail == "error":
            raise RuntimeError("provider broke")
        if self.fail == "timeout":
            raise MetricTimeout("timed out; progress: {}")
        if self.fail == "skip":
            raise MetricSkipped("nothing to measure")
        with torch.no_grad():
            loss = torch.cat([ctx.loss_fn(ctx.model, b) for b in ctx.chunks()]).mean()
        provided = {"loss_tensor": loss} if "loss_tensor" in ctx.results.requested else {}
        meta = {"requested": sorted(ctx.results.requested)}
        return MetricResult(self.name, scalars={"loss": float(loss)}, provided=provided, meta=meta)


class Consumer(Metric):
    """Twice the provider's loss when it reaches this metric; else ``without`` = 1 and the reason in meta."""

    name = "consumer"
    needs_grad = False
    uses_results = {"provider": ("loss_tensor",)}  # noqa: RUF012 (a class-level declaration, never mutated)

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        value, why = ctx.results.get("provider", "loss_tensor")
        if value is None:
            return MetricResult(self.name, scalars={"without": 1.0}, meta={"why": why})
        return MetricResult(self.name, scalars={"twice": 2.0 * float(value)})


class ReadsNothing(Consumer):
    """The consumer as it would be without a declaration: never handed anything."""

    uses_results = {}  # noqa: RUF012


class Cyclic(Metric):
    name = "cyclic"
    uses_results = {"consumer": ("x",)}  # noqa: RUF012

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        return MetricResult(self.name)


def _suite(metrics, journal=None, loss_fn=None):
    return MetricSuite(metrics=metrics, journal=journal, loss_fn=loss_fn, draw_figures=False)


def test_the_provider_runs_first_and_hands_on_what_was_asked():
    model, batches, loss_fn = mlp_case()
    records = _suite([Consumer(), Provider()], loss_fn=loss_fn).run(model, Probe(batches), step=1)
    assert [r.metric for r in records] == ["provider", "consumer"]
    provider, consumer = records
    assert provider.meta["requested"] == ["loss_tensor"]
    assert consumer.status == "ok" and consumer.scalars == {"twice": pytest.approx(2 * provider.scalars["loss"], rel=1e-15)}
    assert "results_missing" not in consumer.meta
    # nothing asks: nothing is formed to hand on
    alone = _suite([Provider()], loss_fn=loss_fn).run(model, Probe(batches), step=1)[0]
    assert alone.meta["requested"] == []


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ([Consumer()], "provider is not among this save's metrics"),
        ([Provider(fail="error"), Consumer()], "provider error at this save: provider broke"),
        ([Provider(fail="timeout"), Consumer()], "provider timeout at this save"),
        ([Provider(fail="skip"), Consumer()], "provider skipped at this save: nothing to measure"),
    ],
    ids=["absent", "failed", "timed-out", "skipped"],
)
def test_without_its_provider_the_consumer_runs_and_says_why(metrics, needle):
    model, batches, loss_fn = mlp_case()
    records = _suite(metrics, loss_fn=loss_fn).run(model, Probe(batches), step=1)
    consumer = records[-1]
    assert consumer.metric == "consumer" and consumer.status == "ok" and consumer.scalars == {"without": 1.0}
    assert needle in consumer.meta["why"]
    assert needle in consumer.meta["results_missing"]["provider"]  # in the record, for every consumer


def test_the_cache_key_holds_what_the_providers_handed_on(tmp_path):
    """A result computed without the provider is not reused with it, nor the other way round; a rerun is all cache hits."""
    model, batches, loss_fn = mlp_case()
    journal = Journal(tmp_path)
    without = _suite([Consumer()], journal, loss_fn).run(model, Probe(batches), step=1, checkpoint="weights-A")
    assert without[0].scalars == {"without": 1.0}
    plain = _suite([ReadsNothing()], Journal(tmp_path / "other"), loss_fn).run(model, Probe(batches), step=1, checkpoint="weights-A")
    assert plain[0].cache_key == without[0].cache_key  # nothing handed on: the key a metric had before hand-offs
    both = _suite([Consumer(), Provider()], journal, loss_fn).run(model, Probe(batches), step=2, checkpoint="weights-A")
    assert [(r.metric, r.status) for r in both] == [("provider", "ok"), ("consumer", "ok")]
    assert "twice" in both[1].scalars and both[1].cache_key != without[0].cache_key
    again = _suite([Consumer(), Provider()], journal, loss_fn).run(model, Probe(batches), step=3, checkpoint="weights-A")
    assert [(r.metric, r.status) for r in again] == [("provider", "cached"), ("consumer", "cached")]
    assert again[1].scalars == both[1].scalars and again[1].cache_key == both[1].cache_key
    # the provider's result from the cache hands nothing on; the consumer's own result from
    # the cache is the one computed with it, so it is reused rather than recomputed without
    fresh = _suite([Consumer(), Provider()], Journal(tmp_path), loss_fn)
    assert [r.status for r in fresh.run(model, Probe(batches), step=4, checkpoint="weights-A")] == ["cached", "cached"]
    # other weights: computed again, with the provider
    model.fc1.bias.data.add_(0.1)
    moved = _suite([Consumer(), Provider()], journal, loss_fn).run(model, Probe(batches), step=5, checkpoint="weights-B")
    assert [r.status for r in moved] == ["ok", "ok"] and "twice" in moved[1].scalars


def test_a_cached_provider_with_an_uncached_consumer_says_so(tmp_path):
    model, batches, loss_fn = mlp_case()
    journal = Journal(tmp_path)
    _suite([Provider()], journal, loss_fn).run(model, Probe(batches), step=1, checkpoint="weights-A")
    records = _suite([Provider(), Consumer()], journal, loss_fn).run(model, Probe(batches), step=2, checkpoint="weights-A")
    assert [(r.metric, r.status) for r in records] == [("provider", "cached"), ("consumer", "ok")]
    assert "read from the cache" in records[1].meta["results_missing"]["provider"]


def test_metrics_that_need_each_other_are_refused_at_construction():
    needs_cyclic = Consumer()
    needs_cyclic.uses_results = {"cyclic": ("x",)}  # consumer -> cyclic -> consumer
    with pytest.raises(ValueError, match=r"metrics \['consumer', 'cyclic'\] need each other's results.*cycle"):
        _suite([needs_cyclic, Cyclic(), Provider()])
    cyc = Cyclic()
    cyc.uses_results = {"cyclic": ("x",)}  # its own results: ignored, never a cycle
    assert run_order([cyc]) == [0]


def test_order_and_outputs_asked_from_the_declarations():
    from uma_callbacks.metrics import DirectionalSharpness, FisherInformation, GradientFlow, OptimizerState

    metrics = [DirectionalSharpness(directions=["update", "fisher"]), OptimizerState(), GradientFlow(), FisherInformation()]
    assert [metrics[i].name for i in run_order(metrics)] == ["gradient_flow", "fisher", "optimizer_state", "sharpness"]
    assert asked_outputs(metrics) == {
        "fisher": frozenset({"top_eigenvector", "diagonal"}), "optimizer_state": frozenset({"pending_update"}),
    }  # fmt: skip
    # the update direction asks for the optimizer's pending step (used at a save with no previous checkpoint)
    assert DirectionalSharpness(directions=["update"]).results_needed() == {"optimizer_state": ("pending_update",)}
    assert DirectionalSharpness(directions=["gradient"]).results_needed() == {}  # neither (a) nor (c): nothing asked
    plain = [GradientFlow(), FisherInformation()]
    assert run_order(plain) == [0, 1] and asked_outputs(plain) == {}


def test_outputs_are_dropped_once_the_last_consumer_ran():
    handoff = Handoff.for_save([Provider(), Consumer()])
    result = MetricResult("provider", provided={"loss_tensor": torch.ones(3)})
    from uma_callbacks.core.records import Record

    handoff.handed(Provider(), result, Record(step=1, metric="provider", status="ok", cache_key="k"))
    got = handoff.results_for(Consumer())
    assert isinstance(got, SaveResults) and got.get("provider", "loss_tensor")[1] == ""
    handoff.consumed(Consumer())
    assert "provider" not in handoff.outputs
