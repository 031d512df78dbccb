"""A value on the dashboard at step N is the value of step N's checkpoint.

Real backfills into a real MLflow SQLite store, read back with ``MlflowClient``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_checkpoints import fake_trainer_run, tiny_model
from tests.trainer_cases import tiny_lm_dataset
from uma_callbacks.engine.probe import Probe, load_probe, save_probe
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.triggers.backfill import backfill

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


def _store(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
    summary = backfill(run, metrics=["gradient_flow"], trajectory=False, draw_figures=False, progress=False,
                       mlflow_run_id=run_id, tracking_uri=uri)
    measured = [r for r in summary.records if r.metric == "gradient_flow"]
    assert [(r.step, r.status) for r in measured] == [(4, "ok")]
    assert measured[0].checkpoint == weights_fingerprint(tiny_model(seed=0))  # checkpoint-4's weights
    errors = {Path(path).name: reason for path, _, reason in summary.errors}
    assert list(errors) == ["checkpoint-10"], summary.describe()
    assert "checkpoint-10" in errors["checkpoint-10"] and "checkpoint-4" in errors["checkpoint-10"]
    # the dashboard's value at step 4 is checkpoint-4's: a backfill of that folder alone gives the same
    alone = backfill([run / "checkpoint-4"], metrics=["gradient_flow"], trajectory=False, draw_figures=False,
                     progress=False, use_cache=False, output_dir=tmp_path / "alone", probe=load_probe(run / "uma"))
    value = next(v for k, v in alone.records[0].scalars.items() if isinstance(v, float) and v == v and v != 0.0)
    key = next(k for k, v in alone.records[0].scalars.items() if v == value)
    assert _history(uri, run_id, f"uma/gradient_flow/{key}") == [(4, pytest.approx(value))]
