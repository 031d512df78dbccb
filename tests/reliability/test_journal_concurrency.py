"""Issue 17 (journal): lookups from an in-memory index, concurrent writers, work split by claims.

- a cache lookup reads only what was appended since the last read (1.6 s per lookup at
  5,000 records before), and still sees records another process appended;
- two processes appending at once never interleave a line (``flock``);
- two backfills split the work: :meth:`Journal.claim` is held by one process at a time,
  and released when that process dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal, _write_lines

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_lookup_is_an_index_not_a_reread(tmp_path):
    journal = Journal(tmp_path)
    _write_lines(
        journal.path,
        [Record(step=i, metric="m", status="ok", scalars={"x": float(i)}, cache_key=f"k{i}").to_dict() for i in range(5000)],
    )
    assert journal.lookup("k10").step == 10  # the first read parses the file once
    parsed = []  # lines parsed per refresh
    read_new = journal._log.read_new

    def counting():
        restarted, payloads = read_new()
        parsed.append(len(payloads) + (10**9 if restarted else 0))
        return restarted, payloads

    journal._log.read_new = counting
    for i in range(200):
        assert journal.lookup(f"k{i}").step == i
    assert sum(parsed) == 0  # a stat and a dict access: no line parsed again
    Journal(tmp_path).append(Record(step=9999, metric="m", status="ok", cache_key="other"))  # another writer
    assert journal.lookup("other").step == 9999
    assert sum(parsed) == 1  # only the new line
    assert len(journal.records()) == 5001 and journal.bad_lines == 0


_WRITER = """
import sys
from uma_callbacks.engine.journal import Journal
from uma_callbacks.core.records import Record
journal = Journal(sys.argv[1])
for i in range(60):
    journal.append(Record(step=i, metric=sys.argv[2], status="ok", scalars={f"k{j}": 1.0 for j in range(1500)}))
"""


@pytest.mark.slow
def test_two_processes_appending_at_once_never_interleave(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), name], env=ENV) for name in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    journal = Journal(tmp_path)
    records = journal.records()
    assert journal.bad_lines == 0
    for name in ("a", "b"):
        assert [r.step for r in records if r.metric == name] == list(range(60))


_HOLDER = """
import sys, time
from uma_callbacks.engine.journal import Journal
journal = Journal(sys.argv[1])
assert journal.claim("key-1")
print("held", flush=True)
time.sleep(600)
"""


def test_a_claim_is_held_by_one_process_and_released_when_it_dies(tmp_path):
    mine, other = Journal(tmp_path), Journal(tmp_path)
    assert mine.claim("key-0") and mine.claim("key-0")  # re-entrant for its holder
    assert not other.claim("key-0")
    mine.release("key-0")
    assert other.claim("key-0")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert not mine.claim("key-1")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert mine.claim("key-1")  # kill -9 released it
