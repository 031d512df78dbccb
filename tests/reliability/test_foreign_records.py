"""Issue 17 item 4: journal lines with a valid checksum but a foreign shape are skipped and counted.

Another version (or a hand edit) may write ``{"sha": <valid>, "record": <anything>}``; every
record read from disk is checked against the record schema, and what does not fit is
skipped like a torn line -- the next save, ``uma report``, ``uma sync`` and the backfill
go on with the rest.
"""

from __future__ import annotations

import logging

import pytest

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal, append_line
from uma_callbacks.report import collect_results, collect_series

FOREIGN = [
    {"metric": "m", "status": "ok"},  # no step
    {"step": 3, "metric": "m"},  # no status
    {"step": "3", "metric": "m", "status": "ok"},  # a string where an int belongs
    {"step": 3, "metric": "m", "status": "ok", "scalars": {"x": "1.5"}},  # a string where a float belongs
    {"step": 3, "metric": "m", "status": "ok", "scalars": {"x": True}},
    {"step": 3, "metric": "m", "status": "ok", "files": "step-3/m.json"},
    {"step": 3, "metric": "m", "status": "ok", "error": ["x"]},
    {"step": 3.5, "metric": "m", "status": "ok"},
    {"step": 3, "metric": ["m"], "status": "ok"},
    {"step": 3, "metric": "m", "status": "weird"},
    ["a", "list"],
    "a string",
    None,
]


def test_foreign_lines_are_skipped_counted_and_the_rest_is_read(tmp_path, caplog):
    journal = Journal(tmp_path)
    journal.append(Record(step=1, metric="m", status="ok", scalars={"x": 1.0}, cache_key="k1"))
    for payload in FOREIGN:
        append_line(journal.path, payload)
    journal.append(Record(step=2, metric="m", status="ok", scalars={"x": 2.0}, cache_key="k2"))
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        records = journal.records()
    assert [r.step for r in records] == [1, 2]
    assert journal.bad_lines == len(FOREIGN) and journal.foreign_lines == len(FOREIGN) - 1  # null: damaged
    assert "not a record" in caplog.text
    assert journal.lookup("k2").scalars == {"x": 2.0}
    journal.append(Record(step=3, metric="m", status="ok", scalars={"x": 3.0}))  # the next save works
    assert collect_series(Journal(tmp_path)) == {"m/x": {1: 1.0, 2: 2.0, 3: 3.0}}
    assert [s for s, _ in collect_results(Journal(tmp_path))["m"]] == [1, 2, 3]


def test_a_record_that_would_not_read_back_is_refused_at_append(tmp_path):
    with pytest.raises(ValueError, match="step"):
        Journal(tmp_path).append(Record(step="4", metric="m", status="ok"))  # type: ignore[arg-type]
