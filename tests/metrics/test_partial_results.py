"""A metric stopped by its time limit keeps what it finished: ``partial``, with its progress.

Float64 oracles: the partial landscape's and path's done points are the full run's, bit for
bit; a Lanczos stopped after m products gives what ``max_iter=m`` gives; a Hutchinson trace
stopped after j probes is ``hutchinson_samples=j``'s. Then the suite journals the partial
record, and a real Trainer delivers it to MLflow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.cases import TINY_CASES, mlp_case, qwen2_case
from tests.mlflow_store import mlflow_store
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import CheckpointInterpolation, GradientFlow, HessianSpectrum, LossLandscape
from uma_callbacks.metrics.base import ComputeContext, MetricTimeout
from uma_callbacks.metrics.landscape import grid_order


@pytest.fixture
def stop_after(monkeypatch):
    """``stop_after(key, n)``: the time limit strikes at the first check whose ``key`` passes ``n``."""

    def arm(key: str, n: int) -> None:
        original = ComputeContext.check_time

        def check_time(self, **progress):
            if progress.get(key, 0) > n:
                self.deadline = 0.0  # past: this very check stops the metric
            return original(self, **progress)

        monkeypatch.setattr(ComputeContext, "check_time", check_time)

    return arm


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dims,mode", [(2, "stored"), (2, "lean"), (1, "stored")])
def test_a_stopped_landscape_keeps_its_done_points_bit_for_bit(stop_after, dims, mode):
    model, batches, loss_fn = qwen2_case(torch.float64)
    kwargs = {"n_points": 5, "span": 0.5, "dims": dims, "mode": mode, "seed": 3}
    full = LossLandscape(**kwargs).compute(model, batches, loss_fn)
    before = _snapshot(model)
    n_done = 7 if dims == 2 else 3  # the centre and its nearest ring, or its neighbours
    stop_after("grid_points_done", n_done - 1)
    part = LossLandscape(**kwargs).compute(model, batches, loss_fn, timeout_seconds=3600)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights restored
    assert part.status == "partial" and part.meta["stopped_by"] == "timeout"
    assert part.meta["progress"]["grid_points_done"] == n_done and "time limit" in part.meta["partial_reason"]
    grid, want = part.arrays["grid_losses"], full.arrays["grid_losses"]
    done = np.isfinite(grid)
    assert done.sum() == n_done
    order = grid_order(5, 5 if dims == 2 else 1)[:n_done]
    expected = np.zeros(done.reshape(5, -1).shape, bool)
    for i, j in order:
        expected[i, j] = True
    assert np.array_equal(done.reshape(5, -1), expected)
    assert np.array_equal(grid[done], want[done])  # the same numbers, bit for bit
    assert part.scalars["center_loss"] == full.scalars["center_loss"]
    assert part.scalars["loss_mean"] == pytest.approx(float(want[done].mean()), rel=1e-12)
    assert np.array_equal(part.arrays["alphas"], full.arrays["alphas"])


def test_a_stopped_path_keeps_both_ends_and_no_barrier(stop_after):
    model, batches, loss_fn = mlp_case()
    previous = {n: p.detach() + 0.05 for n, p in model.named_parameters()}
    full = CheckpointInterpolation(n_points=6, extend=0.2, previous=previous).compute(model, batches, loss_fn)
    stop_after("path_points_done", 2)
    part = CheckpointInterpolation(n_points=6, extend=0.2, previous=previous).compute(model, batches, loss_fn)
    assert part.status == "partial" and part.meta["progress"]["path_points_done"] == 3
    losses, want = part.arrays["path_losses"], full.arrays["path_losses"]
    ts = part.arrays["ts"]
    done = np.isfinite(losses)
    assert done.sum() == 3 and done[ts == 1.0].all() and done[ts == 0.0].all()
    assert np.array_equal(losses[done], want[done])
    for key in ("loss_start", "loss_end", "distance"):
        assert part.scalars[key] == full.scalars[key]
    assert "barrier_height" not in part.scalars  # a maximum over fewer points would understate it


@pytest.mark.parametrize("block,stop", [(1, 7), (2, 6)])
def test_a_stopped_lanczos_gives_what_a_shorter_run_gives(stop_after, block, stop):
    model, batches, loss_fn = qwen2_case(torch.float64)
    kwargs = {"top_k": 3, "hutchinson_samples": 0, "cache_graph": True, "block_size": block, "tol": 1e-12}
    stop_after("matvecs", stop)
    part = HessianSpectrum(**kwargs, max_iter=40).compute(model, batches, loss_fn)
    assert part.status == "partial" and part.meta["stopped_by"] == "timeout"
    assert part.meta["lanczos_matvecs"] == stop and part.meta["progress"]["matvecs"] > stop
    stop_after("matvecs", 10**9)
    short = HessianSpectrum(**kwargs, max_iter=stop).compute(model, batches, loss_fn)
    assert short.meta["lanczos_matvecs"] == stop
    assert np.array_equal(part.arrays["top_eigenvalues"], short.arrays["top_eigenvalues"])
    assert part.meta["lanczos_residuals"] == short.meta["lanczos_residuals"]
    assert part.scalars == short.scalars
    count = part.meta["lanczos_converged_count"]
    rel = part.meta["lanczos_relative_residuals"]
    assert all(r <= 1e-2 for r in rel[:count]) and (count == len(rel) or rel[count] > 1e-2)


def test_a_hessian_stopped_in_hutchinson_keeps_lanczos_and_the_probes_taken(stop_after):
    model, batches, loss_fn = mlp_case()
    kwargs = {"top_k": 2, "cache_graph": True, "block_size": 1, "max_iter": 12}
    lanczos = HessianSpectrum(**kwargs, hutchinson_samples=2).compute(model, batches, loss_fn).meta["lanczos_matvecs"]
    stop_after("matvecs", lanczos + 5)
    part = HessianSpectrum(**kwargs, hutchinson_samples=40).compute(model, batches, loss_fn)
    stop_after("matvecs", 10**9)
    five = HessianSpectrum(**kwargs, hutchinson_samples=5).compute(model, batches, loss_fn)
    assert part.status == "partial" and part.meta["hutchinson_samples_done"] == 5
    assert part.scalars["trace"] == five.scalars["trace"]
    assert part.scalars["trace_stderr"] == five.scalars["trace_stderr"]
    assert np.array_equal(part.arrays["top_eigenvalues"], five.arrays["top_eigenvalues"])


def test_a_hessian_stopped_in_its_first_product_is_a_timeout(stop_after):
    model, batches, loss_fn = mlp_case()
    stop_after("matvecs", 0)
    with pytest.raises(MetricTimeout) as info:
        HessianSpectrum(top_k=2, hutchinson_samples=0, block_size=1).compute(model, batches, loss_fn)
    assert info.value.progress["matvecs"] == 1


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("case", TINY_CASES, ids=str)
def test_a_stopped_gradient_flow_is_the_metric_on_the_samples_it_finished(stop_after, case, method):
    """Stopped after its first chunk (the probe's first batch): exactly GradientFlow on that batch alone."""
    model, batches, loss_fn = case.build(torch.float64)
    first = GradientFlow(method=method).compute(model, batches[:1], loss_fn)
    stop_after("chunks_done", 0)
    part = GradientFlow(method=method).compute(model, batches, loss_fn)
    assert part.status == "partial" and part.meta["stopped_by"] == "timeout"
    n_first = next(iter(batches[0].values())).shape[0]
    assert part.meta["samples_done"] == n_first and part.meta["progress"]["samples_done"] == n_first
    assert first.status == "ok" and set(part.scalars) == set(first.scalars)
    for key, value in first.scalars.items():
        assert part.scalars[key] == pytest.approx(value, rel=1e-10, abs=1e-14, nan_ok=True), key


def test_on_several_ranks_a_stopped_landscape_is_still_a_timeout(stop_after):
    """Each rank stops at its own point: no partial sum over ranks is trusted."""
    from tests.linalg.test_hvp import run_ranks

    model, batches, loss_fn = mlp_case()
    stop_after("grid_points_done", 2)

    def on_rank(rank, collective):
        try:
            LossLandscape(n_points=3).compute(model, batches[rank::2], loss_fn, collective=collective)
        except MetricTimeout:
            return "timeout"
        return "finished"

    assert run_ranks(2, on_rank) == ["timeout", "timeout"]


def test_the_suite_journals_a_partial_landscape_with_its_progress_and_files(tmp_path):
    model, batches, loss_fn = qwen2_case(torch.float32)
    journal = Journal(tmp_path)
    suite = MetricSuite([LossLandscape(n_points=5)], journal=journal, loss_fn=loss_fn, draw_figures=True,
                        timeout_seconds=1e-9)  # fmt: skip
    (record,) = suite.run(model, Probe(batches), step=3)
    assert record.status == "partial" and record.meta["progress"]["grid_points_done"] >= 1
    assert record.error is None and math.isfinite(record.scalars["center_loss"])
    (stored,) = journal.records()
    assert stored.status == "partial" and stored.scalars == record.scalars
    with np.load(tmp_path / "step-3" / "landscape.npz") as npz:
        grid = npz["grid_losses"]
    assert grid.shape == (5, 5) and np.isfinite(grid[2, 2]) and np.isnan(grid).sum() == 25 - record.meta["progress"]["grid_points_done"]
    assert (tmp_path / "step-3" / "landscape.png").is_file()  # the figure shows what was done


@pytest.mark.slow
def test_a_trainer_landscape_past_its_time_limit_reaches_mlflow_as_partial(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tests.trainer_cases import run_trainer, tiny_lm_dataset
    from uma_callbacks import UMACallback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    cb = UMACallback(metrics=[LossLandscape(n_points=5, timeout_seconds=1e-9)], probe=tiny_lm_dataset(n=8, seed=1),
                     probe_size=8, trackers=["mlflow"], draw_figures=False)  # fmt: skip
    run_trainer(tmp_path / "out", callbacks=[cb], max_steps=2, save_steps=2)
    (record,) = cb.records
    assert (record.step, record.status) == (2, "partial") and record.meta["progress"]["grid_points_done"] >= 1
    (journalled,) = Journal(tmp_path / "out" / "uma").records()
    assert journalled.status == "partial" and journalled.scalars["center_loss"] == record.scalars["center_loss"]
    sink = cb.sinks[0]
    client = MlflowClient(sink.tracking_uri)
    run = client.get_run(sink.run_id())
    (point,) = client.get_metric_history(run.info.run_id, "uma/landscape/center_loss")
    assert point.step == 2 and point.value == pytest.approx(record.scalars["center_loss"], rel=1e-6)
    assert run.data.tags.get("uma.landscape.status") == "partial"
