"""``uma sync RUN`` with no options replays to the tracker runs the journal delivered to."""

from __future__ import annotations

import pytest

from tests.mlflow_store import mlflow_store
from uma_callbacks.cli import main
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.journal import Journal


def _record(step: int, value: float) -> Record:
    return Record(step=step, metric="gradient_flow", status="ok", scalars={"total_norm": value},
                  meta={"config": {"metric": "gradient_flow"}}, cache_key=f"k{step}")


def test_sync_with_no_options_replays_to_the_journals_mlflow_run(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    run = tmp_path / "run"
    uri = mlflow_store(tmp_path, "store.db")  # not the run folder's: the delivery log names it
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    journal = Journal(run / "uma")
    first = _record(1, 0.5)
    journal.append(first)
    delivery = Delivery(journal, [MLflowSink(run_id=run_id, tracking_uri=uri)])
    delivery.send([first])
    delivery.finish()
    journal.append(_record(2, 0.25))  # journal only: the tracker missed it

    assert main(["sync", str(run)]) == 0
    assert f"1 record(s) delivered to mlflow run {run_id}" in capsys.readouterr().out
    history = client.get_metric_history(run_id, "uma/gradient_flow/total_norm")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.25)]
    assert len(client.search_runs([r.experiment_id for r in client.search_experiments()])) == 1  # no new run
    assert main(["sync", str(run)]) == 0  # a second sync adds nothing
    assert "0 record(s) delivered" in capsys.readouterr().out


def test_sync_with_no_delivery_in_the_journal_says_what_to_pass_and_exits_2(tmp_path, capsys):
    journal = Journal(tmp_path / "run" / "uma")
    journal.append(_record(1, 0.5))
    assert main(["sync", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "delivered to none" in err and "--trackers mlflow" in err and "--wandb-run" in err
