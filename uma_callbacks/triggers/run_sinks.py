"""The sinks of an existing run, for the offline tools (``uma backfill``, ``uma sync``).

An MLflow sink without a run id joins the run this journal last delivered to, in the
store it delivered to (the delivery log records the run; the store is the one given,
else ``MLFLOW_TRACKING_URI``, else the run's local ``mlflow.db``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uma_callbacks.engine.journal import DELIVERIES_FILE, Journal, read_lines
from uma_callbacks.integrations.registry import make_sink
from uma_callbacks.integrations.uris import sqlite_uri


def sinks_for_run(
    trackers: Sequence[Any] | None,
    journal: Journal,
    run_dir: Path,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    wandb_run_id: str | None = None,
) -> list[Any]:
    """The sinks a backfill or a sync logs to.

    Args:
        trackers: names and/or sink objects; ``mlflow``/``wandb`` are added when a run id
            or a tracking URI for them is given.
        journal: the run's journal (its delivery log names the runs).
        run_dir: the run folder (a local ``mlflow.db`` may be there).
        mlflow_run_id, tracking_uri: the MLflow run and store to log into.
        wandb_run_id: the W&B run to resume.

    Raises:
        ValueError: an unknown tracker name.
    """
    names = list(trackers or [])
    if (mlflow_run_id or tracking_uri) and "mlflow" not in names:
        names.append("mlflow")
    if wandb_run_id and "wandb" not in names:
        names.append("wandb")
    sinks = []
    for tracker in names:
        if not isinstance(tracker, str):
            sinks.append(tracker)
        elif tracker == "mlflow":
            delivered = delivered_run(journal, "mlflow")
            run_id = mlflow_run_id or (delivered or {}).get("run")
            uri = (
                tracking_uri
                or (delivered or {}).get("uri")
                or os.environ.get("MLFLOW_TRACKING_URI")
                or _local_store(run_dir, journal.root)
            )
            sinks.append(make_sink("mlflow", run_id=run_id, tracking_uri=uri, fallback_dir=journal.root))
        elif tracker == "wandb":
            if wandb_run_id:
                os.environ["WANDB_RUN_ID"] = wandb_run_id
                os.environ.setdefault("WANDB_RESUME", "allow")
            sinks.append(make_sink("wandb"))
        else:
            sinks.append(make_sink(tracker, fallback_dir=journal.root))
    return sinks


def delivered_run(journal: Journal, sink: str) -> dict[str, str] | None:
    """``{"run", "uri"}`` of the run this journal last delivered to for ``sink`` (``None`` if never)."""
    payloads, _ = read_lines(journal.root / DELIVERIES_FILE)
    runs = [p for p in payloads if isinstance(p, dict) and p.get("sink") == sink and isinstance(p.get("run"), str) and p["run"]]
    if not runs:
        return None
    last = runs[-1]
    uri = last.get("uri")
    return {"run": last["run"], "uri": uri if isinstance(uri, str) else ""}


def _local_store(run_dir: Path, root: Path) -> str | None:
    for folder in (run_dir, root):
        if (folder / "mlflow.db").is_file():
            return sqlite_uri(folder / "mlflow.db")  # escaped: a%41b, a?b
    return None
