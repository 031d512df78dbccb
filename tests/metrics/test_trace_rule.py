"""The Hessian trace's honesty rule and the probes the budget keeps for it.

A Hutchinson trace whose standard error exceeds |trace| / 2 is ``partial`` (the reason in
meta); the budget's scaling never takes the probes below ceil(9 (std(t_j) / |trace|)^2) of
the spread measured at the previous run (18 before any), nor above the configured count.
"""

from __future__ import annotations

import math

import pytest
import torch

from uma_callbacks.engine.time_budget import UnitCosts
from uma_callbacks.linalg.hutchinson import probes_needed, trace_too_uncertain
from uma_callbacks.metrics import HessianSpectrum

UNITS = UnitCosts(forward=0.1, backward=0.3, hvp=0.75, n_batches=1)


class Quadratic(torch.nn.Module):
    """loss_i = c_i a b + (s / 2)(a^2 + b^2): H = [[s, mean c], [mean c, s]], trace 2 s exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.2, dtype=torch.float64))


def _loss(s: float):
    def loss(model, batch):
        return batch["c"] * model.a * model.b + 0.5 * s * (model.a**2 + model.b**2)

    return loss


BATCHES = [{"c": torch.tensor([1.0, 1.2, 0.8, 1.0], dtype=torch.float64)}]


def test_an_indefinite_hessian_with_a_tiny_trace_is_partial_and_says_why():
    # trace 0.02; each probe gives 0.02 +- 2: the sign of the estimate is not known
    metric = HessianSpectrum(top_k=1, hutchinson_samples=8, block_size=1)
    result = metric.compute(Quadratic(), BATCHES, _loss(0.01))
    samples_std = result.scalars["trace_stderr"] * math.sqrt(8)
    assert samples_std > 1.0  # the probes disagree (2 z0 z1 = +-2)
    assert result.scalars["trace_stderr"] > abs(result.scalars["trace"]) / 2
    assert result.status == "partial" and "standard error" in result.meta["partial_reason"]
    assert result.meta["lanczos_relative_residuals"][0] <= 1e-2  # Lanczos itself is fine: the trace made it partial
    assert result.meta["trace_spread"] == pytest.approx(samples_std / abs(result.scalars["trace"]))


def test_a_diagonal_hessian_has_an_exact_trace_and_stays_ok():
    # c = 0: H = s I, every Rademacher probe gives tr H exactly
    metric = HessianSpectrum(top_k=1, hutchinson_samples=4, block_size=1)
    zero = [{"c": torch.zeros(4, dtype=torch.float64)}]
    result = metric.compute(Quadratic(), zero, _loss(3.0))
    assert result.status == "ok" and result.scalars["trace"] == pytest.approx(6.0, rel=1e-12)
    assert result.scalars["trace_stderr"] == pytest.approx(0.0, abs=1e-12)


def test_the_rule_and_the_count_it_asks_for():
    assert trace_too_uncertain(34.0, 41.0) and not trace_too_uncertain(34.0, 17.0)
    assert not trace_too_uncertain(-4.0, 1.9) and trace_too_uncertain(-4.0, 2.1)
    # the 34 +- 41 from 5 probes: a spread of 41 sqrt(5) / 34 = 2.7 asks for 66
    assert probes_needed(41 * math.sqrt(5) / 34) == 66
    assert probes_needed(None) == 18 and probes_needed(0.0) == 4 and probes_needed(math.inf) > 10**6
    # m = probes_needed(spread) keeps spread / sqrt(m) within a third, under the partial line
    for spread in (0.3, 1.0, 2.7, 10.0):
        m = probes_needed(spread)
        assert spread / math.sqrt(m) <= 1 / 3 + 1e-12 and spread / math.sqrt(max(m - 1, 4)) > 1 / 3 or m == 4


def test_the_budget_keeps_the_probes_the_measured_spread_needs():
    configured = HessianSpectrum(top_k=1, hutchinson_samples=60, block_size=1)
    floor, changes = configured.scaled_to(0.0, UNITS)
    assert floor.hutchinson_samples == 18 and changes["hutchinson_samples"] == [60, 18]  # nothing measured yet
    # the scaled copy's run measures the spread of an indefinite Hessian; the next plan keeps what it needs
    spread = floor.compute(Quadratic(), BATCHES, _loss(0.01)).meta["trace_spread"]
    assert probes_needed(spread) > 18
    assert configured.scaled_to(0.0, UNITS)[0].hutchinson_samples == min(60, probes_needed(spread))
    assert configured.hutchinson_samples == 60  # the configured metric is never changed
    # a well-behaved trace measured: down to the fewest probes
    exact = HessianSpectrum(top_k=1, hutchinson_samples=60, block_size=1)
    exact.scaled_to(0.0, UNITS)[0].compute(Quadratic(), [{"c": torch.zeros(4, dtype=torch.float64)}], _loss(3.0))
    assert exact.scaled_to(0.0, UNITS)[0].hutchinson_samples == 4
    assert HessianSpectrum(hutchinson_samples=10).min_probes() == 10  # never above the configured count
