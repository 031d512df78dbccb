r"""Directional sharpness: the probe loss's curvature along the last update, the gradient and the top Fisher eigenvector.

For a unit direction d, f(t) = L(theta + t d), and the sharpness is f''(0) = d^T H d. It is
measured by finite differences of f extrapolated to a zero step (Richardson, Neville), by
one of :data:`SCHEMES`, h = ``step``:

- ``"two_sided"`` (the default): one forward+backward at theta gives f(0) = L(theta) and
  the gradient g, hence the exact slope s_d = g . d along every direction. Then three
  forwards per direction, at t = -h, h, 2h, and D(u) = 2 (f(u) - f(0) - u s_d) / u^2
  = f'' + f''' u / 3 + f'''' u^2 / 12 + f^(5) u^3 / 60 + ...; the quadratic through the three
  D(u), at 0, is R = D(-h)/3 + D(h) - D(2h)/3 = f'' - f^(5) h^3 / 30 + ...
  (:func:`~uma_callbacks.core.finite_differences.slope_corrected_differences`). Three
  directions cost 1 + 3 x 3 = 10 probe forwards (one of them with its backward): the issue
  allows the metrics ``optimizer_state``, ``weight_spectra`` and ``sharpness`` 12 probe
  forwards together (the first two need none), where central differences at three steps
  cost 1 + 6 x 3 + 1 = 20.
- ``"one_sided"``: the same at t = h, 2h, 4h (Richardson in h, then h^2):
  R = (8 D(h) - 6 D(2h) + D(4h)) / 3, truncation 4x and rounding gain 2x those of
  ``"two_sided"`` (2 f^(5) h^3 / 15 and 10.75 delta / h^2 against f^(5) h^3 / 30 and
  5.33 delta / h^2, delta the rounding of one f value).
- ``"central"``: f at t = 0, +-h, +-2h, +-4h; the central second differences
  (f(h) - 2 f(0) + f(-h)) / h^2 = f'' + f'''' h^2 / 12 + ... extrapolated in h^2
  (:func:`~uma_callbacks.core.finite_differences.central_differences`): truncation O(h^6),
  and no odd derivative in the way; 1 + 6 forwards per direction, and a backward only for
  the ``"gradient"`` direction (the slope along the others from central first differences).

Measured at h = 0.01 against float64 central differences on a random float32 GPT-2 (30M,
``bench/scale.py --quick``'s) and the MiniLM, along the gradient, sign(g) (an Adam-like
update) and a random direction: ``"two_sided"``'s error was 1.7x to 5x smaller than
``"one_sided"``'s, and up to 4x larger than ``"central"``'s (along the GPT-2's gradient,
where |f''' / f''| is about 500: 2.2% against 0.5%); every error estimate covered its error,
and rounding made most of each. After two AdamW steps (along the update and the gradient;
the MiniLM with a seeded head), ``"central"`` and ``"two_sided"`` were within 0.4% of
float64 but for ``"two_sided"`` along the GPT-2's gradient, 0.76% off where its estimate
said 0.27% (see :class:`DirectionalSharpness`); ``"one_sided"`` within 1.8%, its estimates
holding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.core.finite_differences import (
    RATIO,
    central_differences,
    richardson,
    slope_corrected_differences,
)
from uma_callbacks.core.sharding import unwrap
from uma_callbacks.linalg.weights import flat_dot, moved_weights
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, MetricSkipped, check_choice
from uma_callbacks.metrics.landscape import _local_chunks, probe_loss_sum
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts, batches_used, per_batch

__all__ = ["DIRECTIONS", "SCHEMES", "DirectionalSharpness", "central_differences", "richardson", "slope_corrected_differences"]

#: The directions, in the order they are measured: (a) the last update, (b) the probe
#: gradient, (c) the top Fisher eigenvector.
DIRECTIONS = ("update", "gradient", "fisher")
#: The finite-difference schemes, the default first.
SCHEMES = ("two_sided", "one_sided", "central")
#: Offsets t / h at which the slope-corrected schemes evaluate f along each direction, smallest |t| first.
OFFSETS = {"two_sided": (-1.0, 1.0, 2.0), "one_sided": (1.0, RATIO, RATIO**2)}
#: The central scheme's step sizes: h, RATIO h, RATIO^2 h.
N_STEPS = 3
#: The points of ``<d>/losses``: t / h = -4, -2, -1, 0, 1, 2, 4 (NaN where the scheme does not evaluate f).
GRID = tuple([-(RATIO**k) for k in reversed(range(N_STEPS))] + [0.0] + [RATIO**k for k in range(N_STEPS)])
#: In the asymptotic regime of D(u) = f'' + c_1 u + c_2 u^2 + ... on u = h, rh, r^2 h,
#: q = (D(rh) - D(h)) / (D(r^2 h) - D(rh)) is 1/r where c_1 dominates and 1/r^2 where c_2
#: does; ``"one_sided"`` is partial for q outside [1/(2 r^2), 1.5/r]. Below, higher terms
#: dominate (steps too large for a sharp direction); above, the differences shrink more slowly
#: than h, which steps near a pole do: f = 1/(1 + k t), h = 0.01 gave q = 0.85 to 1.25 for
#: k = 30 to 100 and errors 1.2x to 4x the estimate (log1p(k t) alike), while exp(+-k t)
#: kept q in the window and its error within the estimate up to k = 60.
ONE_SIDED_WINDOW = (0.5 / RATIO**2, 1.5 / RATIO)
#: The slope's rounding bound in units of eps x ||g||: a float32 backward's gradient was off
#: the float64 one by 8 eps ||g|| (a random GPT-2 of 30M) and 9 eps ||g|| (the MiniLM).
SLOPE_NOISE_ULPS = 32.0
#: What direction (c) reads from the ``fisher`` metric of the same save.
FISHER_OUTPUT = "top_eigenvector"
#: What direction (a) reads from the ``optimizer_state`` metric of the same save when the history has no update.
OPTIMIZER_OUTPUT = "pending_update"
#: ``meta["update_source"]``: where direction (a) came from.
UPDATE_SOURCES = ("history", "optimizer_pending_step")


class DirectionalSharpness(Metric):
    r"""The probe loss's second derivative along the directions training moves in (directional sharpness).

    L(theta) = (1/N) sum_i l_i(theta) over the probe, and for a unit direction d
    (||d|| = 1 over the trainable parameters) f(t) = L(theta + t d). Directions:

    - ``"update"`` (a): d = Delta theta / ||Delta theta||, the last update. Delta theta =
      theta_t - theta_{t-1} from the session's history (the previous checkpoint) when it
      has one (``meta["update_source"] = "history"``); else (the first save, a backfill of
      one checkpoint) the step the optimizer would take now, handed on by the
      ``optimizer_state`` metric of the same save (:func:`~uma_callbacks.metrics.optimizer_state.pending_step`:
      -lr m_hat / (sqrt(v_hat) + eps), minus lr lambda theta under AdamW's decoupled weight
      decay; a trainable parameter it holds no state for does not move;
      ``"optimizer_pending_step"``). The two differ in span: theta_t - theta_{t-1} sums the
      steps between two saves, the pending step is one step. With neither (no previous
      checkpoint, and ``optimizer_state`` not in the metrics, skipped for want of an optimizer
      state, failed or read from the cache) the direction is skipped with both reasons;
    - ``"gradient"`` (b): d = g / ||g||, g = grad L(theta) (one backward over the probe);
    - ``"fisher"`` (c): v_1, the unit eigenvector of the largest eigenvalue of the Fisher F,
      handed on by the ``fisher`` metric of the same save (:class:`~uma_callbacks.metrics.fisher.FisherInformation`,
      its kind and probe; the suite runs it first). Without it (``fisher`` not in the
      metrics, failed, or read from the cache) the direction is skipped with the reason.

    A direction that cannot be measured is named with its reason in
    ``meta["skipped_directions"]``; the others are measured.

    Schemes (h = ``step``; the cost in probe forwards, n directions):

    - ``"two_sided"`` (default): one forward+backward at theta gives f(0) and g, so the
      slope s_d = g . d is exact along every direction; f is then evaluated at t = -h, h, 2h,
      D(u) = 2 (f(u) - f(0) - u s_d) / u^2 = f'' + f''' u / 3 + f'''' u^2 / 12 + ..., and
      f''(0) ~ R = D(-h)/3 + D(h) - D(2h)/3 (the quadratic through the three D(u), at 0:
      truncation f^(5) h^3 / 30). Cost 1 + 3n forwards, one of them with its backward:
      10 for all three directions, within the 12 the issue allows ``optimizer_state``,
      ``weight_spectra`` and ``sharpness`` together (the other two cost none). No
      partial check: R fits the three values exactly, so they cannot tell whether h is in
      the asymptotic regime; the error estimate is the signal, and it can understate a
      step too large along a sharp gradient (a tiny float64 GPT-2, |f''' / f''| ~ 140, at
      h = 0.01: 3.5% off, 1.7% estimated, and 0.09% off, 0.4% estimated at h = 0.003; the
      float32 30M GPT-2 after two AdamW steps, f'' = 149: 0.76% off, 0.27% estimated, and
      0.12% off, 0.32% estimated at h = 0.005). ``"central"`` held its estimate in both at
      h = 0.01: where the error bar along the gradient must hold, take it or a smaller step;
    - ``"one_sided"``: the same at t = h, 2h, 4h, R = (8 D(h) - 6 D(2h) + D(4h)) / 3
      (Richardson in h, then h^2; truncation 4x and rounding gain 2x those of ``"two_sided"``);
      partial when (D(2h) - D(h)) / (D(4h) - D(2h)) leaves :data:`ONE_SIDED_WINDOW`;
    - ``"central"``: f at t = 0, +-h, +-2h, +-4h; central second differences
      (f(h) - 2 f(0) + f(-h)) / h^2 = f'' + f'''' h^2 / 12 + ... extrapolated in h^2
      (truncation O(h^6), rounding gain 6.1 / h^2): 1 + 6n forwards, and a backward only
      for ``"gradient"`` (the slope along the others from central first differences);
      partial when the second differences do not shrink as h^2.

    Scalars, per measured direction ``<d>``:

    - ``<d>/curvature`` = f''(0) = d^T H d, H the Hessian of L;
      ``<d>/curvature_error`` = the extrapolation's truncation estimate (the distance
      between its last two levels) plus a bound on what rounding does (``meta["rounding_noise"]``
      = eps of the weights' dtype x the largest probe loss, in each f; and
      ``meta["slope_noise"]`` = :data:`SLOPE_NOISE_ULPS` x eps x ||g|| in s_d; see
      :func:`~uma_callbacks.core.finite_differences.slope_corrected_differences`). A
      ``"partial"`` status (``meta["partial_reason"]``) says where the scheme's check finds
      the steps too large for the curvature there, or rounding dominating; the values are kept;
    - ``<d>/slope`` = f'(0) = g . d: exact from the gradient whenever a backward ran
      (``meta["slope_method"]``), else by Richardson on central first differences (with
      ``<d>/slope_error``);
    - ``<d>/critical_lr`` = 2 / f''(0), the step size past which gradient descent along d
      diverges on the local quadratic model (only for f''(0) > 0);
    - ``<d>/norm``: the length of the direction before normalising (||Delta theta||,
      ||g||; none for ``"fisher"``, a unit vector already, its sign fixed by the provider).

    Also ``loss`` = L(theta). Arrays: ``steps`` [3] = h, 2h, 4h; ``<d>/losses`` [7] = f at
    t = -4h, -2h, -h, 0, h, 2h, 4h (:data:`GRID`; NaN where the scheme does not evaluate f);
    ``<d>/second_differences`` [3] (the scheme's D values, in the order of its offsets).

    The weights are moved in place from one saved copy (:mod:`~uma_callbacks.linalg.weights`)
    and restored bit for bit. Per-point sums over the probe are in float64; in float32 a
    step much smaller than the default loses the differences to rounding (the error
    estimate shows it), and a step much larger leaves the regime where the extrapolation
    holds along a sharp direction (the error estimate grows; ``"one_sided"`` and
    ``"central"`` also turn partial). A sharded model (FSDP2) is skipped.

    Args:
        directions: which of :data:`DIRECTIONS` to measure.
        step: h, the smallest step (a distance in parameter space; > 0).
        n_batches: use only the first ``n_batches`` local probe batches.
        scheme: one of :data:`SCHEMES`.
        chunk_size: samples per forward pass.
        timeout_seconds: stop between forwards past this time.

    Raises:
        ValueError: an unknown or repeated direction, none, a non-positive ``step``,
            ``n_batches < 1``, an unknown ``scheme``.

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
    #: direction (c) reads the top Fisher eigenvector of the same save, direction (a) the optimizer's pending step
    #: when the history has no update (each only when its direction is measured: :meth:`results_needed`)
    uses_results = {"fisher": (FISHER_OUTPUT,), "optimizer_state": (OPTIMIZER_OUTPUT,)}

    def __init__(
        self,
        directions: Sequence[str] = ("update", "gradient"),
        step: float = 0.01,
        n_batches: int | None = None,
        *,
        scheme: str = "two_sided",
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
        check_choice("DirectionalSharpness.scheme", scheme, SCHEMES)
        self.directions = [d for d in DIRECTIONS if d in directions]
        self.step = float(step)
        self.n_batches = n_batches
        self.scheme = scheme

    def results_needed(self) -> dict[str, tuple[str, ...]]:
        """``fisher``'s ``"top_eigenvector"`` when direction ``"fisher"`` is measured, ``optimizer_state``'s ``"pending_update"`` when ``"update"`` is.

        Example:
            >>> DirectionalSharpness(directions=["update", "fisher"]).results_needed()
            {'fisher': ('top_eigenvector',), 'optimizer_state': ('pending_update',)}
            >>> DirectionalSharpness(directions=["gradient"]).results_needed()
            {}
        """
        reads = {"fisher": "fisher", "optimizer_state": "update"}
        return {k: v for k, v in super().results_needed().items() if k not in reads or reads[k] in self.directions}

    @property
    def _backward(self) -> bool:
        """Whether a forward+backward runs at theta: always but for ``"central"`` without ``"gradient"``."""
        return self.scheme != "central" or "gradient" in self.directions

    def probe_passes(self, n_directions: int | None = None) -> tuple[int, int]:
        """``(forwards, backwards)`` over the probe for ``n_directions`` measured directions (default: all configured).

        ``forwards`` counts every forward, the one a backward needs included; ``backwards``
        the backward passes: ``"two_sided"``/``"one_sided"`` 1 + 3n and 1, ``"central"``
        1 + 6n (+1 with ``"gradient"``) and 0 or 1.

        Example:
            >>> DirectionalSharpness(directions=["update", "gradient", "fisher"]).probe_passes()
            (10, 1)
            >>> DirectionalSharpness(directions=["update", "gradient", "fisher"], scheme="central").probe_passes()
            (20, 1)
        """
        n = len(self.directions) if n_directions is None else n_directions
        backward = 1 if self._backward else 0
        if self.scheme == "central":
            return 1 + 2 * N_STEPS * n + backward, backward
        return 1 + len(OFFSETS[self.scheme]) * n, backward

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode: the saved theta, one copy per direction, the gradient accumulator (when a backward runs)."""
        copies = 1.0 + len(self.directions) + (1.0 if self._backward else 0.0)
        return [("default", Cost(param_copies=copies, forward_only=not self._backward))]

    def time_cost(self, units: UnitCosts) -> float:
        """The forwards without a graph and the forward+backward of :meth:`probe_passes`, on the batches used."""
        forwards, backwards = self.probe_passes()
        seconds = (forwards - backwards) * units.forward + backwards * units.backward
        return seconds * batches_used(self, units) * per_batch(units)

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[DirectionalSharpness, dict[str, list[Any]]]:
        """Fewer probe batches (``n_batches``); the directions, scheme and steps are kept."""
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
        center: torch.Tensor | None = None
        if "update" in self.directions:
            update = _update(params, ctx)
            if isinstance(update, str):
                skipped["update"] = update
            else:
                directions["update"], norms["update"], ctx.meta["update_source"] = update
        if self._backward:
            gradient, center = _mean_gradient(ctx, params, chunks, n_total)
        if gradient is not None and "gradient" in self.directions:  # every scheme runs the backward for it
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
        offsets = [self.step * m for m in (GRID if self.scheme == "central" else OFFSETS[self.scheme])]
        sums = torch.zeros(len(directions), len(offsets) + 1, dtype=torch.float64)  # the last column: f(0)
        targets = list(params.values())
        done = 0
        with moved_weights(targets) as mover:
            sums[:, -1] = probe_loss_sum(ctx, chunks) if center is None or self.scheme == "central" else center
            for i, d in enumerate(directions.values()):
                for j, t in enumerate(offsets):
                    if t == 0.0:
                        sums[i, j] = sums[i, -1]
                        continue
                    mover.set_combination([t], [d])
                    sums[i, j] = probe_loss_sum(ctx, chunks)
                    done += 1
                    ctx.check_time(forwards_done=done)
        totals = self.reduce_states(ctx, loss_sums=sums)
        losses = (totals["loss_sums"] / n_total).numpy()
        forwards, backwards = self.probe_passes(len(directions))
        exact = gradient is not None
        ctx.meta.update(
            scheme=self.scheme,
            forward_passes=(forwards - backwards) * len(chunks),
            backward_passes=backwards * len(chunks),
            probe_forwards=forwards,
            slope_method="exact: g . d, g from the backward at theta" if exact else "central first differences, Richardson",
        )
        eps = max(torch.finfo(p.dtype).eps for p in params.values() if p.is_floating_point())
        noise = eps * float(np.abs(losses).max())
        slope_noise = SLOPE_NOISE_ULPS * eps * math.sqrt(flat_dot(gradient, gradient)) if gradient is not None else 0.0
        return self._result(directions, norms, gradient, losses, noise, slope_noise)

    def _result(
        self,
        directions: Mapping[str, list[torch.Tensor]],
        norms: Mapping[str, float],
        gradient: list[torch.Tensor] | None,
        losses: np.ndarray,
        noise: float,
        slope_noise: float,
    ) -> MetricResult:
        """The scalars and arrays from ``losses`` [n directions, offsets + 1] (f at the scheme's offsets, then f(0))."""
        h = self.step
        steps = [h * RATIO**k for k in range(N_STEPS)]
        scalars: dict[str, float] = {"loss": float(losses[0, -1])}
        arrays: dict[str, np.ndarray] = {"steps": np.asarray(steps, dtype=np.float64)}
        unsettled: list[str] = []
        for i, (name, d) in enumerate(directions.items()):
            row = losses[i]
            f0 = float(row[-1])
            slope = flat_dot(gradient, d) if gradient is not None else None
            grid = np.full(len(GRID), np.nan)
            if self.scheme == "central":
                grid[:] = row[:-1]
                plus = [float(v) for v in grid[N_STEPS + 1 :]]
                minus = [float(v) for v in grid[:N_STEPS][::-1]]
                fd = central_differences(f0, plus, minus, steps, noise)
            else:
                multiples = OFFSETS[self.scheme]
                grid[[GRID.index(m) for m in multiples]] = row[:-1]
                grid[GRID.index(0.0)] = f0
                window = ONE_SIDED_WINDOW if self.scheme == "one_sided" else None
                assert slope is not None  # these schemes always take the backward at theta
                fd = slope_corrected_differences(
                    f0, float(slope), [h * m for m in multiples], [float(v) for v in row[:-1]], noise, slope_noise, window
                )  # fmt: skip
            if fd["asymptotic"] is False:
                unsettled.append(f"{name} (ratio {fd['ratio']:.3g})")
            scalars[f"{name}/curvature"] = fd["curvature"]
            scalars[f"{name}/curvature_error"] = fd["curvature_error"]
            if slope is not None:
                scalars[f"{name}/slope"] = slope
            else:
                scalars[f"{name}/slope"] = fd["slope"]
                scalars[f"{name}/slope_error"] = fd["slope_error"]
            if fd["curvature"] > 0:
                scalars[f"{name}/critical_lr"] = 2.0 / fd["curvature"]
            if name in norms:
                scalars[f"{name}/norm"] = norms[name]
            arrays[f"{name}/losses"] = grid
            arrays[f"{name}/second_differences"] = np.asarray(fd["second_differences"], dtype=np.float64)
        meta = {"rounding_noise": noise, "slope_noise": slope_noise}
        result = MetricResult(name=self.name, scalars=scalars, arrays=arrays, meta=meta)
        if unsettled:
            result.status = "partial"
            result.meta["partial_reason"] = self._unsettled_reason(unsettled)
        return result

    def _unsettled_reason(self, unsettled: list[str]) -> str:
        if self.scheme == "central":
            shape = "the second differences do not shrink as h^2 along"
            expected = "1/4 expected"
        else:
            shape = "the slope-corrected differences D(h), D(2h), D(4h) do not shrink as h or h^2 along"
            expected = f"{1 / RATIO**2:g} to {1 / RATIO:g} expected"
        steps = [self.step * RATIO**k for k in range(N_STEPS)]
        return (
            f"{shape} " + ", ".join(unsettled) + f" ({expected}): the steps {steps} are too large for the curvature "
            "there, or rounding dominates; try another step="
        )


def _update(params: Mapping[str, torch.Tensor], ctx: ComputeContext) -> tuple[list[torch.Tensor], float, str] | str:
    """The unit last update Delta theta / ||Delta theta||, its norm and its source (:data:`UPDATE_SOURCES`); or why there is none.

    From the history when it holds a previous checkpoint, else from the pending step that
    ``optimizer_state`` handed on (:func:`_pending_update`).

    Raises:
        ValueError: the previous checkpoint lacks a trainable parameter, or holds it in another shape.
    """
    if not ctx.history.previous:
        return _pending_update(params, ctx)
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
    return [x / norm for x in delta], norm, UPDATE_SOURCES[0]


def _pending_update(params: Mapping[str, torch.Tensor], ctx: ComputeContext) -> tuple[list[torch.Tensor], float, str] | str:
    """The unit pending optimizer step handed on by ``optimizer_state`` at this save, its norm and source; or why there is none.

    A trainable parameter it holds no entry for (no optimizer state: the next step does not
    move it) counts as zero; one of another shape makes it unusable (the reason says which).
    """
    no_history = "no previous checkpoint yet"
    step, why = ctx.results.get("optimizer_state", OPTIMIZER_OUTPUT)
    if step is None:
        return f"{no_history}, and no pending optimizer step at this save: {why}"
    bad = [n for n, p in params.items() if n in step and tuple(step[n].shape) != tuple(p.shape)]
    if bad:
        return f"{no_history}, and the pending optimizer step handed on does not fit the trainable parameters: mis-shaped {bad[:5]}"
    with torch.no_grad():
        delta = [
            step[n].detach().to(device=p.device, dtype=p.dtype) if n in step else torch.zeros_like(p) for n, p in params.items()
        ]  # fmt: skip
    norm = math.sqrt(flat_dot(delta, delta))
    if norm == 0.0:
        return f"{no_history}, and the pending optimizer step is zero on the trainable parameters"
    return [x / norm for x in delta], norm, UPDATE_SOURCES[1]


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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The mean probe gradient g = (1/N) sum_i grad l_i (summed over ranks), one backward per chunk, in the parameters' dtype.

    Returns:
        ``(g, loss sum)``: g as one tensor per parameter, and sum_i l_i over the local
        chunks from the same forwards (a float64 scalar, summed as :func:`probe_loss_sum` does).
    """
    tensors = list(params.values())
    total = [torch.zeros_like(p) for p in tensors]
    losses = []
    for done, item in enumerate(chunks, start=1):
        chunk, real = unwrap(item)
        if not real:
            continue
        per_sample = ctx.loss_fn(ctx.model, chunk)
        grads = torch.autograd.grad(per_sample.sum(), tensors, allow_unused=True)
        losses.append(per_sample.detach().reshape(-1).to(torch.float64))
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g)
        ctx.check_time(backward_chunks_done=done)
    ctx.collective.sum_(total)
    loss_sum = torch.cat(losses).sum().cpu() if losses else torch.zeros((), dtype=torch.float64)
    return [t / n_total for t in total], loss_sum
