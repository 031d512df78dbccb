"""Bad input: generated configs, NaN/Inf, probes of 0 and 1 samples, all-ignored labels, hostile names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cases import mlp_case, qwen2_case
from tests.metrics.test_contract import _optimizer
from tests.mlflow_store import mlflow_store
from tests.reliability.test_model_safety import _build
from uma_callbacks import UMAConfig, UnifiedConfig
from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal, safe_name
from uma_callbacks.engine.probe import Probe, select_samples
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import METRICS
from uma_callbacks.metrics.base import MetricResult

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-2, 3), st.text(max_size=12)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
UMA_FIELDS = {
    "metrics": st.one_of(st.lists(st.sampled_from(sorted(METRICS) + ["fishr", ""]), max_size=3), ANY),
    "probe_size": st.one_of(st.integers(-2, 100), ANY),
    "probe_batch_size": st.one_of(st.integers(-2, 100), ANY),
    "every_n_steps": ANY,
    "trackers": st.one_of(st.lists(st.sampled_from(["mlflow", "wandb", "tensorboard", ""]), max_size=2), ANY),
    "output_dir": ANY,
    "memory_budget": ANY,
    "seed": ANY,
    "timeout_seconds": ANY,
    "use_cache": ANY,
    "save_tensors": ANY,
    "draw_figures": ANY,
    "loss_fn": ANY,
}


def _names_a_field(err: ValueError, fields) -> bool:
    return any(name in str(err) for name in fields)


def _some_fields(fields):
    """One to three fields, each with a value from its strategy (so no single check masks the rest)."""
    return st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: fields[n] for n in names})
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_some_fields(UMA_FIELDS))
def test_umaconfig_is_valid_or_a_value_error_naming_the_field(kwargs):
    try:
        config = UMAConfig(**kwargs)
    except ValueError as err:
        assert _names_a_field(err, kwargs), err
        return
    assert config.metric_objects and all(m.name in METRICS for m in config.metric_objects)


UNIFIED_FIELDS = [f for f in UnifiedConfig.__dataclass_fields__]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(UNIFIED_FIELDS + ["fisher_topk", "nonsense"]), ANY, max_size=3))
def test_unifiedconfig_is_valid_or_a_value_error_naming_the_field(kwargs):
    try:
        config = UnifiedConfig(**kwargs)
        engine = config.to_uma()
    except ValueError as err:
        assert _names_a_field(err, kwargs), err
        return
    assert engine["probe_size"] >= 1 and engine["seed"] >= 0


def _compares(name: str) -> bool:
    """Whether the metric compares checkpoints (skipped at a run's first measurement)."""
    return bool(METRICS[name].history_needed or METRICS[name].needs_first)


def _optimizer_state(model):
    """The AdamW state (taken on a copy of ``model``) that the suite hands to the metrics reading one."""
    return _optimizer("optimizer_state", model)["optimizer_state"]


def _suite(tmp_path, metrics, loss_fn):
    return MetricSuite(metrics, journal=Journal(tmp_path), loss_fn=loss_fn, draw_figures=False)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_weight_gives_error_records_naming_the_parameter(tmp_path, value):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 2] = value
    records = _suite(tmp_path, [_build(n, model) for n in sorted(METRICS)], loss_fn).run(model, Probe(batches), step=1)
    for record in records:
        assert record.status == "error", record.metric
        assert "model.layers.1.mlp.up_proj.weight" in record.error["message"]
        assert record.error["type"] == "FloatingPointError"


def test_nan_loss_gives_error_records_not_nan_values(tmp_path):
    model, batches, loss_fn = mlp_case()
    batches[1]["x"][2, 0] = math.nan  # one bad input row: finite weights, NaN loss for that sample
    from tests.engine.test_budget import ANY_MODEL  # the MLP has no transformer blocks

    metrics = [METRICS[n](**({"top_k": 2} if n in ("fisher", "hessian") else {})) for n in ANY_MODEL
               if n != "interpolation"]
    records = _suite(tmp_path, metrics, loss_fn).run(model, Probe(batches), step=1)
    for record in records:
        assert record.status == "error" and "NaN/Inf for sample(s) [2]" in record.error["message"], record.metric
        assert record.log_values() == {}


def test_empty_probe_is_a_clear_value_error():
    model, _, loss_fn = mlp_case()
    with pytest.raises(ValueError, match="at least one sample"):
        Probe([])
    for name in sorted(METRICS):
        with pytest.raises(ValueError, match="batches is empty"):
            _build(name, model).compute(model, [], loss_fn)


