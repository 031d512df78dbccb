"""One seed rule: a metric object built without a seed and the metric's name take the run's seed."""

from __future__ import annotations

import json

import pytest

from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks import UMACallback, UMAConfig
from uma_callbacks.config import metric_spec
from uma_callbacks.core.seeds import DEFAULT_SEED
from uma_callbacks.metric_specs import build_metric
from uma_callbacks.metrics import FisherInformation, HessianSpectrum, LossLandscape


def _records(tmp_path, name, metrics, **kwargs):
    callback = UMACallback(metrics=metrics, probe=tiny_lm_dataset(n=8, seed=3), probe_size=8, trackers=[],
                           draw_figures=False, **kwargs)
    run_trainer(tmp_path / name, [callback], max_steps=2, save_steps=2)
    return [(r.step, r.metric, r.status, r.cache_key, json.dumps(r.scalars, sort_keys=True)) for r in callback.records]


def test_an_object_and_the_name_measure_the_same_values_under_the_same_key(tmp_path):
    by_object = _records(tmp_path, "object", [FisherInformation()])
    by_name = _records(tmp_path, "name", ["fisher"])
    assert [r[2] for r in by_object] == ["ok"] and by_object == by_name
    # another run seed reaches the object as it reaches the name: MC labels are drawn from it
    mc_object = _records(tmp_path, "mc-object", [FisherInformation(kind="mc", top_k=None)], seed=7)
    mc_name = _records(tmp_path, "mc-name", ["fisher:kind=mc,top_k=null"], seed=7)
    mc_42 = _records(tmp_path, "mc-42", ["fisher:kind=mc,top_k=null"])
    assert mc_object == mc_name
    assert mc_object[0][3] != mc_42[0][3] and mc_object[0][4] != mc_42[0][4]  # the seed mattered


def test_the_seed_used_is_in_the_config_and_an_own_seed_is_kept():
    assert DEFAULT_SEED == UMAConfig().seed == 42
    assert FisherInformation().config()["seed"] == 42 == build_metric("fisher").config()["seed"]
    for metric in (FisherInformation(), HessianSpectrum(), LossLandscape()):
        (run,) = UMAConfig(metrics=[metric], seed=7).metric_objects
        assert run.config()["seed"] == 7 and run.config() == build_metric(metric.name, seed=7).config()
        assert metric.seed == 42  # the user's object is not changed: another run may use it
        assert metric_spec(run)["seed"] == 7
    own = FisherInformation(seed=3)
    assert UMAConfig(metrics=[own], seed=7).metric_objects[0].config()["seed"] == 3
    assert UMAConfig(metrics=["fisher:seed=3"], seed=7).metric_objects[0].config()["seed"] == 3
    assert json.dumps(FisherInformation().config()) == json.dumps(FisherInformation(seed=42).config())


@pytest.mark.parametrize("seed", [0, 42])
def test_an_explicit_default_valued_seed_is_kept(seed):
    (run,) = UMAConfig(metrics=[FisherInformation(seed=seed)], seed=7).metric_objects
    assert run.config()["seed"] == seed
