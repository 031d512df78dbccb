"""Metrics reading other metrics' results of the same save, through a real Trainer (to MLflow) and the backfill of its checkpoints.

``sharpness`` measures along the top Fisher eigenvector and ``optimizer_state`` correlates
sqrt(v_hat) with the Fisher diagonal, both handed on by ``fisher`` at the same save; the
backfill (checkpoints' safetensors and ``optimizer.pt``) gives the live values.
"""

from __future__ import annotations

import math
import os

import pytest

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.metrics import DirectionalSharpness, FisherInformation, OptimizerState

pytestmark = pytest.mark.slow
pytest.importorskip("mlflow")

KEYS = {"sharpness": ("fisher/curvature", "fisher/slope", "gradient/curvature", "update/curvature"), "optimizer_state": ("fisher_spearman",)}


def _metrics():
    """Consumers listed before their provider: the suite runs fisher first."""
    return [DirectionalSharpness(directions=["update", "gradient", "fisher"], step=0.01), OptimizerState(), FisherInformation(top_k=2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Qwen2 Trainer run (saves at 2 and 4) logging the three metrics to MLflow."""
    from uma_callbacks import UMACallback

    root = tmp_path_factory.mktemp("save_results")
    uri = mlflow_store(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cb = UMACallback(metrics=_metrics(), probe=tiny_lm_dataset(n=4, seed=1), probe_size=4, trackers=["mlflow"],
                         draw_figures=False)  # fmt: skip
        run_trainer(root / "run", callbacks=[cb], max_steps=4, save_steps=2, lr_scheduler_type="constant")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return {"run": root / "run", "uri": uri, "run_id": cb.sinks[0].run_id(), "cb": cb}


def test_trainer_run_hands_fisher_to_sharpness_and_optimizer_state_and_logs_them(trained):
    from mlflow.tracking import MlflowClient

    records = trained["cb"].records
    assert [(r.step, r.metric) for r in records] == [
        (s, m) for s in (2, 4) for m in ("fisher", "optimizer_state", "sharpness")
    ]  # fmt: skip
    assert all(r.status in ("ok", "partial") for r in records), [(r.metric, r.status, r.error) for r in records]
    for record in records:
        assert "results_missing" not in record.meta, record.meta["results_missing"]
        for key in KEYS.get(record.metric, ()):
            assert math.isfinite(record.scalars[key]), (record.metric, key)
    sharp = {r.step: r for r in records if r.metric == "sharpness"}
    assert sharp[2].meta["skipped_directions"] == {} and sharp[4].meta["skipped_directions"] == {}
    assert sharp[2].meta["update_source"] == "optimizer_pending_step" and sharp[4].meta["update_source"] == "history"
    client = MlflowClient(trained["uri"])
    live = {(r.step, r.metric): r.scalars for r in records}
    for metric, keys in KEYS.items():
        for key in keys:
            history = client.get_metric_history(trained["run_id"], f"uma/{metric}/{key}")
            assert sorted(m.step for m in history) == [2, 4], key
            for point in history:
                assert point.value == pytest.approx(live[(point.step, metric)][key], rel=1e-6), key


def test_backfill_of_the_checkpoints_hands_on_the_same_and_equals_the_live_values(trained, tmp_path):
    from uma_callbacks.triggers.backfill import backfill

    summary = backfill(trained["run"], metrics=_metrics(), trajectory=False, use_cache=False, output_dir=tmp_path / "fresh",
                       draw_figures=False, progress=False, trackers=[])  # fmt: skip
    assert summary.computed == 6, summary.describe()
    live = {(r.step, r.metric): r for r in trained["cb"].records}
    assert [(r.step, r.metric) for r in summary.records] == list(live)
    for record in summary.records:
        ref = live[(record.step, record.metric)]
        assert record.status == ref.status and "results_missing" not in record.meta
        assert set(record.scalars) == set(ref.scalars), record.metric
        for key, value in ref.scalars.items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (record.step, record.metric, key)
    # without fisher the consumers still run, and say what they went without
    alone = backfill(trained["run"], metrics=["optimizer_state", DirectionalSharpness(directions=["gradient", "fisher"])],
                     trajectory=False, use_cache=False, output_dir=tmp_path / "alone", draw_figures=False, progress=False,
                     trackers=[])  # fmt: skip
    assert alone.computed == 4 and all(r.status in ("ok", "partial") for r in alone.records), alone.describe()
    for record in alone.records:
        assert "fisher is not among this save's metrics" in record.meta["results_missing"]["fisher"]
        assert not any(k.startswith("fisher") for k in record.scalars)