def test_one_sample_probe_gives_values_or_a_clear_error_record(tmp_path):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    one = [select_samples(batches[0], [0])]
    records = _suite(tmp_path, [_build(n, model) for n in sorted(METRICS)], loss_fn).run(
        model, Probe(one), step=1, optimizer=_optimizer_state(model)
    )
    by_name = {r.metric: r for r in records}
    assert by_name["fisher"].status == "error" and "n_samples=1" in by_name["fisher"].error["message"]
    for record in records:
        # a metric comparing checkpoints has nothing to compare with at a first measurement
        assert record.status in ("ok", "partial", "error") or (record.status == "skipped" and _compares(record.metric))
        # undefined with one sample (variance over N-1): kept as null in the journal, never logged
        assert all(math.isfinite(v) for v in record.log_values().values())
        if record.metric == "gradient_flow":
            assert record.scalars["total_norm"] > 0 and math.isnan(record.scalars["noise_scale"])


def test_every_label_ignored_runs_without_crash_or_logged_nan(tmp_path):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    ignored = [dict(b, labels=torch.full_like(b["labels"], -100)) for b in batches]
    records = _suite(tmp_path, [_build(n, model) for n in sorted(METRICS)], loss_fn).run(
        model, Probe(ignored), step=1, optimizer=_optimizer_state(model)
    )
    for record in records:
        if record.status == "skipped" and _compares(record.metric):
            continue  # nothing earlier to compare with
        assert record.status == "ok", (record.metric, record.error)
        values = record.log_values()
        assert values and all(math.isfinite(v) for v in values.values())
    by_name = {r.metric: r.scalars for r in records}
    assert by_name["gradient_flow"]["total_norm"] == 0.0
    assert by_name["fisher"]["trace"] == 0.0
    assert by_name["landscape"]["center_loss"] == 0.0


HOSTILE = ["../../escape", "a/b/../../../c", "with space/and..dots", "/abs/path", "..", "", "layers/m.0/norm"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_keep_artifacts_inside_the_output_folder(tmp_path, name):
    root = tmp_path / "out" / "uma"
    journal = Journal(root)
    result = MetricResult(name=name, scalars={f"layers/{name}/norm": 1.0}, arrays={name or "x": np.ones(3)})
    files = journal.write_files(result, step=3)
    for rel in files:
        path = (root / rel).resolve()
        assert root.resolve() in path.parents, rel
    cleaned = safe_name(name)
    assert "/" not in cleaned and " " not in cleaned and not cleaned.startswith(".")
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and root.resolve() not in p.resolve().parents]
    assert outside == []


def test_hostile_metric_and_run_names_keep_mlflow_artifacts_under_uma(tmp_path):
    pytest.importorskip("mlflow")
    from uma_callbacks.integrations.mlflow import MLflowSink

    journal = Journal(tmp_path / "uma")
    result = MetricResult(name="evil name/x", scalars={"x": 1.0}, arrays={"a/../b": np.ones(2)})  # MLflow refuses keys with ..
    record = Record(step=3, metric=result.name, status="ok", scalars={"x": 1.0}, files=journal.write_files(result, 3))
    sink = MLflowSink(tracking_uri=mlflow_store(tmp_path), run_name="../../run with/slash")
    sink.log_record(record, journal.root)
    client = sink.client
    listed = [a.path for a in client.list_artifacts(sink.run_id(), "uma/step-3")]
    assert listed and all(p.startswith("uma/step-3/") and ".." not in p for p in listed)
    artifact_root = Path(client.get_run(sink.run_id()).info.artifact_uri.replace("file://", ""))
    assert all(artifact_root.resolve() in p.resolve().parents for p in artifact_root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: UMAConfig(seed=2**63), "UMAConfig.seed"),
        (lambda: UnifiedConfig(seed=2**63).to_uma(), "UnifiedConfig.seed"),
        (lambda: UnifiedConfig(device="tpu").to_uma(), "UnifiedConfig.device"),
        (lambda: UnifiedConfig(dtype="float8").to_uma(), "UnifiedConfig.dtype"),
        (lambda: UnifiedConfig(loss_landscape_span=1e300).to_uma(), "UnifiedConfig.loss_landscape_span"),
        (lambda: METRICS["landscape"](span=1e300), "LossLandscape.span"),
        (lambda: UnifiedConfig(max_memory_gb=1.67e299).to_uma(), "UnifiedConfig.max_memory_gb"),
        (lambda: UMAConfig(memory_budget=1e300), "UMAConfig.memory_budget"),
    ],
)
def test_values_accepted_before_and_failing_later_are_refused_at_construction(build, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build()


def test_every_metric_has_a_default_time_limit_and_the_seed_reaches_the_estimators():
    config = UMAConfig(metrics=["fisher", "hessian", "landscape"], seed=7)
    assert config.timeout_seconds == 900.0
    assert [m.seed for m in config.metric_objects] == [7, 7, 7]
