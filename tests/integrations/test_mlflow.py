"""MLflowSink against a real SQLite store in ``tmp_path``, read back with ``MlflowClient``."""

from __future__ import annotations

import sys

import pytest

from tests.mlflow_store import mlflow_store
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import deliver
from uma_callbacks.engine.journal import Journal

mlflow = pytest.importorskip("mlflow")


def _record(root, step, metric="gradient_flow", status="ok", **scalars):
    folder = root / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{metric}.json").write_text("{}")
    return Record(
        step=step,
        metric=metric,
        status=status,
        scalars=scalars or {"total_norm": 1.0 + step, "layers/model.fc/norm": 0.5 * step},
        meta={"seconds": 0.25},
        files=[f"step-{step}/{metric}.json"],
        cache_key=f"key-{step}-{metric}",
        error=None if status == "ok" else {"type": "RuntimeError", "message": "boom", "traceback": ""},
    )


@pytest.fixture
def store(tmp_path):

    return mlflow_store(tmp_path)


def test_same_checkpoint_twice_adds_no_points(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    journal = Journal(tmp_path / "uma")
    records = [_record(journal.root, 3), _record(journal.root, 6)]
    for r in records:
        journal.append(r)
    sink = MLflowSink(tracking_uri=store)
    assert deliver(journal, sink, records) == 2
    assert deliver(journal, sink, records) == 0  # the delivery log
    for r in records:  # the sink itself, same process: reads each key's history once
        sink.log_record(r, journal.root)
    # a new process (fresh sink, fresh journal folder) joining the same run: still no new points
    again = MLflowSink(run_id=sink.run_id(), tracking_uri=store)
    fresh = Journal(tmp_path / "elsewhere")
    assert deliver(fresh, again, [_record(journal.root, 3)]) == 1
    client = MlflowClient(store)
    for key, expected in (
        ("uma/gradient_flow/total_norm", [(3, 4.0), (6, 7.0)]),
        ("uma/gradient_flow/layers/model.fc/norm", [(3, 1.5), (6, 3.0)]),
        ("uma/gradient_flow/seconds", [(3, 0.25), (6, 0.25)]),
    ):
        assert sorted((m.step, m.value) for m in client.get_metric_history(sink.run_id(), key)) == expected
    arts = [f.path for f in client.list_artifacts(sink.run_id(), "uma/step-3")]
    assert arts == ["uma/step-3/gradient_flow.json"]


def test_params_and_error_tags(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    journal = Journal(tmp_path / "uma")
    sink = MLflowSink(tracking_uri=store, experiment_name="uma-params")
    sink.log_params({"probe_fingerprint": "abc123", "fisher.config": {"metric": "fisher", "top_k": 4}})
    sink.log_params({"probe_fingerprint": "abc123"})  # logged once, no error on repeat
    failed = _record(journal.root, 4, metric="fisher", status="error", trace=float("nan"))
    failed.files = []
    journal.append(failed)
    deliver(journal, sink, [failed])
    run = MlflowClient(store).get_run(sink.run_id())
    assert run.data.params["uma.probe_fingerprint"] == "abc123"
    assert "'top_k': 4" in run.data.params["uma.fisher.config"]
    assert run.data.tags["uma.fisher.status"] == "error"
    assert run.data.tags["uma.fisher.error"] == "step 4: boom"
    assert "uma/fisher/trace" not in run.data.metrics  # a NaN is never logged


def test_missing_mlflow_fails_at_construction_naming_the_extra(monkeypatch):
    from uma_callbacks import UMACallback
    from uma_callbacks.integrations.mlflow import MLflowSink

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'uma-callbacks\[mlflow\]'"):
        UMACallback(trackers=["mlflow"])
    with pytest.raises(ModuleNotFoundError, match=r"uma-callbacks\[mlflow\]"):
        MLflowSink()


def test_status_tag_follows_the_latest_step_and_findings_become_tags(tmp_path, store):
    """An error at one step, ok at the next: the tag says ok (no stale error); a partial result
    is tagged partial with its values logged; a one-off finding (meta summary) is a tag."""
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    journal = Journal(tmp_path / "uma")
    sink = MLflowSink(tracking_uri=store)
    sink.start()
    tags = lambda: MlflowClient(store).get_run(sink.run_id()).data.tags  # noqa: E731
    first = _record(journal.root, 1, metric="hessian", status="error")
    deliver(journal, sink, [first])
    assert tags()["uma.hessian.status"] == "error"
    deliver(journal, sink, [_record(journal.root, 2, metric="hessian", trace=3.0)])
    assert tags()["uma.hessian.status"] == "ok"
    partial = _record(journal.root, 3, metric="hessian", status="ok", trace=4.0)
    partial.status, partial.error = "partial", None
    deliver(journal, sink, [partial])
    assert tags()["uma.hessian.status"] == "partial"
    history = MlflowClient(store).get_metric_history(sink.run_id(), "uma/hessian/trace")
    assert sorted((m.step, m.value) for m in history) == [(2, 3.0), (3, 4.0)]
    found = _record(journal.root, 4, metric="pruning", mask_distance_prev=0.01, early_bird_step=2.0)
    found.meta["summary"] = {"early_bird_step": 2}
    deliver(journal, sink, [found])
    assert tags()["uma.pruning.early_bird_step"] == "2"
