"""The compute budget carried between saves, and the probe's unit costs reused while nothing changed.

Fake unit costs and fake metrics only: no assertion reads a clock.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.cases import mlp_case
from uma_callbacks.engine import suite as suite_module
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.engine.time_budget import BANK_SAVES, FIT_SLACK, TimeBank, UnitCosts, plan_save
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult

UNITS = UnitCosts(forward=0.1, backward=0.2, hvp=0.5, n_batches=2)


class Costing(Metric):
    """A metric with no knob that costs ``backwards`` x one backward of the probe."""

    name = "costing"

    def __init__(self, name: str, backwards: float) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.backwards = backwards

    def time_cost(self, units: UnitCosts) -> float:
        return self.backwards * units.backward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        return MetricResult(name=self.name, scalars={"x": 1.0})


def test_a_metric_too_costly_for_one_save_waits_then_runs_on_the_banked_budget():
    cheap, costly = Costing("cheap", 1.0), Costing("costly", 10.0)  # 0.2 s and 2.0 s
    bank = TimeBank()
    ran = {}
    for step in (40, 80, 120, 160, 200, 240):
        plan = plan_save([cheap, costly], UNITS, 0.5, bank, step)
        for name in plan.shares:
            ran.setdefault(name, []).append(step)
        if "costly" in plan.waiting:
            bank.waiting.setdefault("costly", step)
            assert "needs about 2.00 s" in plan.waiting["costly"]
        else:
            bank.waiting.pop("costly", None)
        bank.settle(step, 0.5, sum(plan.shares.values()))  # each spends what it was given
    assert ran["cheap"] == [40, 80, 120, 160, 200, 240]  # the save's own budget, every time
    # 2.0 s needs a pool of 2.0 / 1.5: the 0.3 s each save leaves, banked over 4 saves, plus the 5th's
    assert ran["costly"] == [200]
    assert bank.seconds == pytest.approx(0.3)


def test_the_longest_waiting_metric_takes_the_bank_first_so_a_cheaper_one_never_starves_it():
    first, second = Costing("first", 8.0), Costing("second", 4.0)  # 1.6 s and 0.8 s: neither fits 0.4 s
    bank = TimeBank(seconds=0.5, waiting={"first": 40, "second": 80})
    plan = plan_save([first, second], UNITS, 0.4, bank, 120)
    # the pool (0.9 s) would run `second` (0.8 <= 1.5 x 0.9), but `first` waited longer: the bank is its
    assert plan.shares == {} and list(plan.waiting) == ["first", "second"]
    assert "runs after first" in plan.waiting["second"]
    bank.seconds = 1.2  # pool 1.6 s: `first` runs, with all of it
    plan = plan_save([first, second], UNITS, 0.4, bank, 160)
    assert plan.from_bank == ("first",) and plan.shares["first"] == pytest.approx(1.6)


def test_the_bank_is_capped_at_ten_saves_and_a_debt_is_repaid_first():
    bank = TimeBank()
    for step in range(1, 30):
        bank.settle(step, 1.0, 0.0)
    assert bank.seconds == pytest.approx(BANK_SAVES * 1.0) and len(bank.steps) == BANK_SAVES
    assert bank.steps == list(range(20, 30))
    bank.settle(30, 1.0, 30.0)  # a save overran: owed, up to one save's budget
    assert bank.seconds == pytest.approx(-1.0) and bank.steps == []
    plan = plan_save([Costing("cheap", 1.0)], UNITS, 3.0, bank, 31)
    assert plan.own_seconds == pytest.approx(2.0) and plan.bank_seconds == 0.0


def test_a_floor_over_ten_saves_never_runs_and_is_warned_once_with_the_overhead_it_needs(caplog):
    huge = Costing("huge", 1000.0)  # 200 s, against 0.5 s per save
    suite = MetricSuite(metrics=[huge], overhead=0.05)
    plan = plan_save([huge], UNITS, 0.5, suite.time_bank, 40)
    assert plan.never == {"huge": pytest.approx(200.0)} and not plan.shares
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        suite._warn_never(plan, 0.5)
        suite._warn_never(plan, 0.5)
    lines = [r.getMessage() for r in caplog.records if "never fits" in r.getMessage()]
    assert len(lines) == 1
    # 200 s every 10th save at 1.5 x slack: 200 / 15 = 13.3 s a save, 0.05 x 13.3 / 0.5 = 1.33
    every_tenth = 0.05 * 200.0 / (FIT_SLACK * BANK_SAVES) / 0.5
    assert f"overhead >= {every_tenth:.3g}" in lines[0] and "huge" in lines[0]


def _suite_and_probe(metrics, monkeypatch):
    timed = []

    def fake_units(model, batches, loss_fn):
        timed.append(tuple(p.dtype for p in model.parameters()))
        return UNITS

    monkeypatch.setattr(suite_module, "measure_unit_costs", fake_units)
    model, batches, loss_fn = mlp_case()
    suite = MetricSuite(metrics=metrics, loss_fn=loss_fn, draw_figures=False)
    return suite, model, Probe(batches), timed


def test_unit_costs_are_timed_once_and_reused_while_shapes_and_probe_are_unchanged(monkeypatch):
    suite, model, probe, timed = _suite_and_probe([Costing("cheap", 1.0)], monkeypatch)
    records = []
    for step in (1, 2, 3):
        with torch.no_grad():
            model.fc1.weight.add_(0.1)  # other weights, same shapes
        records += suite.run(model, probe, step=step, seconds=5.0)
    assert len(timed) == 1
    budgets = [r.meta["compute_budget"] for r in records]
    assert [b["unit_costs_reused"] for b in budgets] == [False, True, True]
    assert {b["unit_costs_step"] for b in budgets} == {1}
    model.float()  # another dtype: timed again
    suite.run(model, probe, step=4, seconds=5.0)
    suite.run(model, Probe(probe.batches[:1]), step=5, seconds=5.0)  # another probe: timed again
    assert len(timed) == 3


def test_a_timing_before_training_is_reused_at_the_first_save_and_owed_to_its_budget(monkeypatch):
    suite, model, probe, timed = _suite_and_probe([Costing("cheap", 1.0), Costing("costly", 40.0)], monkeypatch)
    units, _ = suite.unit_costs(model, probe, step=-1)
    assert units == UNITS and suite.time_bank.seconds <= 0.0  # what the timing took is owed
    predicted = suite.predicted_seconds(units)
    assert predicted["costly"] == (pytest.approx(8.0), pytest.approx(8.0))
    records = suite.run(model, probe, step=10, seconds=1.0)
    assert len(timed) == 1
    cheap, costly = records
    assert cheap.status == "ok" and cheap.meta["compute_budget"]["unit_costs_step"] == -1
    assert costly.status == "skipped" and "compute budget" in costly.error["message"]
    assert costly.meta["compute_budget"]["waiting_since_step"] == 10
