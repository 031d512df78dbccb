"""CheckpointInterpolation against direct evaluation on the segment between checkpoints."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.cases import TINY_CASES
from tests.oracles import oracle_probe_loss
from uma_callbacks.metrics import METRICS, CheckpointInterpolation
from uma_callbacks.metrics.base import MetricSkipped


def _previous(model, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def direct_path_loss(model, batches, loss_fn, previous, t) -> float:
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.copy_((1 - t) * previous[name] + t * p)
    return oracle_probe_loss(moved, batches, loss_fn)


@pytest.mark.parametrize("case", TINY_CASES, ids=str)
def test_path_losses_equal_direct_evaluation(case):
    model, batches, loss_fn = case.build(dtype=torch.float64)
    prev = _previous(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = CheckpointInterpolation(n_points=5, extend=0.25, previous=prev).compute(model, batches, loss_fn)
    ts, losses = r.arrays["ts"], r.arrays["path_losses"]
    np.testing.assert_array_equal(ts, [-0.25, 0.0, 0.125, 0.5, 0.875, 1.0, 1.25])  # 0 and 1 inserted
    for t, got in zip(ts, losses):
        assert got == pytest.approx(direct_path_loss(model, batches, loss_fn, prev, t), rel=1e-10)
    assert r.scalars["loss_end"] == oracle_probe_loss(model, batches, loss_fn)
    moved = copy.deepcopy(model)
    moved.load_state_dict(prev, strict=False)
    assert r.scalars["loss_start"] == oracle_probe_loss(moved, batches, loss_fn)
    want = torch.sqrt(sum((p.detach() - prev[n]).pow(2).sum() for n, p in model.named_parameters())).item()
    assert r.scalars["distance"] == pytest.approx(want, rel=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class _Scalar(torch.nn.Module):
    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w], dtype=torch.float64))


def _double_well(model, batch):
    """l_i = (w^2 - 1)^2: minima at w = -1 and w = 1, a barrier of height 1 at w = 0."""
    return ((model.w**2 - 1) ** 2).expand(batch.shape[0])


def test_barrier_between_two_minima():
    model = _Scalar(1.0)
    r = CheckpointInterpolation(
        n_points=11, extend=0.0, previous={"w": torch.tensor([-1.0], dtype=torch.float64)}
    ).compute(model, [torch.zeros(3)], _double_well)
    assert r.scalars["loss_start"] == 0.0 and r.scalars["loss_end"] == 0.0
    assert r.scalars["barrier_height"] == pytest.approx(1.0, abs=1e-12)  # t = 0.5 -> w = 0
    assert r.scalars["distance"] == pytest.approx(2.0)
    # a convex path has no barrier
    flat = CheckpointInterpolation(
        n_points=11, extend=0.0, previous={"w": torch.tensor([0.9], dtype=torch.float64)}
    )
    assert flat.compute(model, [torch.zeros(3)], _double_well).scalars["barrier_height"] == pytest.approx(
        0.0, abs=1e-12
    )


def test_without_previous_weights_raises_a_clear_error():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    metric = CheckpointInterpolation()
    assert not metric.has_previous
    with pytest.raises(MetricSkipped, match="previous checkpoint"):
        metric.compute(model, batches, loss_fn)
    metric.set_previous(_previous(model), label="checkpoint-10")
    assert metric.has_previous and metric.config()["previous_label"] == "checkpoint-10"
    r = metric.compute(model, batches, loss_fn)
    assert r.meta["previous_label"] == "checkpoint-10"
    missing = {k: v for k, v in _previous(model).items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        CheckpointInterpolation(previous=missing).compute(model, batches, loss_fn)


def test_restored_when_a_forward_raises_midway():
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}

    def flaky(m, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        return loss_fn(m, batch)

    with pytest.raises(RuntimeError, match="injected"):
        CheckpointInterpolation(n_points=5, previous=_previous(model)).compute(model, batches, flaky)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_grid_keeps_both_endpoints():
    assert CheckpointInterpolation(n_points=13, extend=0.1).path_ts().tolist()[1] == 0.0
    ts = CheckpointInterpolation(n_points=4, extend=0.3).path_ts()
    assert 0.0 in ts and 1.0 in ts and len(ts) == 6


def test_registered_by_name():
    assert METRICS["interpolation"] is CheckpointInterpolation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_points": 1}, "n_points"),
        ({"extend": -0.1}, "extend"),
        ({"n_batches": 0}, "n_batches"),
        ({"previous": [1]}, "previous"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"CheckpointInterpolation.{field}"):
        CheckpointInterpolation(**kwargs)
