"""A backfill with another config stays apart in MLflow: a real Trainer run, then a backfill.

The live run measures ``fisher`` (and interpolation, which skips its first checkpoint) into a
real MLflow SQLite store; a backfill then measures ``fisher`` with ``top_k=2``. Read back with
``MlflowClient``: every live artifact downloads byte-identical to before, the backfill's files
are under their config folder, both configs' params are there, nothing of MLflow's
"Changing param values" page reaches the output, and the first-checkpoint skip is a skip tag,
not an error tag.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.engine.journal import Journal
from uma_callbacks.integrations.base import value_hash

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")

#: Text of MLflow's refusal of a changed param (its exception and the page of advice after it).
MLFLOW_PARAM_PAGE = ("Changing param values", "Correct Example", "INVALID_PARAMETER_VALUE", "already logged with value")


def _artifact_hashes(client, run_id: str, into: Path) -> dict[str, str]:
    """``{artifact path: sha256}`` of every artifact under ``uma/``, downloaded into ``into``."""
    local = Path(client.download_artifacts(run_id, "uma", str(into)))
    return {
        "uma/" + p.relative_to(local).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(local.rglob("*"))
        if p.is_file()
    }


def test_backfill_with_another_config_leaves_the_live_run_as_it_was(tmp_path, capfd, caplog, monkeypatch):
    from mlflow.tracking import MlflowClient

    from uma_callbacks import UMACallback
    from uma_callbacks.metrics import FisherInformation
    from uma_callbacks.metrics.interpolation import CheckpointInterpolation
    from uma_callbacks.triggers.backfill import backfill

    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cb = UMACallback(
        metrics=["fisher", CheckpointInterpolation(n_points=3)],
        probe=tiny_lm_dataset(n=8, seed=1),
        probe_size=8,
        trackers=["mlflow"],
        draw_figures=False,
    )
    run_trainer(tmp_path / "run", callbacks=[cb])
    run_id = cb.sinks[0].run_id()
    client = MlflowClient(uri)
    live_params = dict(client.get_run(run_id).data.params)
    before = _artifact_hashes(client, run_id, tmp_path / "before")
    assert {"uma/step-3/fisher.json", "uma/step-6/fisher.json"} <= set(before)

    # the first checkpoint has no previous one: interpolation skips it, which is not an error
    tags = client.get_run(run_id).data.tags
    assert tags["uma.interpolation.status"] == "ok" and tags["uma.interpolation.status_step"] == "6"
    assert "uma.interpolation.error" not in tags
    assert tags["uma.interpolation.skipped"].startswith("step 3: no previous checkpoint yet")

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        other = FisherInformation(top_k=2)
        summary = backfill(tmp_path / "run", metrics=[other], mlflow_run_id=run_id, tracking_uri=uri,
                           trajectory=False, draw_figures=False, progress=False)  # fmt: skip
    assert summary.ok, summary.describe()
    assert summary.computed == 2
    out = capfd.readouterr()
    seen = out.out + out.err + caplog.text
    for text in MLFLOW_PARAM_PAGE:
        assert text not in seen, f"MLflow's refusal reached the user: {text!r}"

    # the live run's files are byte-identical; the backfill's sit in their config folder
    after = _artifact_hashes(client, run_id, tmp_path / "after")
    assert {k: after.get(k) for k in before} == before
    digest = value_hash(other.config())
    added = sorted(set(after) - set(before))
    journal = Journal(tmp_path / "run" / "uma").records()
    backfilled = sorted(f for r in journal if r.source == "backfill" and r.metric == "fisher" for f in r.files)
    assert added == ["uma/" + f for f in backfilled], added
    assert {a.rsplit("/", 1)[0] for a in added} == {f"uma/step-{s}/fisher-{digest}" for s in (3, 6)}
    for art in added:  # what was uploaded is what the backfill wrote
        assert after[art] == hashlib.sha256((tmp_path / "run" / "uma" / art[4:]).read_bytes()).hexdigest()

    # both configs' params: the live one as it was, the backfill's under its config hash
    run = client.get_run(run_id)
    params = run.data.params
    assert {k: params[k] for k in live_params} == live_params
    assert "'top_k': 10" in params["uma.fisher.config"]
    assert "'top_k': 2" in params[f"uma.fisher-{digest}.config"]
    assert "uma.backfill.metrics" in params
    # its scalars under the same name as its folder and param
    assert client.get_metric_history(run_id, f"uma/fisher-{digest}/trace")
    assert [m.step for m in client.get_metric_history(run_id, "uma/fisher/trace")] == [3, 6]
    assert "uma.fisher.error" not in run.data.tags

    # a second backfill with the same config logs nothing new and says nothing of MLflow's
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        again = backfill(tmp_path / "run", metrics=[FisherInformation(top_k=2)], mlflow_run_id=run_id,
                         tracking_uri=uri, trajectory=False, draw_figures=False, progress=False)  # fmt: skip
    assert again.ok and again.computed == 0
    out = capfd.readouterr()
    assert not any(t in out.out + out.err + caplog.text for t in MLFLOW_PARAM_PAGE)
    assert client.get_run(run_id).data.params == params
    assert _artifact_hashes(client, run_id, tmp_path / "again") == after
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
