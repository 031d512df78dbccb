"""New MLflow SQLite stores for tests, without running MLflow's schema migrations in every one.

MLflow creates a store by running its ~50 schema migrations (alembic): 1.0 to 1.7 s a store,
55 stores and 66 s of a full test run. :func:`mlflow_store` copies one MLflow created in this
process instead: a real store of the installed MLflow, same schema and version, from which
the ``Default`` experiment was removed. MLflow re-creates that experiment when it opens the
copy (as it does a fresh store: ``SqlAlchemyStore.__init__``), with its artifact folder
resolved from the current directory then, so the copy is what MLflow would have made there.

Tests of how the product creates a store (its local ``mlflow.db`` fallback, a store that
appears while a run goes on) keep MLflow's own creation.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

_TEMPLATE: Path | None = None


def _remove(folder: str, creator: int) -> None:
    """Remove the template at the exit of the process that made it (not of a child forked from it)."""
    if os.getpid() == creator:
        shutil.rmtree(folder, ignore_errors=True)


def _template() -> Path:
    """The empty store this process copies (created by MLflow on first use)."""
    global _TEMPLATE
    if _TEMPLATE is None or not _TEMPLATE.is_file():
        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="uma-mlflow-template-")
        atexit.register(_remove, folder, os.getpid())
        path = Path(folder) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # MLflow creates and migrates it
        with sqlite3.connect(path) as db:  # re-created at the copy's first open, where it is opened
            db.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        _TEMPLATE = path
    return _TEMPLATE


def mlflow_store(folder: Path, name: str = "mlflow.db") -> str:
    """``sqlite:///<folder>/<name>``: a new empty MLflow store there (``folder`` is created).

    Raises:
        FileExistsError: a file is at that path already.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.exists():
        raise FileExistsError(f"{path} exists: a new store goes to a new path")
    shutil.copyfile(_template(), path)
    return f"sqlite:///{path}"
