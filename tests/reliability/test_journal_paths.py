"""Issue 17 item 5: only files inside the run's ``uma/`` folder may be read or uploaded.

A journal record naming ``/etc/passwd``, ``../../secret`` or a symlink that leads out of
the folder is refused (and reported) by the MLflow and W&B sinks, ``Journal.load_result``
and ``uma report``; the record's own files still go.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from tests.mlflow_store import mlflow_store
from uma_callbacks.core.records import Record, artifact_path
from uma_callbacks.engine.journal import Journal

HOSTILE = ["/etc/passwd", "../../secret.txt", "../secret.txt", "step-1/link.json", "step-1/dirlink/x.json", "", "step-1"]


def _journal(tmp_path) -> tuple[Journal, Record]:
    (tmp_path / "secret.txt").write_text("secret")
    journal = Journal(tmp_path / "run" / "uma")
    folder = journal.root / "step-1"
    folder.mkdir()
    (folder / "m.json").write_text(json.dumps({"name": "m", "scalars": {"x": 2.0}}))
    os.symlink(tmp_path / "secret.txt", folder / "link.json")
    os.symlink(tmp_path, folder / "dirlink")
    (tmp_path / "x.json").write_text("{}")
    record = Record(step=1, metric="m", status="ok", scalars={"x": 1.0}, files=HOSTILE + ["step-1/m.json"])
    journal.append(record)
    return journal, journal.records()[0]


def test_artifact_path_refuses_everything_outside(tmp_path):
    journal, record = _journal(tmp_path)
    assert [artifact_path(journal.root, f) for f in HOSTILE] == [None] * len(HOSTILE)
    assert artifact_path(journal.root, "step-1/m.json") == (journal.root / "step-1" / "m.json").resolve()


def test_load_result_reads_only_inside_and_reports_the_rest(tmp_path, caplog):
    journal, record = _journal(tmp_path)
    record.files = ["../../secret.txt", "step-1/link.json", "step-1/m.json", "../x.npz"]
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        result = journal.load_result(record)
    assert result.scalars == {"x": 2.0}  # from step-1/m.json, the only file it may read
    assert "refused" in caplog.text and journal.refused_files == ["step-1/link.json", "../x.npz"]


def test_mlflow_uploads_only_the_runs_own_files(tmp_path, caplog):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    journal, record = _journal(tmp_path)
    sink = MLflowSink(tracking_uri=mlflow_store(tmp_path / "store"))
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        sink.log_record(record, journal.root)
    client = MlflowClient(sink.tracking_uri)
    uploaded = [a.path for a in client.list_artifacts(sink.run_id(), "uma/step-1")]
    assert uploaded == ["uma/step-1/m.json"]
    assert caplog.text.count("refused") == len(HOSTILE)


def test_wandb_logs_only_the_runs_own_files(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from uma_callbacks.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    journal, record = _journal(tmp_path)
    added: list[str] = []
    real = wandb.Artifact.add_file
    monkeypatch.setattr(wandb.Artifact, "add_file", lambda self, path, **kw: added.append(path) or real(self, path, **kw))
    sink = WandbSink(project="uma-test")
    try:
        sink.log_record(record, journal.root)
    finally:
        sink.finish()
        wandb.teardown()
    assert added == [str((journal.root / "step-1" / "m.json").resolve())]
