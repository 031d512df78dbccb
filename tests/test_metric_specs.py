"""One request, one result: a metric spelled on any path is the same metric, with the same cache key.

The paths: ``UMAConfig(metrics=[...])`` (callback, Accelerate hook, ``backfill()``), the
``uma backfill`` command's ``--metrics``, ``--metric`` and ``--config``, and the
predecessor's ``UnifiedConfig``. Before the one builder, ``--metrics hessian`` seeded the
Hessian with the run's seed (42) and ``--metric hessian`` with 0: two values and two cache
keys for one checkpoint.
"""

from __future__ import annotations

import json

import pytest

from uma_callbacks.config import UMAConfig
from uma_callbacks.engine.suite import _key_config
from uma_callbacks.legacy.unified_config import UnifiedConfig
from uma_callbacks.metric_specs import build_metric
from uma_callbacks.metrics import METRICS, HessianSpectrum

SEEDED = sorted(n for n in METRICS if "seed" in __import__("inspect").signature(METRICS[n]).parameters)


def _cli_metrics(monkeypatch, tmp_path, argv: list[str]) -> list:
    """The metrics ``uma backfill`` builds from ``argv``, as the session receives them."""
    import uma_callbacks.triggers.backfill as backfill_module
    from uma_callbacks.cli import main

    seen = {}

    def fake_backfill(run_dir, metrics, seed, **kwargs):
        seen["metrics"] = UMAConfig(metrics=metrics, seed=seed).metric_objects
        raise SystemExit(0)

    monkeypatch.setattr(backfill_module, "backfill", fake_backfill)
    (tmp_path / "run").mkdir(exist_ok=True)
    with pytest.raises(SystemExit):
        main(["backfill", str(tmp_path / "run"), *argv])
    return seen["metrics"]


def _key(metric) -> str:
    config, why = _key_config(metric)
    assert config is not None, why
    return json.dumps(config, sort_keys=True)


@pytest.mark.parametrize("name", ["hessian", "landscape", "fisher", "gradient_flow"])
def test_one_spec_one_config_on_every_path(name, monkeypatch, tmp_path):
    seed = 42
    from_config = UMAConfig(metrics=[name], seed=seed).metric_objects[0]
    by_names = _cli_metrics(monkeypatch, tmp_path, ["--metrics", name, "--seed", str(seed)])[0]
    by_spec = _cli_metrics(monkeypatch, tmp_path, ["--metric", name, "--seed", str(seed)])[0]
    (tmp_path / "m.json").write_text(json.dumps({"metrics": {name: {}}}))
    by_file = _cli_metrics(monkeypatch, tmp_path, ["--config", str(tmp_path / "m.json"), "--seed", str(seed)])[0]
    built = [from_config, by_names, by_spec, by_file]
    if name in ("hessian", "gradient_flow"):  # UnifiedConfig sets the others' options to the predecessor's defaults
        built.append({m.name: m for m in UnifiedConfig(compute_all=True, seed=seed).metrics()}[name])
    keys = {_key(m) for m in built}
    assert len(keys) == 1, keys


def test_the_run_seed_seeds_every_seeded_metric_unless_the_spec_sets_one():
    for name in SEEDED:
        if name in ("fisher_overlap", "trajectory"):
            continue  # built with tasks / needs more than a name
        assert build_metric(name, seed=7).config()["seed"] == 7, name
    assert build_metric("hessian:seed=3", seed=7).config()["seed"] == 3
    assert build_metric({"name": "hessian", "seed": 3}, seed=7).config()["seed"] == 3
    given = HessianSpectrum(seed=5)
    assert build_metric(given, seed=7) is given  # an object is used as given


def test_a_metric_registered_outside_the_package_is_built_by_name_on_every_path(monkeypatch):
    from uma_callbacks.metrics.base import Metric, MetricResult

    class Outside(Metric):
        name = "outside_metric"

        def __init__(self, seed: int = 0, chunk_size=None, timeout_seconds=None):
            super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
            self.seed = seed

        def _compute(self, ctx):
            return MetricResult(name=self.name, scalars={"value": float(self.seed)})

    monkeypatch.setitem(METRICS, "outside_metric", Outside)
    a = UMAConfig(metrics=["outside_metric"], seed=9).metric_objects[0]
    b = build_metric("outside_metric:", seed=9)
    assert a.config() == b.config() and a.config()["seed"] == 9


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hesian", "did you mean 'hessian'"),
        ("hessian:top_k", "expected key=value"),
        ("hessian:nope=1", "takes no option"),
        ({"top_k": 2}, "needs a string 'name'"),
        (3, "must be a Metric, a name or a mapping"),
    ],
)
def test_a_bad_spec_is_a_value_error_naming_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        build_metric(spec, seed=1)
