"""Crash safety: ``kill -9`` during journal writes, SIGTERM during a metric.

``kill -9`` during a backfill, then a rerun (complete, no duplicates), is
``tests/test_backfill.py::test_kill_9_halfway_then_rerun_completes_without_duplicates``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal, append_line, read_lines

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

_APPENDER = """
import sys
from uma_callbacks.engine.journal import Journal
from uma_callbacks.core.records import Record
journal = Journal(sys.argv[1])
for i in range(100000):
    # big lines, so that a kill lands inside a write more often
    journal.append(Record(step=i, metric="m", status="ok", scalars={f"k{j}": float(i) for j in range(2000)}))
    print(i, flush=True)
"""


def _wait_for_line(proc, pattern: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if pattern in line:
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"child ended early: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {pattern!r} within {timeout} s")


@pytest.mark.slow
def test_kill_9_mid_stream_of_appends_leaves_a_readable_journal(tmp_path):
    script = tmp_path / "append.py"
    script.write_text(_APPENDER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_line(proc, "20")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    acknowledged = max(int(line) for line in [*proc.stdout.read().split(), "20"])
    journal = Journal(tmp_path)
    steps = [r.step for r in journal.records()]
    assert steps == list(range(len(steps)))  # an intact prefix, in order
    assert len(steps) >= acknowledged + 1  # every append the child saw return is there (fsync-ed)
    assert journal.bad_lines <= 1  # at most the line being written when killed
    # appending after the crash lands on a line of its own and reads back
    journal.append(Record(step=-1, metric="after", status="ok"))
    assert journal.records()[-1].metric == "after"


def test_torn_last_line_is_skipped_reported_and_the_next_append_survives(tmp_path, caplog):
    """A child writes half a line, then kills itself with SIGKILL (a torn write, deterministic)."""
    journal = Journal(tmp_path)
    journal.append(Record(step=1, metric="m", status="ok", scalars={"a": 1.0}))
    code = textwrap.dedent(f"""
        import os, signal
        fd = os.open({str(journal.path)!r}, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b'{{"record": {{"step": 2, "metric": "m", "sta')
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        assert [r.step for r in journal.records()] == [1]
    assert journal.bad_lines == 1 and "damaged journal line" in caplog.text
    journal.append(Record(step=3, metric="m", status="ok"))
    assert [r.step for r in journal.records()] == [1, 3] and journal.bad_lines == 1


_SIGTERM_SCRIPT = """
import sys, time
import torch
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics.base import Metric, MetricResult
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite

class Slow(Metric):
    name = "slow"
    def _compute(self, ctx):
        for i in range(100000):
            if i == 1:
                print("computing", flush=True)
            time.sleep(0.05)  # one "chunk"
            ctx.check_time(chunks_done=i + 1)
        return MetricResult(name=self.name, scalars={"x": 1.0})

model = torch.nn.Linear(2, 1)
probe = Probe([{"x": torch.ones(3, 2), "y": torch.ones(3)}])
loss = lambda m, b: (m(b["x"]).squeeze(-1) - b["y"]) ** 2
suite = MetricSuite([Slow()], journal=Journal(sys.argv[1]), loss_fn=loss, draw_figures=False)
suite.run(model, probe, step=7)
print("NOT REACHED: training would go on", flush=True)
"""


@pytest.mark.slow
def test_sigterm_during_a_metric_journals_it_as_interrupted_and_the_process_ends(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(_SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_line(proc, "computing")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # a bound on a stuck test, not a measure: the metric stops at its next check
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGTERM  # the default handler ran, after the journal line
    assert "NOT REACHED" not in proc.stdout.read()
    journal = Journal(tmp_path)
    (record,) = journal.records()
    assert journal.bad_lines == 0
    assert record.status == "interrupted" and record.error["type"] == "MetricInterrupted"
    assert record.meta["progress"]["chunks_done"] >= 1


def test_suite_restores_the_sigterm_handler_it_found(tmp_path):
    import torch

    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite
    from uma_callbacks.metrics import GradientFlow

    def mine(signum, frame):  # a user's handler
        raise AssertionError("not called here")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        model = torch.nn.Linear(2, 1)
        probe = Probe([{"x": torch.randn(4, 2), "y": torch.randn(4)}])
        suite = MetricSuite([GradientFlow()], journal=Journal(tmp_path), draw_figures=False,
                            loss_fn=lambda m, b: (m(b["x"]).squeeze(-1) - b["y"]) ** 2)
        assert suite.run(model, probe, step=1)[0].status == "ok"
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_journal_reader_never_executes_what_it_reads(tmp_path):
    """A hostile journal line is data: JSON only, checksummed, never unpickled or evaluated."""
    path = tmp_path / "journal.jsonl"
    path.write_text('{"sha": "0", "record": {"__reduce__": "os.system(\'touch pwned\')"}}\n'
                    "cos\nsystem\n(S'touch pwned'\ntR.\n")
    payloads, bad = read_lines(path)
    assert payloads == [] and bad >= 2
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    append_line(path, {"ok": 1})
    assert read_lines(path)[0] == [{"ok": 1}]
