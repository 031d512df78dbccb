r"""Directional sharpness: the probe loss's curvature along the last update, the gradient and the top Fisher eigenvector."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.core.sharding import unwrap
from uma_callbacks.linalg.weights import flat_dot, moved_weights
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, MetricSkipped, check_choice
from uma_callbacks.metrics.landscape import _local_chunks, probe_loss_sum
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts, batches_used, per_batch

#: The directions, in the order they are measured: (a) the last update, (b) the probe
#: gradient, (c) the top Fisher eigenvector.
DIRECTIONS = ("update", "gradient", "fisher")
#: Step sizes h, RATIO h, RATIO^2 h.
RATIO = 2.0
N_STEPS = 3
#: What direction (c) reads from the ``fisher`` metric of the same save.
FISHER_OUTPUT = "top_eigenvector"


def richardson(values: Sequence[float], ratio: float = RATIO) -> tuple[float, float, list[list[float]]]:
    r"""Richardson extrapolation to h -> 0 of a central difference with an even error series.

    ``values[k]`` = A(h_k) at h_k = ratio^k h with A(h) = a + c_1 h^2 + c_2 h^4 + ...; level
    j removes the h^{2j} term: R_j[k] = (r^{2j} R_{j-1}[k] - R_{j-1}[k+1]) / (r^{2j} - 1), R_0 = values.

    Args:
        values: A(h_0), A(h_1), ... (at least 2).
        ratio: h_{k+1} / h_k.

    Returns:
        ``(estimate, error, table)``: the last level's single value, its distance to the
        level before's first value (the error estimate), and the table of levels.

    Example:
        >>> f = lambda h: 3.0 + 2.0 * h**2 + 5.0 * h**4  # A(h) with a = 3
        >>> est, err, _ = richardson([f(0.1), f(0.2), f(0.4)])
        >>> round(est, 12), err < 1e-2
        (3.0, True)
    """
    table = [list(map(float, values))]
    while len(table[-1]) > 1:
        j = len(table)
        w = ratio ** (2 * j)
        prev = table[-1]
        table.append([(w * prev[k] - prev[k + 1]) / (w - 1.0) for k in range(len(prev) - 1)])
    estimate = table[-1][0]
    error = abs(estimate - table[-2][0]) if len(table) > 1 else math.inf
    return estimate, error, table


#: Largest noise gain of the Richardson second derivative: with noise delta in each f, D(h_k)
#: is off by at most 4 delta / h_k^2 and R_2 = (64 D(h) - 20 D(2h) + D(4h)) / 45 by
#: (256 + 20 + 1/4) / 45 delta / h^2.
NOISE_GAIN = 276.25 / 45.0
#: In the asymptotic regime (D(h) = f'' + c h^2), (D(2h) - D(h)) / (D(4h) - D(2h)) = 1/4;
#: outside this window the steps are too large (or rounding dominates) and the result is partial.
RATIO_WINDOW = (0.125, 0.5)


def central_differences(
    f0: float, plus: Sequence[float], minus: Sequence[float], steps: Sequence[float], noise: float = 0.0
) -> dict[str, Any]:
    r"""First and second derivatives of f at 0 from f(0), f(+h_k), f(-h_k), with Richardson.

    - second differences D(h) = (f(h) - 2 f(0) + f(-h)) / h^2 = f'' + f'''' h^2 / 12 + ...;
    - first differences C(h) = (f(h) - f(-h)) / (2 h) = f' + f''' h^2 / 6 + ...;

    each extrapolated by :func:`richardson` over the step sizes (ratio ``steps[1] / steps[0]``).

    ``curvature_error`` = |R_2 - R_1| + :data:`NOISE_GAIN` x ``noise`` / h^2: the truncation
    estimate plus a bound on what a rounding error of at most ``noise`` in each f does.
    ``asymptotic``: the second differences shrink as h^2 (their ratio
    (D(2h) - D(h)) / (D(4h) - D(2h)) within :data:`RATIO_WINDOW`), or differ by no more
    than rounding; where not, no estimate from these steps is trustworthy.

    Args:
        f0: f(0).
        plus: f(+h_k) for each step.
        minus: f(-h_k) for each step.
        steps: h_k, ascending, in a constant ratio.
        noise: a bound on the rounding error of each f value.

    Returns:
        ``{"curvature", "curvature_error", "slope", "slope_error", "second_differences",
        "first_differences", "ratio", "asymptotic"}``.

    Example:
        >>> f = lambda x: 1.0 + 0.5 * x + 2.0 * x**2 - x**3 + x**4
        >>> hs = [0.01, 0.02, 0.04]
        >>> out = central_differences(f(0.0), [f(h) for h in hs], [f(-h) for h in hs], hs)
        >>> round(out["curvature"], 10), round(out["slope"], 10), out["asymptotic"]
        (4.0, 0.5, True)
    """
    ratio = steps[1] / steps[0] if len(steps) > 1 else RATIO
    second = [(p - 2.0 * f0 + m) / (h * h) for p, m, h in zip(plus, minus, steps)]
    first = [(p - m) / (2.0 * h) for p, m, h in zip(plus, minus, steps)]
    curvature, truncation, _ = richardson(second, ratio)
    slope, slope_error, _ = richardson(first, ratio)
    rounding = NOISE_GAIN * noise / (steps[0] * steps[0])
    q = math.nan
    asymptotic = True
    if len(second) >= 3:
        near, far = second[1] - second[0], second[2] - second[1]
        q = near / far if far != 0.0 else math.nan
        within_rounding = abs(second[2] - second[0]) <= 2.0 * rounding
        asymptotic = within_rounding or (RATIO_WINDOW[0] <= q <= RATIO_WINDOW[1])
    return {
        "curvature": curvature,
        "curvature_error": truncation + rounding,
        "slope": slope,
        "slope_error": slope_error,
        "second_differences": second,
        "first_differences": first,
        "ratio": q,
        "asymptotic": asymptotic,
    }


class DirectionalSharpness(Metric):
    r"""The probe loss's second derivative along the directions training moves in (directional sharpness).

    L(theta) = (1/N) sum_i l_i(theta) over the probe, and for a unit direction d
    (||d|| = 1 over the trainable parameters) f(t) = L(theta + t d). Directions:

    - ``"update"`` (a): d = (theta_t - theta_{t-1}) / ||theta_t - theta_{t-1}||, the last
      update, from the session's history (the previous checkpoint; skipped at the first);
    - ``"gradient"`` (b): d = g / ||g||, g = grad L(theta) (one backward over the probe);
    - ``"fisher"`` (c): v_1, the unit eigenvector of the largest eigenvalue of the Fisher F,
      handed on by the ``fisher`` metric of the same save (:class:`~uma_callbacks.metrics.fisher.FisherInformation`,
      its kind and probe; the suite runs it first). Without it (``fisher`` not in the
      metrics, failed, or read from the cache) the direction is skipped with the reason.

    A direction that cannot be measured is named with its reason in
    ``meta["skipped_directions"]``; the others are measured.

    Per direction, with h_k = ``step`` x 2^k (k = 0, 1, 2), f is evaluated at t = 0 (once
    for all directions) and t = +-h_k: 6 forwards per direction plus one, and one backward
    for ``"gradient"``. Then (:func:`central_differences`):

    - ``<d>/curvature`` = f''(0) = d^T H d, H the Hessian of L, by Richardson extrapolation
      of the central second differences; ``<d>/curvature_error`` = |R_2 - R_1| (the last
      two Richardson levels: the truncation estimate) plus a bound on rounding
      (``meta["rounding_noise"]`` = eps of the weights' dtype x the largest probe loss, in
      each f; see :func:`central_differences`). When the second differences do not shrink as
      h^2 along a direction (the steps are too large for its curvature) the values are kept
      and the result is ``"partial"`` (``meta["partial_reason"]``);
    - ``<d>/slope`` = f'(0) = g . d: exact from the gradient when ``"gradient"`` is measured,
      else by Richardson on central first differences (with ``<d>/slope_error``);
    - ``<d>/critical_lr`` = 2 / f''(0), the step size past which gradient descent along d
      diverges on the local quadratic model (only for f''(0) > 0);
    - ``<d>/norm``: the length of the direction before normalising (||theta_t - theta_{t-1}||,
      ||g||; none for ``"fisher"``, a unit vector already, its sign fixed by the provider).

    Also ``loss`` = L(theta). Arrays: ``steps`` [3] = h_k; ``<d>/losses`` [7] = f at
    t = -4h, -2h, -h, 0, h, 2h, 4h; ``<d>/second_differences`` [3].

    The weights are moved in place from one saved copy (:mod:`~uma_callbacks.linalg.weights`)
    and restored bit for bit. Per-point sums over the probe are in float64; in float32 a
    step much smaller than the default loses the second difference to rounding (the error
    estimate shows it), and a step much larger leaves the quadratic regime along a sharp
    direction (the ``"partial"`` check shows it). A sharded model (FSDP2) is skipped.

    Args:
        directions: which of :data:`DIRECTIONS` to measure.
        step: h, the smallest step (a distance in parameter space; > 0).
        n_batches: use only the first ``n_batches`` local probe batches.
        chunk_size: samples per forward pass.
        timeout_seconds: stop between forwards past this time.

    Raises:
        ValueError: an unknown or repeated direction, none, a non-positive ``step``, ``n_batches < 1``.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> batch = {"x": torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64), "y": torch.zeros(2, 1, dtype=torch.float64)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)  # L = (w1^2 + 4 w2^2) / 2: H = diag(1, 4)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[0.0, 1.0]], dtype=torch.float64))  # g along w2
        >>> r = DirectionalSharpness(directions=["gradient"], step=0.1).compute(lin, [batch], loss)
        >>> round(r.scalars["gradient/curvature"], 9), round(r.scalars["gradient/critical_lr"], 9)
        (4.0, 0.5)
    """

    name = "sharpness"
    needs_grad = True
    history_needed = 1
    #: direction (c) reads the top Fisher eigenvector of the same save (only when asked for: :meth:`results_needed`)
    uses_results = {"fisher": (FISHER_OUTPUT,)}

    def __init__(
        self,
        directions: Sequence[str] = ("update", "gradient"),
        step: float = 0.01,
        n_batches: int | None = None,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        self.add_state("loss_sums", dist_reduce_fx="sum")
        if isinstance(directions, str) or not isinstance(directions, Sequence) or not directions:
            raise ValueError(f"DirectionalSharpness.directions must be a non-empty list of {DIRECTIONS}; got {directions!r}")
        for d in directions:
            check_choice("DirectionalSharpness.directions", d, DIRECTIONS)
        if len(set(directions)) != len(directions):
            raise ValueError(f"DirectionalSharpness.directions must not repeat a direction; got {list(directions)!r}")
        validate.check_number("DirectionalSharpness.step", step, 0, 1e3, lo_open=True)
        validate.check_int("DirectionalSharpness.n_batches", n_batches, 1, validate.MAX_BATCHES, allow_none=True)
        self.directions = [d for d in DIRECTIONS if d in directions]
        self.step = float(step)
        self.n_batches = n_batches

    def results_needed(self) -> dict[str, tuple[str, ...]]:
        """``{"fisher": ("top_eigenvector",)}`` when direction ``"fisher"`` is measured, else nothing."""
        return super().results_needed() if "fisher" in self.directions else {}

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode: the saved theta, one copy per direction, the gradient accumulator (a backward for ``"gradient"``)."""
        gradient = "gradient" in self.directions
        copies = 1.0 + len(self.directions) + (1.0 if gradient else 0.0)
        return [("default", Cost(param_copies=copies, forward_only=not gradient))]

    def time_cost(self, units: UnitCosts) -> float:
        """One forward at theta, six per direction, and a backward for ``"gradient"``, on the batches used."""
        measured = self.directions
        seconds = (1 + 2 * N_STEPS * len(measured)) * units.forward
        if "gradient" in measured:
            seconds += units.backward
        return seconds * batches_used(self, units) * per_batch(units)

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[DirectionalSharpness, dict[str, list[Any]]]:
        """Fewer probe batches (``n_batches``); the directions and steps are kept."""
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        scaling.fewer_batches(seconds, units)
        return scaling.done()

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        params = ctx.trainable_params()
        if not params:
            raise ValueError("DirectionalSharpness: the model has no trainable parameter")
        chunks, n_local = _local_chunks(ctx, self.n_batches)
        n_total = ctx.collective.sum_scalar(float(n_local))
        skipped: dict[str, str] = {}
        directions: dict[str, list[torch.Tensor]] = {}
        norms: dict[str, float] = {}
        gradient: list[torch.Tensor] | None = None
        if "update" in self.directions:
            update = _update(params, ctx)
            if isinstance(update, str):
                skipped["update"] = update
            else:
                directions["update"], norms["update"] = update
        if "gradient" in self.directions:
            gradient = _mean_gradient(ctx, params, chunks, n_total)
            norm = math.sqrt(flat_dot(gradient, gradient))
            if norm > 0:
                directions["gradient"], norms["gradient"] = [g / norm for g in gradient], norm
            else:
                skipped["gradient"] = "the probe gradient is zero"
        if "fisher" in self.directions:
            fisher = _fisher_direction(params, ctx)
            if isinstance(fisher, str):
                skipped["fisher"] = fisher
            else:
                directions["fisher"] = fisher
        ctx.meta["skipped_directions"] = skipped
        if not directions:
            raise MetricSkipped("no direction to measure: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        steps = [self.step * RATIO**k for k in range(N_STEPS)]
        offsets = [-h for h in reversed(steps)] + [0.0] + steps
        sums = torch.zeros(len(directions), len(offsets), dtype=torch.float64)
        targets = list(params.values())
        with moved_weights(targets) as mover:
            center = probe_loss_sum(ctx, chunks)
            for i, d in enumerate(directions.values()):
                for j, t in enumerate(offsets):
                    if t == 0.0:
                        sums[i, j] = center
                        continue
                    mover.set_combination([t], [d])
                    sums[i, j] = probe_loss_sum(ctx, chunks)
                    ctx.check_time(forwards_done=1 + i * 2 * N_STEPS + j)
        totals = self.reduce_states(ctx, loss_sums=sums)
        losses = (totals["loss_sums"] / n_total).numpy()
        ctx.meta.update(
            forward_passes=(1 + 2 * N_STEPS * len(directions)) * len(chunks),
            backward_passes=len(chunks) if gradient is not None else 0,
        )
        eps = max(torch.finfo(p.dtype).eps for p in params.values() if p.is_floating_point())
        return self._result(directions, norms, gradient, losses, steps, eps * float(np.abs(losses).max()))

    def _result(
        self,
        directions: Mapping[str, list[torch.Tensor]],
        norms: Mapping[str, float],
        gradient: list[torch.Tensor] | None,
        losses: np.ndarray,
        steps: list[float],
        noise: float,
    ) -> MetricResult:
        scalars: dict[str, float] = {"loss": float(losses[0, N_STEPS])}
        arrays: dict[str, np.ndarray] = {"steps": np.asarray(steps, dtype=np.float64)}
        unsettled: list[str] = []
        for i, (name, d) in enumerate(directions.items()):
            row = losses[i]
            f0 = float(row[N_STEPS])
            plus = [float(v) for v in row[N_STEPS + 1 :]]
            minus = [float(v) for v in row[:N_STEPS][::-1]]
            fd = central_differences(f0, plus, minus, steps, noise)
            curvature = fd["curvature"]
            if not fd["asymptotic"]:
                unsettled.append(f"{name} (ratio {fd['ratio']:.3g})")
            scalars[f"{name}/curvature"] = curvature
            scalars[f"{name}/curvature_error"] = fd["curvature_error"]
            if gradient is not None:
                scalars[f"{name}/slope"] = flat_dot(gradient, d)
            else:
                scalars[f"{name}/slope"] = fd["slope"]
                scalars[f"{name}/slope_error"] = fd["slope_error"]
            if curvature > 0:
                scalars[f"{name}/critical_lr"] = 2.0 / curvature
            if name in norms:
                scalars[f"{name}/norm"] = norms[name]
            arrays[f"{name}/losses"] = np.asarray(row, dtype=np.float64)
            arrays[f"{name}/second_differences"] = np.asarray(fd["second_differences"], dtype=np.float64)
        result = MetricResult(name=self.name, scalars=scalars, arrays=arrays, meta={"rounding_noise": noise})
        if unsettled:
            result.status = "partial"
            result.meta["partial_reason"] = (
                "the second differences do not shrink as h^2 along "
                + ", ".join(unsettled)
                + f" (1/4 expected): the steps {steps} are too large for the curvature there, or rounding "
                "dominates; try another step="
            )
        return result


def _update(params: Mapping[str, torch.Tensor], ctx: ComputeContext) -> tuple[list[torch.Tensor], float] | str:
    """The unit last update (theta_t - theta_{t-1}) / ||.|| and its norm, or why there is none.

    Raises:
        ValueError: the previous checkpoint lacks a trainable parameter, or holds it in another shape.
    """
    if not ctx.history.previous:
        return "no previous checkpoint yet: the last update starts at the second checkpoint"
    previous = ctx.history.previous[0].weights
    missing = [n for n in params if n not in previous]
    bad = [n for n, p in params.items() if n in previous and previous[n].shape != p.shape]
    if missing or bad:
        raise ValueError(
            f"DirectionalSharpness: the previous checkpoint must hold every trainable parameter with its shape; "
            f"missing {missing[:5]}, mis-shaped {bad[:5]}"
        )
    with torch.no_grad():
        delta = [p.detach() - previous[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()]
    norm = math.sqrt(flat_dot(delta, delta))
    if norm == 0.0:
        return "the last update is zero (the weights did not move since the previous checkpoint)"
    return [x / norm for x in delta], norm


def _fisher_direction(params: Mapping[str, torch.Tensor], ctx: ComputeContext) -> list[torch.Tensor] | str:
    """The top Fisher eigenvector handed on by ``fisher`` at this save, on the parameters' devices; or why there is none.

    It is used as handed on (unit length over the trainable parameters); one that misses a
    trainable parameter or holds it in another shape is not used.
    """
    vector, why = ctx.results.get("fisher", FISHER_OUTPUT)
    if vector is None:
        return f"no top Fisher eigenvector at this save: {why}"
    missing = [n for n in params if n not in vector]
    bad = [n for n, p in params.items() if n in vector and tuple(vector[n].shape) != tuple(p.shape)]
    if missing or bad:
        return f"the top Fisher eigenvector handed on does not fit the trainable parameters: missing {missing[:5]}, mis-shaped {bad[:5]}"
    return [vector[n].detach().to(device=p.device, dtype=p.dtype) for n, p in params.items()]


def _mean_gradient(
    ctx: ComputeContext, params: Mapping[str, torch.Tensor], chunks: Sequence[Any], n_total: float
) -> list[torch.Tensor]:
    """The mean probe gradient g = (1/N) sum_i grad l_i (summed over ranks), one backward per chunk, in the parameters' dtype."""
    tensors = list(params.values())
    total = [torch.zeros_like(p) for p in tensors]
    for done, item in enumerate(chunks, start=1):
        chunk, real = unwrap(item)
        if not real:
            continue
        loss = ctx.loss_fn(ctx.model, chunk).sum()
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g)
        ctx.check_time(backward_chunks_done=done)
    ctx.collective.sum_(total)
    return [t / n_total for t in total]
