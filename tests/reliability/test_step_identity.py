"""A value on the dashboard at step N is the value of step N's checkpoint, and the status tag
says what the latest step with a value (or a newer failure) says.

Real backfills into a real MLflow SQLite store, read back with ``MlflowClient``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.mlflow_store import mlflow_store
from tests.test_checkpoints import fake_trainer_run, tiny_model
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.core.records import Record
from uma_callbacks.engine.probe import Probe, save_probe
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.triggers.backfill import backfill

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient


def _store(tmp_path: Path) -> tuple[str, str]:
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("uma-steps")).info.run_id
    return uri, run_id


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_the_folder_named_for_its_step_wins_and_the_other_is_an_error_naming_both(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(4,))
    impostor = run / "checkpoint-10"  # its state says step 4: copied over, or its state rewritten
    tiny_model(seed=7).save_pretrained(impostor)
    (impostor / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=5), 4), run / "uma")
    uri, run_id = _store(tmp_path)
    summary = backfill(
        run,
        metrics=["gradient_flow"],
        trajectory=False,
        draw_figures=False,
        progress=False,
        mlflow_run_id=run_id,
        tracking_uri=uri,
    )
    measured = [r for r in summary.records if r.metric == "gradient_flow"]
    assert [(r.step, r.status) for r in measured] == [(4, "ok")]
    assert measured[0].checkpoint == weights_fingerprint(tiny_model(seed=0))  # checkpoint-4's weights
    errors = {Path(path).name: reason for path, _, reason in summary.errors}
    assert list(errors) == ["checkpoint-10"], summary.describe()
    assert "checkpoint-10" in errors["checkpoint-10"] and "checkpoint-4" in errors["checkpoint-10"]
    # the dashboard's value at step 4 is the one measured on checkpoint-4's weights
    key, value = next(
        (k, v)
        for k, v in measured[0].scalars.items()
        if isinstance(v, float) and math.isfinite(v) and v != 0.0
    )
    assert _history(uri, run_id, f"uma/gradient_flow/{key}") == [(4, pytest.approx(value))]


def test_the_status_tag_survives_a_backfill_that_can_only_skip(tmp_path, monkeypatch):
    """Live: interpolation has values at steps 4, 6 and 8; save_total_limit=1 keeps only
    checkpoint-8, where a backfill has no previous checkpoint and skips. The tag stays ok."""
    from uma_callbacks import UMACallback

    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cb = UMACallback(
        metrics=["interpolation"],
        probe=tiny_lm_dataset(n=4, seed=1),
        probe_size=4,
        trackers=["mlflow"],
        draw_figures=False,
    )
    out = tmp_path / "out"
    run_trainer(out, callbacks=[cb], max_steps=8, save_steps=2, save_total_limit=1)
    live_id = cb.sinks[0].run_id()
    steps = [s for s, _ in _history(uri, live_id, "uma/interpolation/barrier_height")]
    assert steps == [4, 6, 8]
    tags = lambda: MlflowClient(uri).get_run(live_id).data.tags
    assert tags()["uma.interpolation.status"] == "ok"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-8"]
    summary = backfill(
        out,
        metrics=["interpolation"],
        trajectory=False,
        draw_figures=False,
        progress=False,
        mlflow_run_id=live_id,
        tracking_uri=uri,
    )
    assert [(r.step, r.status) for r in summary.records] == [(8, "skipped")]
    assert tags()["uma.interpolation.status"] == "ok"
    assert tags()["uma.interpolation.status_step"] == "8"
    assert [s for s, _ in _history(uri, live_id, "uma/interpolation/barrier_height")] == [4, 6, 8]


def _record(step: int, status: str, value: float | None = None) -> Record:
    error = (
        None
        if status in ("ok", "cached", "partial")
        else {"type": "E", "message": f"at {step}", "traceback": ""}
    )
    return Record(
        step=step,
        metric="hessian",
        status=status,
        scalars={} if value is None else {"trace": value},
        error=error,
        cache_key=f"k{step}{status}",
        meta={"timestamp_ms": 1_700_000_000_000 + step},
    )


def test_a_newer_error_wins_in_every_process_and_an_older_value_does_not_hide_it(tmp_path):
    """Each delivery through a fresh sink (another process: a backfill, ``uma sync``)."""
    from uma_callbacks.integrations.mlflow import MLflowSink

    uri, run_id = _store(tmp_path)
    root = tmp_path / "uma"
    root.mkdir()
    tags = lambda: MlflowClient(uri).get_run(run_id).data.tags["uma.hessian.status"]

    def deliver(record):
        MLflowSink(run_id=run_id, tracking_uri=uri).log_record(record, root)
        return tags()

    assert deliver(_record(8, "ok", 1.0)) == "ok"
    assert deliver(_record(10, "error")) == "error"  # newer than the latest value
    assert deliver(_record(4, "cached", 1.0)) == "error"  # an older value does not hide it
    assert deliver(_record(6, "skipped")) == "error"
    assert deliver(_record(12, "skipped")) == "error"  # a skip carries no value
    assert deliver(_record(10, "partial", 2.0)) == "partial"  # a value at the failure's step clears it
    assert deliver(_record(9, "timeout")) == "partial"  # older than the latest value
    assert _history(uri, run_id, "uma/hessian/trace") == [(4, 1.0), (8, 1.0), (10, 2.0)]


def test_wandb_summary_status_follows_the_same_rule(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from uma_callbacks.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    root = tmp_path / "uma"
    root.mkdir()
    run = wandb.init(project="uma-test", dir=str(tmp_path))
    try:
        sink = WandbSink(run=run)
        for record in (_record(4, "ok", 1.0), _record(6, "ok", 2.0), _record(8, "ok", 3.0)):
            sink.log_record(record, root)
        sink.log_record(_record(8, "skipped"), root)
        assert run.summary["uma/hessian/status"] == "ok" and run.summary["uma/hessian/status_step"] == 8
        resumed = WandbSink(run=run)  # another sink on the same run (a backfill): starts from the summary
        resumed.log_record(_record(2, "error"), root)
        assert run.summary["uma/hessian/status"] == "ok"
        resumed.log_record(_record(9, "error"), root)
        assert run.summary["uma/hessian/status"] == "error"
    finally:
        wandb.finish()
        wandb.teardown()
    assert os.path.isdir(tmp_path / "wandb")
