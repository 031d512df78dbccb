"""Delivery: a sink that fails is retried with all it missed; configurations never mix."""

from __future__ import annotations

from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.journal import Journal
from uma_callbacks.integrations.base import MemorySink, Sink


def _record(step, config, key, value=1.0):
    return Record(step=step, metric="hessian", status="ok", scalars={"trace": value},
                  meta={"config": config}, cache_key=key)  # fmt: skip


def test_another_config_at_the_same_step_is_logged_under_its_own_key(tmp_path):
    journal, sink = Journal(tmp_path), MemorySink()
    delivery = Delivery(journal, [sink])
    live = _record(5, {"metric": "hessian", "top_k": 10}, "live", -26.96)
    journal.append(live)
    delivery.send([live])
    other = _record(5, {"metric": "hessian", "top_k": 2}, "backfill", 35.5)
    journal.append(other)
    delivery.send([other])
    later = _record(6, {"metric": "hessian", "top_k": 2}, "backfill6", 30.0)
    journal.append(later)
    delivery.send([later])
    logged = [(r.step, r.metric, r.scalars["trace"]) for r in sink.records]
    assert logged[0] == (5, "hessian", -26.96)  # the live value keeps its key
    assert logged[1][1].startswith("hessian-") and logged[1][2] == 35.5  # never under the live key
    assert logged[2] == (6, "hessian", 30.0)  # a step nobody measured before: the plain key
    # a fresh delivery object (another process) sees the same from the journal
    again = MemorySink()
    again.name = "memory2"
    fresh = Delivery(journal, [again])
    fresh.send_pending()
    assert [r.metric for r in again.records][:2] == ["hessian", logged[1][1]]


class DownAtStart(Sink):
    name = "flaky-start"

    def __init__(self):
        super().__init__()
        self.up, self.started, self.got = False, 0, []

    def start(self):
        if not self.up:
            raise ConnectionError("tracker unreachable")
        self.started += 1

    def run_id(self):
        return "run"

    def log_record(self, record, root):
        self.got.append(record.step)

    def log_params(self, params):
        self.params = params


def test_a_sink_down_at_the_start_is_started_later_and_gets_everything(tmp_path, caplog):
    journal, sink = Journal(tmp_path), DownAtStart()
    delivery = Delivery(journal, [sink])
    delivery.start({"probe_fingerprint": "abc"})
    for step in (1, 2):
        record = _record(step, {"metric": "hessian"}, f"k{step}")
        journal.append(record)
        delivery.send([record])
    assert sink.got == [] and delivery.failing == {"flaky-start"}
    assert sum("tracker unreachable" in m for m in caplog.messages) == 1
    sink.up = True
    record = _record(3, {"metric": "hessian"}, "k3")
    journal.append(record)
    delivery.send([record])
    assert sorted(sink.got) == [1, 2, 3] and sink.params == {"probe_fingerprint": "abc"}
    assert delivery.failing == set()


class PickySink(MemorySink):
    """Refuses one record for its content (a field it cannot log), takes the others."""

    def log_record(self, record, root):
        if record.step == 2:
            raise ValueError("a field this tracker cannot log")
        super().log_record(record, root)


def test_a_record_a_sink_cannot_take_is_skipped_alone_and_the_rest_go(tmp_path, caplog):
    journal, sink = Journal(tmp_path), PickySink()
    records = [_record(step, {"metric": "hessian"}, f"k{step}") for step in (1, 2, 3, 4)]
    for record in records:
        journal.append(record)
    delivery = Delivery(journal, [sink])
    with caplog.at_level("WARNING", logger="uma_callbacks"):
        delivery.send(records)
        delivery.send_pending()  # tried again, warned once
    assert [r.step for r in sink.records] == [1, 3, 4]
    assert list(delivery.refused) == [(sink.name, records[1].record_id)]
    assert sum("could not take" in r.getMessage() for r in caplog.records) == 1
    assert not delivery.failing  # the sink itself is healthy: no outage reported
