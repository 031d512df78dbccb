"""The figure worker's drawing paid from the compute budget: measured in the worker, owed to the time bank.

Fake unit costs and fake metrics; the drawer burns a known amount of its thread's CPU, and
each assertion on seconds compares what was measured with what was debited (no bound on a
clock's speed).
"""

from __future__ import annotations

import time

import pytest

from tests.cases import mlp_case
from tests.engine.test_time_bank import UNITS, Costing
from uma_callbacks.config import UMAConfig
from uma_callbacks.engine import suite as suite_module
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.late_figures import LateFigures
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.time_budget import TimeBank, plan_save
from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.session import Session

PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 32
DRAWING_CPU = 0.2  # CPU seconds each fake drawing burns in the worker thread


def _burning_drawer(result: MetricResult) -> dict[str, bytes]:
    """Spend :data:`DRAWING_CPU` CPU seconds of this thread, then return one figure."""
    started = time.thread_time()
    while time.thread_time() - started < DRAWING_CPU:
        sum(range(1000))
    return {f"{result.name}.png": PNG}


def test_the_worker_measures_each_drawings_cpu_seconds_and_hands_them_out_once(tmp_path):
    from uma_callbacks.core.records import Record

    journal = Journal(tmp_path)
    figures = LateFigures(_burning_drawer)
    for step in (1, 2):
        record = Record(step=step, metric="m", status="ok", scalars={"x": 1.0}, cache_key=f"k{step}")
        journal.write_result(record, MetricResult(name="m", scalars={"x": 1.0}))
        journal.append(record)
        figures.submit(record, tmp_path)
    figures.collect(wait=True)
    assert figures.take_seconds() >= 2 * DRAWING_CPU
    assert figures.take_seconds() == 0.0  # each second is owed once
    figures.shutdown()


def test_a_charge_lowers_the_next_saves_own_budget_and_its_share_says_so():
    metric = Costing("costly", 10.0)  # 2.0 s, no knob: its floor is its estimate
    plain = plan_save([metric], UNITS, 2.0, TimeBank(), step=40)
    charged_bank = TimeBank()
    charged_bank.charge(0.4)  # a figure drawn since the last save
    charged = plan_save([metric], UNITS, 2.0, charged_bank, step=40)
    assert plain.shares == {"costly": pytest.approx(2.0)}
    assert charged.own_seconds == pytest.approx(1.6) and charged.shares == {"costly": pytest.approx(1.6)}
    charged_bank.charge(0.4)  # now its floor, 2.0 s, does not fit 1.5 x 1.2 s: it waits, saying why
    waits = plan_save([metric], UNITS, 2.0, charged_bank, step=40)
    assert waits.shares == {} and "this save has 1.20 s" in waits.waiting["costly"]
    charged_bank.settle(40, 2.0, 0.0)  # the save repaid the debt from its budget
    assert charged_bank.seconds == pytest.approx(1.2)


def _session(tmp_path, monkeypatch, **budget) -> Session:
    monkeypatch.setattr(suite_module, "measure_unit_costs", lambda model, batches, loss_fn: UNITS)
    _, batches, loss_fn = mlp_case()
    config = UMAConfig(metrics=[Costing("costly", 20.0)], loss_fn=loss_fn, trackers=[], use_cache=False, **budget)
    session = Session(config, tmp_path / "uma", source="callback")
    assert session.figures is not None
    session.figures = LateFigures(_burning_drawer)
    session.open(Probe(batches))
    return session


def test_a_drawings_measured_seconds_are_debited_from_the_bank_and_shrink_the_next_saves_share(tmp_path, monkeypatch):
    session = _session(tmp_path, monkeypatch, seconds_per_save=2.0)
    model, _, _ = mlp_case()
    [first] = session.measure(model, 40)  # 4.0 s does not fit one save's 2.0 s: it waits, and the save is banked
    assert first.status == "skipped" and "compute budget" in first.error["message"]
    session.collect_figures(wait=True)  # a skipped record has no figure: nothing drawn yet
    session.suite.time_bank.seconds = bank_before = 2.0  # what the first save banked, on a machine that kept up
    drawn = []
    session.figures.submit(first, session.journal.root)  # a figure drawn between the saves
    session.collect_figures(wait=True)
    take = session.figures.take_seconds

    def measured_take() -> float:
        drawn.append(take())
        return drawn[-1]

    monkeypatch.setattr(session.figures, "take_seconds", measured_take)
    [second] = session.measure(model, 80)
    assert drawn and drawn[0] >= DRAWING_CPU
    budget = second.meta["compute_budget"]
    # the bank paid for the drawing before the save was planned, and the metric got that much less
    assert budget["bank_seconds"] == pytest.approx(bank_before - drawn[0], abs=1e-3)
    assert second.status == "ok" and budget["from_bank"]
    assert budget["seconds"] == pytest.approx(2.0 + bank_before - drawn[0], abs=1e-3)
    assert budget["seconds"] < 4.0  # without the drawing: its whole 4.0 s
    session.close()


def test_without_a_compute_budget_nothing_is_charged(tmp_path, monkeypatch):
    session = _session(tmp_path, monkeypatch)
    model, _, _ = mlp_case()
    [first] = session.measure(model, 40)
    session.figures.submit(first, session.journal.root)
    session.collect_figures(wait=True)
    session.measure(model, 80)
    assert session.suite.time_bank.seconds == 0.0
    assert session.figures.take_seconds() >= DRAWING_CPU  # still there: nobody took it
    session.close()
