"""Checkpoint interpolation: the probe loss on the segment from the previous checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.core.sharding import is_dtensor, is_sharded, local, local_rows, reshard_fsdp
from uma_callbacks.linalg.weights import moved_weights
from uma_callbacks.metrics.base import (
    ComputeContext,
    Cost,
    History,
    Metric,
    MetricResult,
    MetricSkipped,
)
from uma_callbacks.metrics.landscape import _local_chunks, probe_loss_sum
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts, batches_used, per_batch

#: The skip of a first checkpoint, where nothing earlier exists to interpolate from.
NO_PREVIOUS = (
    "no previous checkpoint yet: CheckpointInterpolation needs its weights (every trigger passes "
    "them from the second checkpoint on; or pass previous=/set_previous())"
)


class CheckpointInterpolation(Metric):
    r"""L along the line from the previous checkpoint theta_0 to the current theta.

    L(t) = (1/N) sum_i l_i((1 - t) theta_0 + t theta) for t in
    linspace(-extend, 1 + extend, n), with t = 0 and t = 1 always on the path (grid points
    within 1e-9 of them are snapped to them, or they are inserted), as in Goodfellow et
    al. 2015, "Qualitatively characterizing neural network optimization problems".
    Weights are set by ``torch.lerp`` from one saved copy of theta (exact at both
    endpoints) and restored bit for bit afterwards, also on error.

    Scalars: ``loss_start`` = L(0), ``loss_end`` = L(1) (the current model's loss),
    ``barrier_height`` = max over t in [0, 1] of L(t) - ((1 - t) L(0) + t L(1)) (>= 0;
    0 for a convex path), ``distance`` = ||theta - theta_0|| over the trainable
    parameters. Arrays: ``ts [n']``, ``path_losses [n']``. The points are taken t = 1, t = 0,
    then in order (:func:`path_order`); a path stopped by its time limit keeps the points
    done (``status="partial"``, NaN at the others, ``meta["progress"]``; one process).

    The previous weights come from the constructor or :meth:`set_previous`, else from the
    session's checkpoint history (``history_needed = 1``); without either the metric is
    skipped (first checkpoint). On a sharded model (FSDP2) each rank moves its own shards
    (the previous weights are cut to the same rows: a history's ``DTensor`` copies are the
    shards already, full tensors are sliced), ||theta - theta_0||^2 is summed over ranks,
    and every rank runs as many forwards as the one with the most chunks. Only the trainable
    parameters are interpolated; other entries of the state dict (buffers) are ignored.

    Args:
        n_points: n, >= 2 (13 with ``extend=0.1`` puts a point every 0.1).
        extend: how far past each end the path goes (>= 0).
        previous: the previous checkpoint's weights ``{param name: tensor}``, or None.
        previous_label: a name for them (step, path), recorded in the config and meta.
        n_batches: use only the first ``n_batches`` local probe batches.
        chunk_size: samples per forward pass.
        timeout_seconds: stop between path points past this time.

    Raises:
        ValueError: ``n_points < 2``, ``extend`` negative, ``n_batches < 1``.

    Example:
        >>> lin = torch.nn.Linear(2, 1).double()
        >>> prev = {k: v.detach() + 0.1 for k, v in lin.named_parameters()}
        >>> batch = {"x": torch.randn(6, 2, dtype=torch.float64), "y": torch.randn(6, 1, dtype=torch.float64)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)
        >>> r = CheckpointInterpolation(n_points=5, extend=0.0, previous=prev).compute(lin, [batch], loss)
        >>> r.arrays["ts"].tolist(), round(r.scalars["distance"], 6)
        ([0.0, 0.25, 0.5, 0.75, 1.0], 0.173205)
    """

    name = "interpolation"
    #: the saved theta (1 P) and the previous weights on the model's device (1 P when they
    #: come from host memory or another dtype; counted always).
    cost = Cost(forward_only=True, param_copies=2.0, fixed_bytes=3 * 8 << 16)
    needs_grad = False
    history_needed = 1
    supports_sharded = True

    def __init__(
        self,
        n_points: int = 13,
        extend: float = 0.1,
        previous: Mapping[str, torch.Tensor] | None = None,
        previous_label: str | None = None,
        n_batches: int | None = None,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        self.add_state("loss_sums", dist_reduce_fx="sum")
        self.add_state("n_samples", dist_reduce_fx="sum")
        validate.check_int("CheckpointInterpolation.n_points", n_points, 2, validate.MAX_GRID_POINTS)
        validate.check_number("CheckpointInterpolation.extend", extend, 0, 100)
        validate.check_int("CheckpointInterpolation.n_batches", n_batches, 1, validate.MAX_BATCHES, allow_none=True)
        self.n_points = n_points
        self.extend = float(extend)
        self.n_batches = n_batches
        self.previous_label: str | None = None
        self._previous: dict[str, torch.Tensor] | None = None
        if previous is not None:
            self.set_previous(previous, previous_label)

    def set_previous(self, state_dict: Mapping[str, torch.Tensor] | None, label: str | None = None) -> None:
        """Give (or clear, with None) the previous checkpoint's weights.

        Args:
            state_dict: ``{param name: tensor}`` (e.g. ``model.state_dict()`` or a
                safetensors file loaded with ``safetensors.torch.load_file``); kept by
                reference (detached), moved to the model's device at compute time.
            label: a name for them (e.g. ``"checkpoint-500"``), part of the config.

        Raises:
            ValueError: not a dict of tensors.
        """
        if state_dict is None:
            self._previous, self.previous_label = None, None
            return
        if not isinstance(state_dict, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()
        ):
            raise ValueError("CheckpointInterpolation.previous must be a dict {param name: tensor}")
        self._previous = {k: v.detach() for k, v in state_dict.items()}
        self.previous_label = label

    @property
    def has_previous(self) -> bool:
        """Whether previous weights are set."""
        return self._previous is not None

    def path_ts(self) -> np.ndarray:
        """The t values: linspace(-extend, 1 + extend, n) with 0 and 1 snapped or inserted."""
        ts = np.linspace(-self.extend, 1.0 + self.extend, self.n_points)
        for anchor in (0.0, 1.0):
            near = np.abs(ts - anchor) < 1e-9
            if near.any():
                ts[near] = anchor
            else:
                ts = np.sort(np.append(ts, anchor))
        return ts

    def time_cost(self, units: UnitCosts) -> float:
        """One forward of the batches used per path point (``n_points``, and both ends)."""
        return (int(self.n_points) + 2) * units.forward * batches_used(self, units) * per_batch(units)

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[CheckpointInterpolation, dict[str, list[Any]]]:
        """Fewer path points first (``n_points``, down to 5), then fewer probe batches (``n_batches``)."""
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        per_point = self.time_cost(units) / (int(self.n_points) + 2)
        scaling.set("n_points", max(5, min(int(self.n_points), int(seconds / per_point) - 2)))
        scaling.fewer_batches(seconds, units)
        return scaling.done()

    def not_ready(self, history: History) -> str | None:
        """No previous checkpoint yet (none given, none in the history): skipped before any planning."""
        return NO_PREVIOUS if self._previous is None and not history.previous else None

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        previous: Mapping[str, torch.Tensor] | None = self._previous
        label = self.previous_label
        if previous is None and ctx.history.previous:
            previous, label = ctx.history.previous[0].weights, ctx.history.previous[0].label
        if previous is None:
            raise MetricSkipped(NO_PREVIOUS)
        sharded = is_sharded(ctx.model)
        if sharded:
            reshard_fsdp(ctx.model)  # the shards are what is moved (a root may be left gathered)
            ctx.meta["sharded"] = True
        params = ctx.trainable_params()
        missing = [n for n in params if n not in previous]
        bad = [n for n, p in params.items() if n in previous and previous[n].shape != p.shape]
        if missing or bad:
            raise ValueError(
                f"CheckpointInterpolation.previous must hold every trainable parameter with its shape; "
                f"missing {missing[:5]}, mis-shaped {bad[:5]}"
            )
        chunks, n_local = _local_chunks(ctx, self.n_batches)
        ts = self.path_ts()
        sums = torch.zeros(len(ts), dtype=torch.float64)
        done = torch.zeros(len(ts), dtype=torch.bool)
        targets = [local(p) for p in params.values()]
        start = [_start_piece(previous[k], p) for k, p in params.items()]
        with moved_weights(targets) as mover:
            sq = sum(_sq_distance(s, t) for s, t in zip(start, mover.theta))
            distance = math.sqrt(ctx.collective.sum_scalar(sq) if sharded else sq)
            ctx.keep_partial(lambda: _partial_path(ts, sums, done, n_local, distance))
            for count, j in enumerate(path_order(ts), start=1):
                mover.set_lerp(start, float(ts[j]))
                sums[j] = probe_loss_sum(ctx, chunks)
                done[j] = True
                ctx.check_time(path_points_done=count)
        del start
        totals = self.reduce_states(ctx, loss_sums=sums, n_samples=torch.tensor([float(n_local)], dtype=torch.float64))
        losses = (sums / int(totals["n_samples"].item())).numpy()
        ctx.meta.update(previous_label=label, forward_passes=len(ts) * len(chunks))
        return interpolation_result(ts, losses, distance)


def path_order(ts: np.ndarray) -> list[int]:
    """The path's points in the order they are taken: t = 1 (this checkpoint), t = 0, then ascending.

    A path stopped by its time limit has then both ends. Every point is set from the saved
    weights afresh, so the order changes no value.

    Example:
        >>> path_order(np.array([-0.5, 0.0, 0.5, 1.0, 1.5]))
        [3, 1, 0, 2, 4]
    """
    ends = [int(np.flatnonzero(ts == 1.0)[0]), int(np.flatnonzero(ts == 0.0)[0])]
    return ends + [j for j in range(len(ts)) if j not in ends]


def _partial_path(
    ts: np.ndarray, sums: torch.Tensor, done: torch.Tensor, n_local: int, distance: float
) -> MetricResult | None:
    """The path of the points done (NaN elsewhere), divided as the full run does; ``None``: none done."""
    if not bool(done.any()):
        return None
    losses = (sums / int(n_local)).numpy()
    losses[~done.numpy()] = np.nan
    result = interpolation_result(ts, losses, distance)
    result.meta["path_points_done"] = int(done.sum())
    return result


def _start_piece(previous: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``previous`` on ``param``'s device and dtype, cut to the rank's shard when ``param`` is sharded.

    A ``DTensor`` copy of the same layout is the shard already.
    """
    piece = local(previous) if is_dtensor(previous) else local_rows(previous, param)
    target = local(param)
    return piece.to(device=target.device, dtype=target.dtype)


def _sq_distance(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 16) -> float:
    """||a - b||^2 in float64, ``block`` entries at a time (no full-size temporaries)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, fa.numel(), block):
        d = fa[start : start + block].to(torch.float64) - fb[start : start + block].to(torch.float64)
        total += float(d.pow(2).sum())
    return total


def interpolation_result(ts: np.ndarray, losses: np.ndarray, distance: float) -> MetricResult:
    """The :class:`CheckpointInterpolation` scalars from the path (ts must contain 0 and 1).

    Args:
        ts: ``[n']`` ascending, containing 0.0 and 1.0.
        losses: ``[n']`` L(t).
        distance: ||theta - theta_0||.

    Returns:
        A :class:`MetricResult` named ``interpolation``. A path with NaN (points not
        reached: a partial path) leaves out ``loss_start``/``loss_end`` when its end was not
        reached, and ``barrier_height`` unless every point in [0, 1] was (a maximum over
        fewer points would understate it).
    """
    ts, losses = np.asarray(ts, np.float64), np.asarray(losses, np.float64)
    start = float(losses[np.flatnonzero(ts == 0.0)[0]])
    end = float(losses[np.flatnonzero(ts == 1.0)[0]])
    inside = (ts >= 0.0) & (ts <= 1.0)
    scalars: dict[str, Any] = {}
    if np.isfinite(losses[inside]).all():
        chord = (1.0 - ts[inside]) * start + ts[inside] * end
        scalars["barrier_height"] = float(np.max(losses[inside] - chord))
    if math.isfinite(start):
        scalars["loss_start"] = start
    if math.isfinite(end):
        scalars["loss_end"] = end
    scalars["distance"] = float(distance)
    return MetricResult(name="interpolation", scalars=scalars, arrays={"ts": ts, "path_losses": losses})
