"""The tracker runs of an existing run, for the offline tools (``uma backfill``, ``uma sync``).

A backfill's session passes :func:`journal_runs` to the one resolver
(:func:`~uma_callbacks.integrations.registry.resolve_sinks`); ``uma sync`` calls
:func:`sinks_for_run`, which does the same. An MLflow sink without a run id joins the run this journal last delivered to, in the
store it delivered to (the delivery log records the run; the store is the one given,
else ``MLFLOW_TRACKING_URI``, else the run's local ``mlflow.db``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uma_callbacks.engine.journal import DELIVERIES_FILE, Journal, read_lines
from uma_callbacks.integrations.registry import resolve_sinks, tracker_names
from uma_callbacks.integrations.uris import sqlite_uri


def offline_trackers(
    trackers: Sequence[Any] | None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    wandb_run_id: str | None = None,
) -> list[Any]:
    """The trackers an offline tool logs to.

    ``trackers``, with ``mlflow``/``wandb`` added when a run id or a tracking URI for them is given.
    """
    names = list(trackers or [])
    if (mlflow_run_id or tracking_uri) and "mlflow" not in names:
        names.append("mlflow")
    if wandb_run_id and "wandb" not in names:
        names.append("wandb")
    return names


def journal_runs(
    journal: Journal,
    run_dir: Path,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    wandb_run_id: str | None = None,
) -> dict[str, dict[str, str]]:
    """``{tracker name: {"run", "uri"}}``: the tracker runs an offline tool joins.

    MLflow: the run given, else the one this journal last delivered to; the store given,
    else that delivery's, else ``MLFLOW_TRACKING_URI``, else a local ``mlflow.db`` in the
    run folder or the journal. W&B: the run given (resumed).
    """
    delivered = delivered_run(journal, "mlflow") or {}
    uri = (
        tracking_uri
        or delivered.get("uri")
        or os.environ.get("MLFLOW_TRACKING_URI")
        or _local_store(run_dir, journal.root)
    )
    runs = {"mlflow": {"run": mlflow_run_id or delivered.get("run") or "", "uri": uri or ""}}
    if wandb_run_id:
        runs["wandb"] = {"run": wandb_run_id, "uri": ""}
    return runs


def sinks_for_run(
    trackers: Sequence[Any] | None,
    journal: Journal,
    run_dir: Path,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    wandb_run_id: str | None = None,
) -> list[Any]:
    """The sinks ``uma sync`` logs to.

    Resolved by the one resolver (:func:`~uma_callbacks.integrations.registry.resolve_sinks`),
    as a backfill's session resolves them; an unknown tracker name raises its ``ValueError``.

    Args:
        trackers: names and/or sink objects (:func:`offline_trackers`); none given and no
            run id: the trackers the journal delivered to (:func:`delivered_trackers`), each
            into the run it last delivered to.
        journal: the run's journal (its delivery log names the runs).
        run_dir: the run folder (a local ``mlflow.db`` may be there).
        mlflow_run_id: the MLflow run to log into.
        tracking_uri: the MLflow store to log into.
        wandb_run_id: the W&B run to resume.
    """
    names = offline_trackers(trackers, mlflow_run_id, tracking_uri, wandb_run_id)
    if not names:
        names = delivered_trackers(journal)
    if "wandb" in names and not wandb_run_id:
        wandb_run_id = (delivered_run(journal, "wandb") or {}).get("run")
    runs = journal_runs(journal, run_dir, mlflow_run_id, tracking_uri, wandb_run_id)
    sinks, _ = resolve_sinks(names, runs=runs, capture=False, fallback_dir=journal.root)
    return sinks


def delivered_trackers(journal: Journal) -> list[str]:
    """The tracker names (``mlflow``, ``wandb``, registered ones) the journal delivered to, first seen first.

    What ``uma sync RUN`` replays to when no tracker is given: the runs the training (or an
    earlier backfill) logged to. Sinks of other kinds (a user's sink object) are left out.
    """
    known = set(tracker_names())
    payloads, _ = read_lines(journal.root / DELIVERIES_FILE)
    names = [p.get("sink") for p in payloads if isinstance(p, dict) and isinstance(p.get("run"), str) and p["run"]]
    return [name for name in dict.fromkeys(names) if isinstance(name, str) and name in known]


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
