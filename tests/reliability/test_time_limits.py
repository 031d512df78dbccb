"""Time limits: every metric checks its deadline between chunks, products or grid points.

A metric past its ``timeout_seconds`` becomes a ``timeout`` record with its progress (or a
``partial`` one with what it finished, when it keeps that);
the suite applies ``UMAConfig.timeout_seconds`` to metrics without a limit of their own.
"""

from __future__ import annotations

import pytest
import torch

from tests.cases import mlp_case, qwen2_case
from tests.reliability.test_model_safety import _build
from tests.trainer_cases import run_trainer
from uma_callbacks import UMACallback
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import METRICS
from uma_callbacks.metrics.base import MetricTimeout

#: metrics that keep the points they finished when the time limit stops them (``partial``;
#: tests/metrics/test_partial_results.py); the Hessian stopped in its first product has none
KEEP_WHAT_THEY_FINISHED = ("gradient_flow", "interpolation", "landscape")


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_stops_at_its_deadline_with_its_progress(name):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    metric = _build(name, model)
    from tests.metrics.test_contract import _history, _optimizer

    optimizer = _optimizer(name, model)

    if name in KEEP_WHAT_THEY_FINISHED:  # its first point is done before the first check
        result = metric.compute(model, batches, loss_fn, chunk_size=1, timeout_seconds=1e-9, history=_history(model), **optimizer)
        assert result.status == "partial" and result.meta["progress"], "no progress recorded"
        return
    with pytest.raises(MetricTimeout) as info:
        metric.compute(model, batches, loss_fn, chunk_size=1, timeout_seconds=1e-9, history=_history(model), **optimizer)
    assert info.value.progress, "no progress recorded"


def test_fisher_lanczos_products_are_timed_too():
    from uma_callbacks.metrics import FisherInformation

    model, batches, loss_fn = mlp_case(dtype=torch.float32)  # every parameter in an nn.Linear
    calls = []
    original = FisherInformation._spectrum

    def spectrum(self, ctx, *args):  # the accumulation is done: only the products remain
        calls.append(True)
        ctx.deadline = 0.0
        return original(self, ctx, *args)

    FisherInformation._spectrum = spectrum
    try:
        with pytest.raises(MetricTimeout) as info:
            # method="linear" forms no Gram matrix: the spectrum comes from Lanczos products
            FisherInformation(top_k=2, method="linear").compute(model, batches, loss_fn, chunk_size=1)
    finally:
        FisherInformation._spectrum = original
    assert calls and info.value.progress.get("matvecs") == 1


def test_suite_applies_the_config_limit_and_keeps_the_metrics_own(tmp_path):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    unlimited = METRICS["gradient_flow"]()
    own = METRICS["landscape"](n_points=3, timeout_seconds=3600)
    suite = MetricSuite([unlimited, own], journal=Journal(tmp_path), loss_fn=loss_fn, draw_figures=False,
                        timeout_seconds=1e-9)
    records = suite.run(model, Probe(batches), step=5)
    # gradient_flow stopped after its first chunk keeps the samples it finished
    assert [r.status for r in records] == ["partial", "ok"]
    assert records[0].meta["stopped_by"] == "timeout" and records[0].meta["progress"]["chunks_done"] == 1
    assert unlimited.timeout_seconds is None  # the metric object is left as given
    assert [r.status for r in Journal(tmp_path).records()] == ["partial", "ok"]


@pytest.mark.slow
def test_callback_timeout_becomes_a_record_and_training_goes_on(tmp_path):
    # the Hessian stopped in its first product has nothing to keep: a timeout record
    cb = UMACallback(metrics=["hessian"], probe_size=8, trackers=[], draw_figures=False, timeout_seconds=1e-9)
    trainer, losses = run_trainer(tmp_path / "run", callbacks=[cb], max_steps=2, save_steps=2)
    assert trainer.state.global_step == 2 and len(losses) == 2
    (record,) = Journal(tmp_path / "run" / "uma").records()
    assert record.status == "timeout" and record.meta["progress"]
