"""ProbeInfluence: per-sample losses and gradient norms against one backward per sample, TracIn
self-influence across checkpoints, and a Trainer run logged to MLflow then backfilled to the same values."""

from __future__ import annotations

import copy
import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cases import TINY_CASES, split_samples
from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.metrics import METRICS, ProbeInfluence
from uma_callbacks.metrics.influence import learning_rate_at, read_trainer_state, spearman, top_share


def _brute_force(model, batches, loss_fn):
    """Per-sample (loss, ||g_i||^2) by one float64 backward per sample."""
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    losses, sq = [], []
    for batch in batches:
        for one in split_samples(batch):
            loss = loss_fn(model, one).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            losses.append(float(loss.detach()))
            sq.append(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
    return np.array(losses), np.array(sq)


def _moved(model, seed):
    """A copy of ``model`` one random step away (another checkpoint)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


@pytest.mark.parametrize("case", TINY_CASES, ids=str)
def test_three_checkpoints_against_one_backward_per_sample(case):
    model, batches, loss_fn = case.build(dtype=torch.float64)
    checkpoints = [(2, model), (4, _moved(model, 1)), (6, _moved(model, 2))]
    log_history = [{"step": 1, "learning_rate": 0.3}, {"step": 2, "learning_rate": 0.2, "loss": 1.0},
                   {"step": 4, "learning_rate": 0.1}, {"step": 5, "loss": 0.5}, {"step": 6, "learning_rate": 0.05}]
    metric = ProbeInfluence(top_k=2)
    expected_si = 0.0
    previous = None
    for step, weights in checkpoints:
        metric.observe_trainer_state(step, [e for e in log_history if e["step"] <= step])
        result = metric.compute(weights, batches, loss_fn)
        losses, sq = _brute_force(weights, batches, loss_fn)
        lr = {2: 0.2, 4: 0.1, 6: 0.05}[step]
        expected_si = expected_si + lr * sq
        np.testing.assert_allclose(result.arrays["losses"], losses, rtol=1e-7)  # eager attention here, SDPA there
        np.testing.assert_allclose(result.arrays["grad_norms"], np.sqrt(sq), rtol=1e-6)
        np.testing.assert_allclose(result.arrays["self_influence"], expected_si, rtol=1e-6)
        assert result.scalars["learning_rate"] == lr
        assert result.scalars["self_influence_top10_share"] == pytest.approx(top_share(expected_si, 0.1))
        if previous is None:
            assert np.isnan(result.scalars["loss_rank_correlation"])
        else:
            from scipy.stats import spearmanr

            assert result.scalars["loss_rank_correlation"] == pytest.approx(spearmanr(previous, losses).statistic)
        previous = losses
    assert result.meta["checkpoints"] == [2, 4, 6]
    assert result.arrays["loss_history"].shape == (3, len(losses))
    np.testing.assert_allclose(result.arrays["learning_rates"], [0.2, 0.1, 0.05])


def test_a_step_measured_again_replaces_its_values_and_no_learning_rate_means_unit_weights():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    metric = ProbeInfluence()
    first = metric.compute(model, batches, loss_fn)
    assert first.meta["learning_rate_source"].startswith("none")
    np.testing.assert_allclose(first.arrays["self_influence"], first.arrays["grad_norms"] ** 2)
    metric.reset()
    metric.observe_trainer_state(3, [{"step": 3, "learning_rate": 0.5}])
    metric.compute(model, batches, loss_fn)
    metric.observe_trainer_state(3, [{"step": 3, "learning_rate": 0.5}])
    again = metric.compute(model, batches, loss_fn)
    assert again.scalars["n_checkpoints"] == 1.0
    np.testing.assert_allclose(again.arrays["self_influence"], 0.5 * again.arrays["grad_norms"] ** 2)


def test_learning_rate_and_trainer_state_readers_trust_nothing(tmp_path):
    assert learning_rate_at([], 5) is None
    assert learning_rate_at([{"step": 9, "learning_rate": 0.1}], 5) is None
    assert learning_rate_at([{"step": "1", "learning_rate": 0.1}, {"step": 1, "learning_rate": "x"}, 7], 5) is None
    assert learning_rate_at([{"step": 1, "learning_rate": float("nan")}, {"step": 2, "learning_rate": 0.2}], 5) == 0.2
    assert read_trainer_state(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text("{not json")
    assert read_trainer_state(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text('{"global_step": -1, "log_history": []}')
    assert read_trainer_state(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text('{"global_step": 4, "log_history": [{"step": 4, "learning_rate": 0.1}, 3]}')
    assert read_trainer_state(tmp_path) == (4, [{"step": 4, "learning_rate": 0.1}])
    assert spearman(np.ones(3), np.arange(3.0)) != spearman(np.ones(3), np.arange(3.0))  # NaN: constant
    with pytest.raises(ValueError, match="ProbeInfluence.top_k"):
        ProbeInfluence(top_k=0)
    with pytest.raises(ValueError, match="ProbeInfluence.tokenizer"):
        ProbeInfluence(tokenizer=3)


class _Tok:
    """A stand-in tokenizer: token ids as letters."""

    name_or_path = "letters"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Qwen2 Trainer run (saves at 3 and 6) measuring hessian_density and influence live into MLflow."""
    from uma_callbacks import UMACallback
    from uma_callbacks.metrics import HessianDensity

    root = tmp_path_factory.mktemp("influence")
    uri = mlflow_store(root)
    metrics = [HessianDensity(n_vectors=2, n_steps=8, grid_points=64), ProbeInfluence(top_k=2, tokenizer=_Tok())]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cb = UMACallback(metrics=metrics, probe=tiny_lm_dataset(n=8, seed=1), probe_size=8, trackers=["mlflow"])
        run_trainer(root / "run", callbacks=[cb])  # the trigger hands the learning rates over itself
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return {"run": root / "run", "uri": uri, "run_id": cb.sinks[0].run_id(), "cb": cb}


def test_trainer_run_logs_both_metrics_and_their_tables_to_mlflow(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["uri"])
    run_id = trained["run_id"]
    for key in ("uma/influence/self_influence_top10_share", "uma/influence/loss_rank_correlation",
                "uma/hessian_density/trace", "uma/hessian_density/bulk_edge", "uma/hessian_density/negative_mass"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == ([6] if key.endswith("rank_correlation") else [3, 6]), key  # NaN at the first is not logged
    lr = [m for m in client.get_metric_history(run_id, "uma/influence/learning_rate")]
    assert len({m.value for m in lr}) == 2 and all(0 < m.value <= 1e-2 for m in lr)  # the run's decaying schedule
    local = client.download_artifacts(run_id, "uma/step-6")
    files = {p.name for p in Path(local).rglob("*")}
    assert {"influence.csv", "influence.png", "influence.npz", "hessian_density.csv", "hessian_density.png"} <= files
    table = list(csv.DictReader(io.StringIO(next(Path(local).rglob("influence.csv")).read_text())))
    assert [r["part"] for r in table].count("largest self-influence") == 2 and len(table) == 8
    assert {"loss@step-3", "loss@step-6", "text"} <= set(table[0])
    assert all(r["text"] and set(r["text"]) <= set("abcdefghijklmnopqrstuvwxyz") for r in table)


def test_backfill_gives_the_live_values(trained, tmp_path):
    from uma_callbacks.triggers.backfill import backfill

    # the backfill reads each checkpoint's learning rates from its trainer_state.json itself
    summary = backfill(trained["run"], metrics=[ProbeInfluence(top_k=2)], trajectory=False, use_cache=False,
                       output_dir=tmp_path / "fresh", draw_figures=False, progress=False)
    assert summary.computed == 2, summary.describe()
    live = {r.step: r for r in trained["cb"].records if r.metric == "influence"}
    for record in summary.records:
        ref = live[record.step]
        for key, value in ref.scalars.items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
        ours = np.load(next((tmp_path / "fresh").rglob(f"step-{record.step}/influence.npz")))
        theirs = np.load(next(trained["run"].rglob(f"step-{record.step}/influence.npz")))
        for key in ("losses", "grad_norms", "self_influence", "loss_history", "learning_rates"):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=key)


def test_registered():
    assert METRICS["influence"] is ProbeInfluence
