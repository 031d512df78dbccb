"""Declared states (``Metric.add_state``) and their one reduction across ranks."""

from __future__ import annotations

import pytest
import torch

from uma_callbacks.core.distributed import Collective
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult
from uma_callbacks.metrics.interpolation import CheckpointInterpolation
from uma_callbacks.metrics.landscape import LossLandscape
from uma_callbacks.metrics.pruning import LotteryTickets


class TwoIdenticalRanks(Collective):
    """Two ranks holding the same values: a sum doubles; counts the collective calls."""

    world_size = 2

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def sum_(self, tensors):
        self.calls.append([int(t.numel()) for t in tensors])
        for t in tensors:
            t.mul_(2)


class MeanLoss(Metric):
    """A metric declared outside the package: the mean probe loss from two declared sums."""

    name = "mean_loss_for_states_test"
    needs_grad = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", dist_reduce_fx="sum")
        self.add_state("n", dist_reduce_fx="sum")

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        total = torch.zeros(1, dtype=torch.float64)
        n = torch.zeros(1, dtype=torch.float64)
        with torch.no_grad():
            for batch in ctx.chunks():
                total += float(ctx.loss_fn(ctx.model, batch)) * batch["x"].shape[0]
                n += batch["x"].shape[0]
        s = self.reduce_states(ctx, loss_sum=total, n=n)
        return MetricResult(name=self.name, scalars={"loss": float(s["loss_sum"] / s["n"]), "n": float(s["n"])})


def _probe():
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 1, generator=g)} for _ in range(2)]


def _loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def test_declared_states_are_reduced_in_one_call_and_give_the_single_process_mean():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    metric = MeanLoss()
    assert metric.state_reductions == {"loss_sum": "sum", "n": "sum"}
    assert "_states" not in metric.config() and "loss_sum" not in str(metric.config())  # not configuration
    one = metric.compute(model, _probe(), _loss)
    ranks = TwoIdenticalRanks()
    two = metric.compute(model, _probe(), _loss, collective=ranks)
    assert two.scalars["n"] == 2 * one.scalars["n"] == 16
    assert two.scalars["loss"] == pytest.approx(one.scalars["loss"], rel=1e-12)
    assert [c for c in ranks.calls if c == [1, 1]], ranks.calls  # both states in one call


def test_builtin_metrics_declare_their_sums():
    for metric in (CheckpointInterpolation(), LossLandscape(n_points=3), LotteryTickets()):
        assert metric.state_reductions == {"loss_sums": "sum", "n_samples": "sum"}, type(metric).__name__


@pytest.mark.parametrize(
    ("name", "fx", "match"),
    [("loss", "mean", "dist_reduce_fx must be one of \\['sum'\\]"), ("not a name", "sum", "identifier"), ("loss_sum", "sum", "declared already")],
)
def test_bad_declarations_are_refused_naming_what_is_allowed(name, fx, match):
    metric = MeanLoss()
    with pytest.raises(ValueError, match=match):
        metric.add_state(name, dist_reduce_fx=fx)


def test_reducing_undeclared_or_missing_states_is_refused():
    metric = MeanLoss()
    ctx = ComputeContext.__new__(ComputeContext)
    ctx.collective = Collective()
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="undeclared \\['other'\\]"):
        metric.reduce_states(ctx, loss_sum=t, n=t, other=t)
    with pytest.raises(ValueError, match="missing \\['n'\\]"):
        metric.reduce_states(ctx, loss_sum=t)
