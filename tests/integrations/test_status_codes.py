"""Each record's outcome per step (``uma/<metric>/status_code``), read back from a real offline W&B run file and a real MLflow store."""

from __future__ import annotations

import pytest

from tests.integrations.wandb_runfile import history_rows, settled_records
from tests.mlflow_store import mlflow_store
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import deliver
from uma_callbacks.engine.journal import Journal
from uma_callbacks.integrations.status_codes import FAILED_FROM, STATUS_CODES, status_legend, status_values

#: ``(step, metric, status)`` delivered, in this order.
OUTCOMES = [
    (2, "fisher", "ok"),
    (2, "interpolation", "skipped"),  # no previous checkpoint yet
    (4, "fisher", "partial"),
    (4, "interpolation", "ok"),
    (6, "fisher", "error"),  # out of memory
    (6, "interpolation", "timeout"),
    (8, "fisher", "cached"),
    (8, "interpolation", "interrupted"),
    (10, "checkpoint", "error"),  # the checkpoint could not be loaded
    (12, "spike", "ok"),  # the spike's marker: no metric, no code
    (12, "spike/fisher", "ok"),
]
#: ``{key: [(step, code)]}`` the trackers must hold.
WANT = {
    "uma/fisher/status_code": [(2, 0.0), (4, 1.0), (6, 5.0), (8, 0.0)],
    "uma/interpolation/status_code": [(2, 2.0), (4, 0.0), (6, 3.0), (8, 4.0)],
    "uma/checkpoint/status_code": [(10, 5.0)],
    "uma/spike/fisher/status_code": [(12, 0.0)],
}


def _records(root):
    out = []
    for step, metric, status in OUTCOMES:
        valued = status in ("ok", "partial", "cached")
        out.append(
            Record(
                step=step, metric=metric, status=status, scalars={"trace": float(step)} if valued else {},
                meta={"seconds": 0.5} if valued else {}, files=[], cache_key=f"{metric}-{step}",
                error=None if valued else {"type": "E", "message": status, "traceback": ""},
            )  # fmt: skip
        )
    journal = Journal(root)
    for record in out:
        journal.append(record)
    return journal, out


def test_the_codes_and_their_legend():
    assert set(STATUS_CODES) == {"ok", "cached", "partial", "skipped", "timeout", "interrupted", "error"}
    assert status_legend() == "0 ok, 1 partial, 2 skipped, 3 timeout, 4 interrupted, 5 error"
    assert [s for s, c in STATUS_CODES.items() if c >= FAILED_FROM] == ["timeout", "interrupted", "error"]
    for step, metric, status in OUTCOMES:
        got = status_values(Record(step=step, metric=metric, status=status, scalars={}, meta={}, files=[], cache_key=""))
        assert got == ({} if metric == "spike" else {f"uma/{metric}/status_code": float(STATUS_CODES[status])})


def test_wandb_history_holds_each_records_outcome_at_its_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from uma_callbacks.integrations.wandb import WandbSink

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wb").mkdir()
    wandb.teardown()
    try:
        journal, records = _records(tmp_path / "uma")
        sink = WandbSink(project="uma-test")
        assert deliver(journal, sink, records) == len(records)
        for record in records:  # again in the same process: nothing more
            sink.log_record(record, journal.root)
        summary_status = sink.run.summary.get("uma/fisher/status")
        sink.finish()
        rows = [r for r in history_rows(settled_records(tmp_path / "wb", lambda rows: any(
            r.get("uma/step") == 12 and "uma/spike/fisher/status_code" in r for r in rows))) if "uma/step" in r]  # fmt: skip
    finally:
        wandb.teardown()
    keys = sorted({k for r in rows for k in r if k.endswith("/status_code")})
    got = {key: [(r["uma/step"], r[key]) for r in rows if key in r] for key in keys}
    assert got == WANT
    assert summary_status == "ok"  # the summary still holds the latest outcome's name (the cached step 8)
    # a failed record's row holds its code and no value
    failed = next(r for r in rows if r["uma/step"] == 6 and "uma/fisher/status_code" in r)
    assert "uma/fisher/trace" not in failed and "uma/fisher/seconds" not in failed


def test_mlflow_holds_each_records_outcome_at_its_step(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    journal, records = _records(tmp_path / "uma")
    sink = MLflowSink(tracking_uri=mlflow_store(tmp_path))
    assert deliver(journal, sink, records) == len(records)
    again = MLflowSink(tracking_uri=sink.tracking_uri, run_id=sink.run_id())  # a second process: no point twice
    for record in records:
        again.log_record(record, journal.root)
    client = MlflowClient(sink.tracking_uri)
    logged = client.get_run(sink.run_id()).data.metrics
    assert sorted(k for k in logged if k.endswith("/status_code")) == sorted(WANT)
    for key, want in WANT.items():
        assert sorted((m.step, m.value) for m in client.get_metric_history(sink.run_id(), key)) == want, key
    tags = client.get_run(sink.run_id()).data.tags
    assert tags["uma.interpolation.status"] == "interrupted" and tags["uma.fisher.status"] == "ok"  # the latest, as before
