"""Trajectory: where the weights went, against the first and the previous checkpoints."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, MetricSkipped
from uma_callbacks.metrics.time_cost import UnitCosts


def trajectory_scalars(
    current: Mapping[str, torch.Tensor],
    first: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None = None,
    before_previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    r"""Where the weights went, in float64.

    With theta_t the flattened parameters of checkpoint t (names common to all given):

    - ``distance_from_first`` = ||theta_t - theta_0||;
    - ``update_norm`` = ||u_t||, u_t = theta_t - theta_{t-1} (needs ``previous``);
    - ``update_cosine`` = <u_t, u_{t-1}> / (||u_t|| ||u_{t-1}||) (needs ``before_previous``;
      NaN when an update is zero).

    Args:
        current: ``{name: tensor}`` of checkpoint t.
        first: the first checkpoint's.
        previous: checkpoint t-1's, or None.
        before_previous: checkpoint t-2's, or None.

    Returns:
        The scalars that the given checkpoints define.

    Example:
        >>> a, b, c = ({"w": torch.tensor([float(x), 0.0])} for x in (0, 1, 3))
        >>> trajectory_scalars(c, a, b, a)
        {'distance_from_first': 3.0, 'update_norm': 2.0, 'update_cosine': 1.0}
    """
    names = [n for n in current if n in first]
    dist = sum(float(((current[n].double() - first[n].double()) ** 2).sum()) for n in names)
    out = {"distance_from_first": math.sqrt(dist)}
    if previous is None:
        return out
    names = [n for n in names if n in previous]
    upd_sq = dot = prev_sq = 0.0
    for n in names:
        u = current[n].double() - previous[n].double()
        upd_sq += float((u * u).sum())
        if before_previous is not None and n in before_previous:
            v = previous[n].double() - before_previous[n].double()
            dot += float((u * v).sum())
            prev_sq += float((v * v).sum())
    out["update_norm"] = math.sqrt(upd_sq)
    if before_previous is not None:
        denom = math.sqrt(upd_sq * prev_sq)
        out["update_cosine"] = dot / denom if denom > 0 else math.nan
    return out


class Trajectory(Metric):
    """Checkpoint-pair geometry: :func:`trajectory_scalars` of the model against earlier checkpoints.

    Needs the first checkpoint and the two before this one (``ctx.history``); the probe
    is not used. Skipped at the first checkpoint; ``update_cosine`` from the third on.

    Example:
        >>> from uma_callbacks.metrics.base import CheckpointState, History
        >>> lin = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.constant_(lin.weight, 3.0)
        >>> h = History(previous=(CheckpointState(1, {"weight": torch.tensor([[1.0]])}),),
        ...             first=CheckpointState(0, {"weight": torch.tensor([[0.0]])}))
        >>> Trajectory().compute(lin, [{"x": torch.ones(1, 1)}], lambda m, b: m(b["x"]).sum(-1), history=h).scalars
        {'distance_from_first': 3.0, 'update_norm': 2.0}
    """

    name = "trajectory"
    cost = Cost(param_copies=3.0, forward_only=True)
    needs_grad = False
    history_needed = 2
    needs_first = True

    def __init__(self) -> None:
        super().__init__()

    def time_cost(self, units: UnitCosts) -> float:
        """Weights only, no pass over the probe: a tenth of a forward."""
        return 0.1 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        ctx.check_time(stage="start")
        history = ctx.history
        if history.first is None or not history.previous:
            raise MetricSkipped("no earlier checkpoint yet: the trajectory starts at the second checkpoint")
        current = {n: p.detach() for n, p in ctx.model.named_parameters()}
        previous = history.previous[0].weights
        before = history.previous[1].weights if len(history.previous) > 1 else None
        scalars = trajectory_scalars(current, history.first.weights, previous, before)
        ctx.meta.update(first_step=history.first.step, previous_step=history.previous[0].step)
        return MetricResult(name=self.name, scalars=scalars)
