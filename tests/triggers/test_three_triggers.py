"""The three triggers share one session: same checkpoints, same values.

A tiny Qwen2 is trained with the Trainer callback (checkpoints at steps 2, 4, 6); the same
checkpoints then go through the Accelerate hook (``accelerator.save_state``) and through
the backfill. Checkpoint-pair metrics (``interpolation``, ``trajectory``) give values from
the second checkpoint on, equal across the three to 1e-6; a metric defined outside the
package and registered through the public API is logged by all three.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.trainer_cases import run_trainer, tiny_lm, tiny_lm_dataset
from uma_callbacks.checkpoints import load_into, load_weights
from uma_callbacks.metrics import METRICS, register_metric
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult

pytestmark = pytest.mark.slow

STEPS = (2, 4, 6)


class MeanProbeLoss(Metric):
    """A user's own metric: the mean per-sample probe loss (defined outside the package)."""

    name = "mean_probe_loss_test"
    needs_grad = False

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for chunk in ctx.chunks():
                total += ctx.loss_fn(ctx.model, chunk).to(torch.float64).sum()
        ctx.collective.sum_([total])
        return MetricResult(self.name, scalars={"loss": float(total) / ctx.n_total()})


NAMES = ["interpolation", "trajectory", MeanProbeLoss.name]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_metric(MeanProbeLoss)
    yield
    METRICS.pop(MeanProbeLoss.name, None)


@pytest.fixture(scope="module")
def live(tmp_path_factory, registered):
    from uma_callbacks import UMACallback

    run = tmp_path_factory.mktemp("live")
    callback = UMACallback(
        metrics=NAMES, probe=tiny_lm_dataset(n=8, seed=3), probe_size=8, trackers=[], draw_figures=False, seed=0
    )
    run_trainer(run, callbacks=[callback], max_steps=6, save_steps=2)
    return run, callback


def _values(records) -> dict[tuple[int, str], dict[str, float]]:
    return {(r.step, r.metric): dict(r.scalars) for r in records if r.status in ("ok", "cached")}


def _assert_same(got, want):
    assert set(got) == set(want)
    for key, scalars in want.items():
        assert set(got[key]) == set(scalars), key
        for name, value in scalars.items():
            assert got[key][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, name)


def test_trainer_gives_pair_metrics_from_the_second_checkpoint(live):
    _, callback = live
    status = {(r.step, r.metric): r.status for r in callback.records}
    assert status[(2, "interpolation")] == "skipped" and status[(2, "trajectory")] == "skipped"
    for step in STEPS[1:]:
        assert status[(step, "interpolation")] == "ok" and status[(step, "trajectory")] == "ok"
    assert all(status[(s, MeanProbeLoss.name)] == "ok" for s in STEPS)
    values = _values(callback.records)
    assert "update_cosine" in values[(6, "trajectory")] and "update_cosine" not in values[(4, "trajectory")]
    assert values[(4, "interpolation")]["loss_end"] == pytest.approx(values[(4, MeanProbeLoss.name)]["loss"], rel=1e-5)


def test_backfill_gives_the_live_values(live, tmp_path):
    from uma_callbacks.triggers.backfill import backfill

    run, callback = live
    summary = backfill(run, metrics=NAMES, output_dir=str(tmp_path / "uma"), use_cache=False, trajectory=False,
                       draw_figures=False, progress=False, check_probe=False)  # fmt: skip
    assert summary.ok, summary.describe()
    assert summary.computed == 3 * 3 - 2 and summary.skipped == 2
    _assert_same(_values(summary.records), _values(callback.records))


def test_accelerate_hook_gives_the_live_values_and_is_backfilled_without_the_probe(live, tmp_path):
    from accelerate import Accelerator

    from uma_callbacks import attach
    from uma_callbacks.triggers.backfill import backfill

    run, callback = live
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_lm())
    acc_run = tmp_path / "acc"
    handle = attach(accelerator, NAMES, callback.probe, trackers=[], output_dir=str(acc_run / "uma"),
                    draw_figures=False, seed=0)  # fmt: skip
    for step in STEPS:
        load_into(accelerator.unwrap_model(model), load_weights(run / f"checkpoint-{step}"))
        handle.step = step
        accelerator.save_state(str(acc_run / f"checkpoint-{step}"))
    handle.remove()
    _assert_same(_values(handle.records), _values(callback.records))
    assert (acc_run / "uma" / "probe.safetensors").is_file()

    # the Accelerate run, backfilled with nothing but its folder (probe and config saved by the hook)
    summary = backfill(acc_run, metrics=NAMES, output_dir=str(tmp_path / "again"), use_cache=False,
                       trajectory=False, draw_figures=False, progress=False)  # fmt: skip
    assert summary.ok, summary.describe()
    assert [c.step for c in summary.checkpoints] == list(STEPS)
    _assert_same(_values(summary.records), _values(callback.records))


class SlowMetric(Metric):
    """Sleeps between chunks, checking its time limit."""

    name = "slow_test"
    needs_grad = False

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        for i in range(100):
            time.sleep(0.05)
            ctx.check_time(sleeps=i + 1)
        return MetricResult(self.name, scalars={"done": 1.0})


def test_time_limit_stops_a_slow_metric_in_the_backfill(live, tmp_path):
    from uma_callbacks.triggers.backfill import backfill

    run, _ = live
    summary = backfill(run, metrics=[SlowMetric()], output_dir=str(tmp_path / "uma"), timeout_seconds=0.3,
                       trajectory=False, draw_figures=False, progress=False)  # fmt: skip
    assert [r.status for r in summary.records] == ["timeout"] * 3
    # each stopped at a check before its 100 sleeps were done, none ran to the end
    assert all(1 <= r.meta["progress"]["sleeps"] < 100 for r in summary.records)


def test_memory_settings_do_not_change_a_results_identity(live, tmp_path):
    """chunk sizes and the memory budget are memory only: another setting is a cache hit."""
    from uma_callbacks.metrics import GradientFlow
    from uma_callbacks.triggers.backfill import backfill

    run, _ = live
    out = str(tmp_path / "uma")
    first = backfill(run, metrics=[GradientFlow()], output_dir=out, chunk_sizes={"gradient_flow": 8},
                     trajectory=False, draw_figures=False, progress=False)  # fmt: skip
    again = backfill(run, metrics=[GradientFlow()], output_dir=out, chunk_sizes={"gradient_flow": 1},
                     memory_budget=2.0, trajectory=False, draw_figures=False, progress=False)  # fmt: skip
    assert first.computed == 3 and again.computed == 0 and again.cached == 3
    assert first.records[0].meta["chunk_size"] == 8
