"""UMACallback in real Trainer runs: untouched training, isolated failures, early errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks import UMACallback
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult

pytestmark = pytest.mark.slow


class Exploding(Metric):
    """A metric that always raises, to prove failures stay inside the suite."""

    name = "exploding"

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        raise RuntimeError("boom inside a metric")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The per-step losses of the tiny Trainer run without the callback (the reference)."""
    return run_trainer(tmp_path_factory.mktemp("plain"))[1]


def test_training_losses_bit_identical_with_and_without_callback(tmp_path, plain):
    cb = UMACallback(metrics=["gradient_flow"], probe=tiny_lm_dataset(n=16, seed=1), probe_size=8, every_n_steps=2)
    _, measured = run_trainer(tmp_path / "measured", callbacks=[cb])
    assert len(plain) == 6
    assert plain == measured  # exact float equality, every step
    assert sorted({r.step for r in cb.records}) == [2, 3, 4, 6]


def test_default_probe_is_drawn_from_train_data_without_touching_training(tmp_path, plain):
    cb = UMACallback(metrics=["gradient_flow"], probe_size=8)
    _, measured = run_trainer(tmp_path / "measured", callbacks=[cb])
    assert plain == measured
    assert cb.probe is not None and cb.probe.n_samples == 8
    assert [r.status for r in cb.records] == ["ok", "ok"]


def test_failing_metric_is_recorded_and_training_goes_on(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cb = UMACallback(metrics=[Exploding(), GradientFlow()], probe=tiny_lm_dataset(n=8), probe_size=8, trackers=["mlflow"])
    cb_sink_dir = tmp_path / "out" / "uma"
    trainer, losses = run_trainer(tmp_path / "out", callbacks=[cb])
    assert trainer.state.global_step == 6 and len(losses) == 6
    statuses = [(r.step, r.metric, r.status) for r in cb.records]
    assert statuses == [(3, "exploding", "error"), (3, "gradient_flow", "ok"), (6, "exploding", "error"), (6, "gradient_flow", "ok")]
    journal = Journal(cb_sink_dir).records()
    errors = [r for r in journal if r.status == "error"]
    assert errors and errors[0].error["message"] == "boom inside a metric"
    assert "RuntimeError" in errors[0].error["traceback"]
    sink = cb.sinks[0]
    client = MlflowClient(sink.tracking_uri)
    run = client.get_run(sink.run_id())
    assert run.data.tags["uma.exploding.status"] == "error"
    assert "boom" in run.data.tags["uma.exploding.error"]
    steps = [m.step for m in client.get_metric_history(sink.run_id(), "uma/gradient_flow/total_norm")]
    assert steps == [3, 6]
    assert uri  # the store was created in the fallback folder or MLFLOW_TRACKING_URI


def test_report_to_mlflow_joins_the_trainers_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "uma-test")
    cb = UMACallback(metrics=["gradient_flow"], probe=tiny_lm_dataset(n=8), probe_size=8)
    run_trainer(tmp_path / "out", callbacks=[cb], report_to=["mlflow"])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("uma-test").experiment_id])
    assert len(runs) == 1  # no stray run: the Trainer's own run holds everything
    run_id = runs[0].info.run_id
    assert cb.sinks[0].run_id() == run_id
    history = client.get_metric_history(run_id, "uma/gradient_flow/total_norm")
    assert [m.step for m in history] == [3, 6]
    assert client.get_metric_history(run_id, "train_loss") or client.get_metric_history(run_id, "loss")
    journal = {(r.step, r.metric): r for r in Journal(tmp_path / "out" / "uma").records()}
    for m in history:
        assert m.value == journal[(m.step, "gradient_flow")].scalars["total_norm"]
    artifacts = [f.path for f in client.list_artifacts(run_id, "uma/step-3")]
    assert "uma/step-3/gradient_flow.json" in artifacts
    layer_keys = [k for k in runs[0].data.metrics if k.startswith("uma/gradient_flow/layers/")]
    assert layer_keys


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"metrics": ["fishr"]}, "metrics"),
        ({"metrics": []}, "metrics"),
        ({"probe_size": 0}, "probe_size"),
        ({"probe_size": -3}, "probe_size"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"trackers": ["neptune"]}, "trackers"),
        ({"probe": []}, "probe"),
        ({"probe": 42}, "probe"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_config_raises_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UMACallback(**kwargs)


def test_probe_without_labels_fails_before_the_first_step(tmp_path):
    import datasets

    no_labels = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "attention_mask": [[1] * 4] * 8})
    cb = UMACallback(metrics=["gradient_flow"], probe=no_labels, probe_size=4)
    model = None
    with pytest.raises(ValueError, match="labels"):
        trainer, _ = run_trainer(tmp_path / "out", callbacks=[cb])
    assert not (tmp_path / "out" / "checkpoint-3").exists()
    del model


def test_unknown_metric_name_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'gradient_flow'"):
        UMACallback(metrics=["gradient_flw"])


def test_journal_and_result_files_written(tmp_path):
    cb = UMACallback(metrics=["gradient_flow"], probe=tiny_lm_dataset(n=8), probe_size=8, trackers=[])
    run_trainer(tmp_path / "out", callbacks=[cb])
    root = tmp_path / "out" / "uma"
    data = json.loads((root / "step-3" / "gradient_flow.json").read_text())
    assert data["scalars"]["total_norm"] > 0
    assert data["meta"]["peak_bytes"] >= 0 and data["meta"]["seconds"] > 0
    assert torch.isfinite(torch.tensor(data["scalars"]["noise_scale"]))
