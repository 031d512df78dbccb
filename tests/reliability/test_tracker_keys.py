"""Issue 17 item 9: keys a tracker would refuse are mapped, and one refused point blocks nothing.

``heads.c++.weight`` gave a key MLflow refuses; the whole batch failed, and since each
retry restarted at that record no key reached MLflow again. Keys now go through
:func:`~uma_callbacks.integrations.base.tracker_key` (valid keys unchanged, others a
stable safe form with a hash suffix), and a point MLflow still refuses is skipped alone.
"""

from __future__ import annotations

import logging

import pytest

from tests.mlflow_store import mlflow_store
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.journal import Journal
from uma_callbacks.integrations.base import tracker_key

mlflow = pytest.importorskip("mlflow")

HOSTILE = [
    "uma/gradient_flow/params/heads.c++.weight/norm",
    "uma/gradient_flow/params/heads.c--.weight/norm",
    "uma/m/a:b",
    "uma/m/a;b",
    "uma/m//double",
    "uma/m/../up",
    "uma/m/./here",
    "uma/m/trailing/",
    "/uma/m/lead",
    "uma/m/ünïcode",
    "uma/m/" + "k" * 300,
    "uma/m/" + "k" * 299,
    "uma/m/tab\tkey",
    "uma/m/nul\x00key",
]


def test_tracker_key_is_valid_stable_and_collision_free():
    from mlflow.utils.validation import _validate_metric_name

    mapped = [tracker_key(k) for k in HOSTILE]
    for key in mapped:
        _validate_metric_name(key)  # raises on a key MLflow refuses
        assert tracker_key(key) == key  # a mapped key is valid as it is
    assert len(set(mapped)) == len(HOSTILE)
    assert tracker_key("uma/gradient_flow/total_norm") == "uma/gradient_flow/total_norm"
    assert mapped[0] == "uma/gradient_flow/params/heads.c__.weight/norm-30f3c5aa80"  # documented, stable


def _records():
    bad = {"params/heads.c++.weight/norm": 1.0, "total_norm": 2.0}
    return [
        Record(step=1, metric="gradient_flow", status="ok", scalars=bad, cache_key="k1"),
        Record(step=2, metric="gradient_flow", status="ok", scalars={"total_norm": 3.0}, cache_key="k2"),
    ]


def test_a_parameter_named_c_plus_plus_reaches_mlflow_and_the_rest_follows(tmp_path):
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    journal = Journal(tmp_path / "uma")
    for r in _records():
        journal.append(r)
    sink = MLflowSink(tracking_uri=mlflow_store(tmp_path))
    delivery = Delivery(journal, [sink])
    delivery.send_pending()
    client = MlflowClient(sink.tracking_uri)
    assert [m.step for m in client.get_metric_history(sink.run_id(), "uma/gradient_flow/total_norm")] == [1, 2]
    key = tracker_key("uma/gradient_flow/params/heads.c++.weight/norm")
    assert [m.value for m in client.get_metric_history(sink.run_id(), key)] == [1.0]
    assert len(journal.delivered("mlflow", sink.run_id())) == 2


def test_a_point_mlflow_refuses_is_skipped_alone_and_reported_once(tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    import uma_callbacks.integrations.mlflow as sink_module

    monkeypatch.setattr(sink_module, "tracker_key", lambda key: key)  # no mapping: MLflow refuses the key
    journal = Journal(tmp_path / "uma")
    for r in _records():
        journal.append(r)
    sink = sink_module.MLflowSink(tracking_uri=mlflow_store(tmp_path))
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        Delivery(journal, [sink]).send_pending()
        journal.append(Record(step=3, metric="gradient_flow", status="ok", scalars=_records()[0].scalars, cache_key="k3"))
        Delivery(journal, [sink]).send_pending()
    client = MlflowClient(sink.tracking_uri)
    assert [m.step for m in client.get_metric_history(sink.run_id(), "uma/gradient_flow/total_norm")] == [1, 2, 3]
    assert list(sink.rejected) == ["uma/gradient_flow/params/heads.c++.weight/norm"]
    assert caplog.text.count("refused the key") == 1
