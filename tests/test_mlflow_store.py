"""The tests' MLflow stores (``tests/mlflow_store.py``) are what MLflow itself makes at that path."""

from __future__ import annotations

import sqlite3

import pytest

from tests.mlflow_store import mlflow_store

pytest.importorskip("mlflow")


def _tables(path) -> dict[str, tuple[int, set[str]]]:
    """``{table: (rows, its columns)}`` of a SQLite file."""
    with sqlite3.connect(path) as db:
        names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            n: (db.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0], {c[1] for c in db.execute(f'PRAGMA table_info("{n}")')})
            for n in names
        }


def test_a_copied_store_opens_as_the_store_mlflow_creates_there(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts the Default experiment's artifacts under the current directory
    copied = MlflowClient(mlflow_store(tmp_path / "copied"))
    (tmp_path / "fresh").mkdir()
    fresh = MlflowClient(f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}")
    got = [(e.experiment_id, e.name, e.artifact_location) for e in copied.search_experiments()]
    want = [(e.experiment_id, e.name, e.artifact_location) for e in fresh.search_experiments()]
    assert got == want == [("0", "Default", str(tmp_path / "mlruns" / "0"))]
    assert _tables(tmp_path / "copied" / "mlflow.db") == _tables(tmp_path / "fresh" / "mlflow.db")
    with sqlite3.connect(tmp_path / "copied" / "mlflow.db") as a, sqlite3.connect(tmp_path / "fresh" / "mlflow.db") as b:
        assert a.execute("SELECT * FROM alembic_version").fetchall() == b.execute("SELECT * FROM alembic_version").fetchall()
    run = copied.create_run("0").info.run_id
    copied.log_metric(run, "x", 1.5, step=3)
    assert [(m.step, m.value) for m in copied.get_metric_history(run, "x")] == [(3, 1.5)]
    with pytest.raises(FileExistsError):
        mlflow_store(tmp_path / "copied")  # a new store never replaces one
