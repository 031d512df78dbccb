"""analyze_models / UnifiedConfig / ResultCache: the seed's Quick Start and Pattern 1, locally."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

from tests.test_checkpoints import fake_trainer_run
from tests.trainer_cases import tiny_lm_dataset
from uma_callbacks import AnalysisResults, ResultCache, UnifiedConfig, analyze_models

pytestmark = pytest.mark.slow


def _rows(n=6):
    return [dict(r) for r in tiny_lm_dataset(n=n, seed=4)]


def test_quick_start_with_a_local_model_and_jsonl_dataset(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(1,))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": r["input_ids"]}) + "\n" for r in _rows()))
    model_path = str(run / "checkpoint-1")
    config = UnifiedConfig(
        model_name=model_path, dataset_name=str(data), num_samples=6, batch_size=3,
        compute_fisher=True, compute_loss_landscape=True, compute_gradients=True, fisher_top_k=3,
        loss_landscape_n_points=5, seed=42, output_dir=str(tmp_path / "analysis_results"), save_results=True,
    )
    results = analyze_models(model_paths=[model_path], config=config)
    assert isinstance(results, AnalysisResults)
    model_results = results.models[model_path]
    fisher = model_results.metrics["fisher_information"]
    assert fisher["trace"] > 0 and len(fisher["eigenvalues"]) == 3
    assert fisher["top_k_condition_number"] >= 1 and fisher["top_k_effective_rank"] > 0
    gradients = model_results.metrics["gradient_flow"]
    assert np.mean(gradients["mean_gradient_norm"]) > 0 and gradients["total_norm"] > 0
    landscape = model_results.metrics["loss_landscape_2d"]
    if "error" not in landscape:  # the landscape metric lands with its own issue
        assert np.asarray(landscape["grid_losses"]).shape == (5, 5)
        assert "roughness" in landscape and "loss_mean" in landscape
    assert (tmp_path / "analysis_results" / "results.json").is_file()


def test_pattern_1_compare_checkpoints_then_cache_hits(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(10, 20, 30))
    checkpoints = [str(run / f"checkpoint-{s}") for s in (10, 20, 30)]
    config = UnifiedConfig(base_model="local", compute_fisher=True, compute_gradients=True, fisher_top_k=2,
                           seed=42, num_samples=4, output_dir=str(tmp_path / "out"), verbose=False)
    results = analyze_models(checkpoints, config, dataset=_rows(4))
    traces = [results.models[c].metrics["fisher_information"]["trace"] for c in checkpoints]
    assert all(t > 0 for t in traces) and len(set(traces)) == 3
    again = analyze_models(checkpoints, config, dataset=_rows(4))
    assert [again.models[c].metrics["fisher_information"]["status"] for c in checkpoints] == ["cached"] * 3
    assert [again.models[c].metrics["fisher_information"]["trace"] for c in checkpoints] == traces
    cache = ResultCache(cache_dir=str(tmp_path / "out" / "cache"))
    stats = cache.get_stats()
    assert stats["num_entries"] == 6 and stats["total_size_mb"] > 0 and stats["num_models"] == 3
    assert cache.clear_model_cache(checkpoints[0]) == 2
    assert cache.get_stats()["num_entries"] == 4
    cache.clear_all()
    assert cache.get_stats()["num_entries"] == 0


def test_unified_config_accepts_every_seed_field_and_json():
    config = UnifiedConfig(enable_qkov_interference=False, aggressive_cleanup=True, loss_landscape_batches=5)
    same = UnifiedConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert same == config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = config.to_uma()
    assert any("enable_qkov_interference" in str(w.message) for w in caught)
    assert settings["metric_names"] == [] and settings["seed"] == 42


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"compute_fishr": True}, "did you mean 'compute_fisher'"),
        ({"loss_landscape_normalization": "row"}, "loss_landscape_normalization"),
        ({"fisher_method": "kfac"}, "fisher_method"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_unified_config_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnifiedConfig(**kwargs)


def test_no_local_data_is_a_clear_error(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(1,))
    with pytest.raises(ValueError, match="never downloads"):
        analyze_models([str(run / "checkpoint-1")], UnifiedConfig(compute_fisher=True, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="model_paths is empty"):
        analyze_models([], UnifiedConfig())
