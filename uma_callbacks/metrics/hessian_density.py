r"""Hessian spectral density by stochastic Lanczos quadrature (SLQ).

The eigenvalue distribution of H [P, P] (the Hessian of the probe loss, as in
:class:`~uma_callbacks.metrics.hessian.HessianSpectrum`) is mu = (1/P) sum_i delta(lambda_i).
For a unit vector v, m Lanczos steps from v give the tridiagonal T_m with eigenpairs
(theta_l, y_l); the Gauss quadrature sum_l tau_l delta(theta_l), tau_l = y_l[0]^2, matches
v^T f(H) v exactly for every polynomial f of degree <= 2m - 1. With v = z / ||z|| for a
Rademacher z, E[v^T f(H) v] = tr f(H) / P, so the average over n_v such vectors estimates
mu (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019):

    mu ~ (1/n_v) sum_j sum_l tau_{j,l} delta(theta_{j,l}).

Outputs (``HessianDensity``):

- ``density`` on ``grid`` [G]: the SLQ distribution smoothed by a Gaussian of standard
  deviation ``sigma`` = ``bandwidth`` x the spectrum's width (lambda_max - lambda_min of
  the Ritz values), integrating to 1 (a probability density in lambda);
- ``moments`` [4] and ``moments_stderr`` [4]: (1/P) tr(H^k), k = 1..4, and their standard
  errors over the n_v vectors. Gauss quadrature is exact for these degrees once m >= 3, so
  their only error is the vectors' sampling error, the standard error stated;
- ``trace`` = P x moments[0] and ``trace_stderr``: with Rademacher starts, P v_j^T H v_j =
  z_j^T H z_j, so this is Hutchinson's estimator on the same n_v probes;
- ``bulk_edge``, ``n_outliers`` (and ``outlier_mass``): scanning the smoothed density
  upwards from its peak, the bulk edge is the start of the first gap: the first grid
  point from which the density stays below the gap level over at least ``min_gap`` x the
  width (a dip between two quadrature nodes is narrower and is not an edge); the top
  Ritz value when there is no such gap (then no outliers). The gap level is the lower of
  ``edge_threshold`` x the peak and half the height one eigenvalue alone gives the
  smoothed density, 1 / (P sigma sqrt(2 pi)): on a 22.7M-parameter model the tail
  between the bulk and the outliers holds hundreds of eigenvalues at 1e-6 of the peak,
  which is bulk, not a gap (a level relative to the peak alone called it ~700 outliers
  on the MiniLM, where one isolated eigenvalue stood above a true gap).
  ``n_outliers`` = round(P x mass of the SLQ distribution above the edge), the estimated
  number of eigenvalues above the bulk (an isolated eigenvalue weighs about 1/P in each
  vector's quadrature, so the count is as noisy as the weights: a few vectors give it to
  within a factor of about 2);
- ``negative_mass``: the SLQ distribution's mass below -1e-6 x max|theta| (unsmoothed:
  a Gaussian around a bulk at 0 would put half of it below zero);
- ``lambda_max``, ``lambda_min``: the extreme Ritz values over all vectors.

Cost: n_v x n_steps Hessian-vector products through one cached first-backward graph
(:func:`~uma_callbacks.metrics.hessian_setup.hessian_setup`), the tridiagonals built by
:func:`~uma_callbacks.linalg.lanczos_quadrature.lanczos_tridiagonals`: by default the
plain three-term recurrence, three vectors [P] per start and no basis (SLQ needs no
orthogonal basis); ``reorthogonalise="partial"`` keeps each start's n_steps basis vectors
and reorthogonalises as :func:`~uma_callbacks.linalg.lanczos.lanczos_top_k` does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.linalg.hutchinson import rademacher
from uma_callbacks.linalg.lanczos_quadrature import REORTHOGONALISE, gauss_quadrature, lanczos_tridiagonals
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, check_choice
from uma_callbacks.metrics.hessian_setup import hessian_setup
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts

#: the moments reported, (1/P) tr(H^k) for k = 1..MOMENTS
MOMENTS = 4


class HessianDensity(Metric):
    r"""The Hessian's eigenvalue density by stochastic Lanczos quadrature (see the module docstring).

    Args:
        n_vectors: Rademacher start vectors n_v (at least 2, for the standard errors).
        n_steps: Lanczos steps m per vector (at most P; fewer when the Krylov space ends).
            The default 4 x 16 = 64 products (about 350 training steps on the MiniLM probe
            of the README's cost table, ~5 per product; 128 before) gives, on the oracle tests' tiny
            Qwen2 (P = 1984), a density within 0.6% of the spectrum's width of the exact
            one in Wasserstein-1 (0.3% with 32 steps, at twice the products) and
            lambda_max to 2e-4 relative (1e-6 with 32); the moments are exact for every
            m >= 3, their error is the vectors' sampling error either way.
        grid_points: points of the density's grid, spanning the Ritz values plus 5% of
            the width on each side.
        bandwidth: the Gaussian's standard deviation as a fraction of the width.
        edge_threshold: a gap's density is below this fraction of the peak (and below half
            of one eigenvalue's height; for a whole gap, see ``min_gap``).
        min_gap: the shortest gap below ``edge_threshold`` that ends the bulk, as a
            fraction of the width.
        seed: seeds the start vectors (vector j from ``seed + j``).
        reorthogonalise: ``"none"`` (the plain three-term recurrence: three vectors [P]
            per start and no basis; on an accelerator up to 4 starts share each batched
            product) or ``"partial"`` / ``"full"`` (each start's ``n_steps`` basis vectors
            kept and reorthogonalised, :func:`~uma_callbacks.linalg.lanczos.lanczos_top_k`).
            The quadrature needs no orthogonal basis (see
            :mod:`~uma_callbacks.linalg.lanczos_quadrature`); the oracle tests hold either way.
        chunk_size: samples per double backward.
        timeout_seconds: stop between products past this time.

    Raises:
        ValueError: a count or fraction out of its range (named).

    Example:
        >>> lin = torch.nn.Linear(3, 1).double()
        >>> batch = {"x": torch.randn(8, 3, dtype=torch.float64), "y": torch.randn(8, 1, dtype=torch.float64)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)
        >>> r = HessianDensity(n_vectors=4).compute(lin, [batch], loss)
        >>> r.arrays["density"].shape, round(float(np.trapezoid(r.arrays["density"], r.arrays["grid"])), 3)
        ((256,), 1.0)
    """

    name = "hessian_density"
    needs_eager_attention = True
    #: the default (no basis): per start the ring [q_{j-1}; q_j], the product and a work copy
    cost = Cost(hvp=True, param_copies=4.0)

    def __init__(
        self,
        n_vectors: int = 4,
        n_steps: int = 16,
        grid_points: int = 256,
        bandwidth: float = 0.02,
        edge_threshold: float = 1e-3,
        min_gap: float = 0.05,
        seed: int = seeds.DEFAULT_SEED,
        *,
        reorthogonalise: str = "none",
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        check_choice("HessianDensity.reorthogonalise", reorthogonalise, REORTHOGONALISE)
        validate.check_int("HessianDensity.n_vectors", n_vectors, 2, validate.MAX_DRAWS)
        validate.check_int("HessianDensity.n_steps", n_steps, 3, validate.MAX_ITERATIONS)
        validate.check_int("HessianDensity.grid_points", grid_points, 16, 100_000)
        validate.check_number("HessianDensity.bandwidth", bandwidth, 0, 1, lo_open=True)
        validate.check_number("HessianDensity.edge_threshold", edge_threshold, 0, 1, lo_open=True, hi_open=True)
        validate.check_number("HessianDensity.min_gap", min_gap, 0, 1, lo_open=True, hi_open=True)
        validate.check_seed("HessianDensity.seed", seed)
        self.n_vectors = n_vectors
        self.n_steps = n_steps
        self.grid_points = grid_points
        self.bandwidth = float(bandwidth)
        self.edge_threshold = float(edge_threshold)
        self.min_gap = float(min_gap)
        self.seed = seed
        self.reorthogonalise = reorthogonalise

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode: the Lanczos vectors, the product's output and the cached graph.

        Without reorthogonalisation, per start run together (4 at most, on an accelerator):
        the ring [q_{j-1}; q_j], the product and a work copy; with it, the ``n_steps``
        basis vectors and about 4 work vectors.
        """
        if self.reorthogonalise == "none":
            vectors = 4.0 * min(self.n_vectors, 4)
        else:
            vectors = float(self.n_steps + 4)
        return [("default", Cost(hvp=True, vectors=vectors, probe_graph_samples=True))]

    def time_cost(self, units: UnitCosts) -> float:
        """One Hessian-vector product per Lanczos step of each vector."""
        return self.n_vectors * self.n_steps * units.hvp

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[HessianDensity, dict[str, list[Any]]]:
        """Fit ``seconds``: fewer vectors (down to 2), then fewer steps (down to 8)."""
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        room = seconds / max(units.hvp, 1e-12)
        scaling.set("n_vectors", max(2, min(self.n_vectors, int(room // self.n_steps))))
        if scaling.metric.n_vectors * self.n_steps > room:
            scaling.set("n_steps", max(8, min(self.n_steps, int(room // scaling.metric.n_vectors))))
        return scaling.done()

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        setup = hessian_setup(ctx, "HessianDensity", cache_graph=True)
        op = setup.op
        block = self._block(setup.device)
        nodes: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        done: list[int] = []
        try:
            for first in range(0, self.n_vectors, block):
                group = range(first, min(first + block, self.n_vectors))
                starts = torch.stack(
                    [rademacher(op.dim, torch.Generator(device="cpu").manual_seed(int(self.seed) + j), setup.dtype) for j in group]
                ).to(setup.device)
                for alphas, betas in lanczos_tridiagonals(
                    lambda rows: op.matmat_rows(rows.to(op.dtype)),
                    starts,
                    self.n_steps,
                    dtype=setup.dtype,
                    reorthogonalise=self.reorthogonalise,
                ):
                    theta, tau = gauss_quadrature(alphas, betas)
                    nodes.append(theta)
                    weights.append(tau)
                    done.append(len(alphas))
                del starts
                ctx.check_time(vectors_done=len(nodes), matvecs=op.matvecs)
        finally:
            op.close()
        result = density_result(nodes, weights, op.dim, self.grid_points, self.bandwidth, self.edge_threshold, self.min_gap)
        ctx.meta.update(
            matvecs=op.matvecs,
            n_params=op.dim,
            lanczos_steps=done,
            lanczos_block_size=block,
            reorthogonalise=self.reorthogonalise,
            seeds={"vectors": [int(self.seed) + j for j in range(self.n_vectors)]},
            hvp_method="double_backward",
        )
        return result

    def _block(self, device: torch.device) -> int:
        """Start vectors run together (one batched product per step).

        1 on CPU, where a batched product costs what its products do one by one, or with
        reorthogonalisation (one basis per start); up to 4 on an accelerator.
        """
        if device.type == "cpu" or self.reorthogonalise != "none":
            return 1
        return min(self.n_vectors, 4)


def density_result(
    nodes: list[np.ndarray],
    weights: list[np.ndarray],
    dim: int,
    grid_points: int,
    bandwidth: float,
    edge_threshold: float,
    min_gap: float = 0.05,
) -> MetricResult:
    """The :class:`HessianDensity` result of per-vector quadratures (see the module docstring).

    Args:
        nodes: per vector, its Ritz values theta [m_j].
        weights: per vector, their weights tau [m_j] (each summing to 1).
        dim: P.
        grid_points: G.
        bandwidth: sigma over the width.
        edge_threshold: a gap's density over the peak (see the module docstring).
        min_gap: the shortest gap that ends the bulk, over the width.

    Returns:
        The result named ``hessian_density`` with its scalars and arrays.
    """
    n_v = len(nodes)
    every = np.concatenate(nodes)
    lo, hi = float(every.min()), float(every.max())
    width = hi - lo
    scale = max(abs(lo), abs(hi), 1e-300)
    sigma = bandwidth * width if width > 0 else bandwidth * scale
    pad = max(0.05 * width, 4 * sigma)
    grid = np.linspace(lo - pad, hi + pad, grid_points)
    all_nodes = every
    all_weights = np.concatenate(weights) / n_v
    density = gaussian_density(grid, all_nodes, all_weights, sigma)
    per_vector = np.stack([[float((tau * theta**k).sum()) for k in range(1, MOMENTS + 1)] for theta, tau in zip(nodes, weights)])
    moments = per_vector.mean(axis=0)
    moments_stderr = per_vector.std(axis=0, ddof=1) / math.sqrt(n_v) if n_v > 1 else np.full(MOMENTS, math.nan)
    one = 1.0 / (dim * sigma * math.sqrt(2 * math.pi))  # one eigenvalue's height in the smoothed density
    edge = bulk_edge(grid, density, edge_threshold, min_gap * width, top=hi, level=0.5 * one)
    above = float(all_weights[all_nodes > edge].sum())
    negative = float(all_weights[all_nodes < -1e-6 * scale].sum())
    scalars = {
        "trace": float(dim * moments[0]),
        "trace_stderr": float(dim * moments_stderr[0]),
        "bulk_edge": edge,
        "n_outliers": float(round(dim * above)),
        "outlier_mass": above,
        "negative_mass": negative,
        "lambda_max": hi,
        "lambda_min": lo,
    }
    arrays = {
        "grid": grid,
        "density": density,
        "moments": moments,
        "moments_stderr": moments_stderr,
        "nodes": _padded(nodes),
        "weights": _padded(weights),
    }
    return MetricResult(name=HessianDensity.name, scalars=scalars, arrays=arrays, meta={"sigma": sigma, "n_vectors": n_v, "n_params": int(dim)})


def gaussian_density(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """sum_l w_l N(t; theta_l, sigma^2) at each grid point t (float64 [G]).

    Example:
        >>> g = np.linspace(-5, 5, 1001)
        >>> round(float(np.trapezoid(gaussian_density(g, np.array([0.0]), np.array([1.0]), 1.0), g)), 4)
        1.0
    """
    z = (grid[:, None] - nodes[None, :]) / sigma
    return (np.exp(-0.5 * z**2) * weights[None, :]).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))


def bulk_edge(
    grid: np.ndarray, density: np.ndarray, threshold: float, min_gap: float, top: float, level: float = math.inf
) -> float:
    """The start of the first gap above the density's peak: below min(``threshold`` x peak, ``level``) over ``min_gap`` at least.

    Args:
        grid: the ascending grid [G].
        density: the density on it [G].
        threshold: the gap's density over the peak.
        min_gap: the gap's shortest length (in eigenvalue units).
        top: what is returned when there is no gap before the top of the spectrum.
        level: the gap's density at most, in absolute terms (default: no bound but ``threshold``).

    Returns:
        The gap's first grid point, or ``top``.

    Example:
        >>> g = np.linspace(0, 10, 101)
        >>> d = np.exp(-(g**2)) + 1e-6 * (np.abs(g - 9) < 0.5)
        >>> bulk_edge(g, d, 1e-3, 2.0, top=9.5)
        2.7
    """
    peak = int(np.argmax(density))
    low = density < min(threshold * density[peak], level)
    start = None
    for i in range(peak, grid.size):
        if not low[i]:
            start = None
            continue
        if start is None:
            start = i
        if grid[i] - grid[start] >= min_gap:
            return float(grid[start]) if grid[start] < top else float(top)
    return float(top)


def wasserstein_1(a_nodes: np.ndarray, a_weights: np.ndarray, b_nodes: np.ndarray, b_weights: np.ndarray) -> float:
    """W1 between two discrete distributions on the line: the integral of |F_a - F_b|.

    Example:
        >>> wasserstein_1(np.array([0.0]), np.array([1.0]), np.array([2.0]), np.array([1.0]))
        2.0
    """
    points = np.concatenate([a_nodes, b_nodes])
    order = np.argsort(points, kind="stable")
    points = points[order]
    mass = np.concatenate([a_weights / a_weights.sum(), -b_weights / b_weights.sum()])[order]
    cdf_gap = np.cumsum(mass)[:-1]
    return float(np.sum(np.abs(cdf_gap) * np.diff(points)))


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    """``[n, max m]`` float64, NaN past a row's end (a Krylov space that ended early)."""
    out = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
