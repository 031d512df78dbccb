"""Loss landscape: the probe loss on a 2-D (or 1-D) slice through the weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.core.batches import count_samples, split_batch
from uma_callbacks.core.model_state import eager_attention
from uma_callbacks.core.sharding import (
    aligned_chunks,
    is_sharded,
    local,
    local_range,
    local_rows,
    reshard_fsdp,
    unwrap,
)
from uma_callbacks.linalg.hvp import HessianOperator, split_flat
from uma_callbacks.linalg.operators import top_eigenpairs
from uma_callbacks.linalg.weights import WeightMover, flat_dot, moved_weights
from uma_callbacks.metrics.base import (
    ComputeContext,
    Cost,
    Metric,
    MetricResult,
    check_choice,
)
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts, batches_used, odd_at_most, per_batch

NORMALIZATIONS = ("filter", "layer", "global")
#: Largest span: directions are normalised to the weights' scale (filter/layer/global), so a
#: span far beyond a few units only measures overflow.
MAX_SPAN = 1e3
MODES = ("stored", "lean")
#: entries of one generated block of a random direction (bounds lean mode's extra memory).
BLOCK_NUMEL = 1 << 16


class LossLandscape(Metric):
    r"""The probe loss on the plane theta + a d1 + b d2 (Li et al. 2018).

    L(a, b) = (1/N) sum_i l_i(theta + a d1 + b d2) for a, b in linspace(-span, span, n),
    n odd so that theta is the centre ``grid_losses[n // 2, n // 2]`` (evaluated at theta
    bit for bit). With ``dims=1`` the slice is L(a) = L(theta + a d1), n points.

    Directions:

    - random (``directions=None``): d_k Gaussian, drawn per parameter tensor from a
      generator seeded by (``seed + k``, tensor index), then normalised as in Li et al.
      2018, "Visualizing the Loss Landscape of Neural Nets": ``"filter"`` scales each
      output row r of a weight (``w[r]``; a filter for convolutions) to ||d_r|| =
      ||theta_r||; ``"layer"`` each tensor to ||d_t|| = ||theta_t||; ``"global"`` the whole
      vector to ||d|| = ||theta||. 1-D parameters (biases, norm weights) get d = 0 unless
      ``include_1d_params`` (then each is one row). A zero-norm row or tensor of theta
      (Qwen2's zero-initialised biases) gets a zero direction: no division by zero.
    - given: one or two dicts ``{param name: tensor}`` covering every trainable
      parameter, used as given (no normalisation).
    - ``"hessian"``: the top ``dims`` Hessian eigenvectors (unit norm, by Lanczos on
      double-backward products, ``hessian_tol``), used as given.

    Scalars: ``center_loss`` = L(0, 0); ``roughness`` = mean |L(x) - L(y)| over grid
    neighbours x, y (horizontal and vertical pairs); ``orthogonality`` = cos(d1, d2)
    (2-D only); ``loss_mean``, ``loss_std`` (population std) over the grid. Arrays:
    ``grid_losses [n, n]`` (rows a, columns b; ``[n]`` for 1-D), ``alphas [n]``,
    ``betas [n]`` (``[1]`` = [0.0] for 1-D).

    Evaluation: forward passes only, under ``torch.no_grad()``; per point the local
    per-sample losses are summed in float64; the [n, n] sums are all-reduced once and
    divided by the global N. The weights are moved in place from one saved copy of theta
    (:mod:`~uma_callbacks.linalg.weights`) and restored bit for bit, also on error. The
    points are taken from the centre out (:func:`grid_order`); a landscape stopped by its
    time limit keeps the points done (``status="partial"``, NaN at the others,
    ``meta["progress"]["grid_points_done"]``; one process), the scalars over those.

    Sharded models (FSDP2 ``fully_shard``): each rank moves its own shards in place. Random
    directions are drawn for the full tensor, block by block from the same per-tensor seed,
    and each rank keeps the entries of its shard, so the full direction is the same for any
    world size; filter norms of a shard's rows are local, layer and global norms (and theta's
    norms of 1-D tensors split over ranks) are summed over ranks. Given directions are cut
    to the shards; ``"hessian"`` directions are not supported there (no double backward).
    Every rank runs as many forwards as the rank with the most chunks (FSDP all-gathers).

    Memory (P = parameter bytes): ``mode="stored"`` keeps theta, d1 and d2 (3 P; fastest);
    ``mode="lean"`` keeps only theta and regenerates each tensor's directions from its
    seed, a block of ``BLOCK_NUMEL`` entries at a time, at every point (1 P plus blocks;
    two Gaussian draws per parameter per point). Given and Hessian directions are held as
    given whatever the mode.

    Args:
        n_points: n, odd, >= 3.
        span: the grid covers [-span, span] in each direction (> 0).
        normalization: ``"filter"``, ``"layer"`` or ``"global"`` (random directions).
        directions: None (random), ``"hessian"``, or one or two dicts name -> tensor.
        dims: 1 or 2 (default: 2, or the number of given directions).
        include_1d_params: also perturb 1-D parameters (random directions).
        seed: base seed of the random directions (d_k uses ``seed + k``).
        n_batches: use only the first ``n_batches`` local probe batches.
        mode: ``"stored"`` or ``"lean"`` (see Memory).
        hessian_tol: Lanczos tolerance for ``directions="hessian"``.
        chunk_size: samples per forward pass.
        timeout_seconds: stop between grid points past this time.

    Raises:
        ValueError: even or small ``n_points``, ``span <= 0``, unknown ``normalization``
            or ``mode``, bad ``dims``, malformed ``directions`` (here or, for names and
            shapes, at compute time), ``n_batches < 1``.

    Example:
        >>> lin = torch.nn.Linear(2, 1).double()
        >>> batch = {"x": torch.randn(6, 2, dtype=torch.float64), "y": torch.randn(6, 1, dtype=torch.float64)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)
        >>> r = LossLandscape(n_points=5, span=0.5).compute(lin, [batch], loss)
        >>> r.arrays["grid_losses"].shape, bool(r.scalars["center_loss"] == r.arrays["grid_losses"][2, 2])
        ((5, 5), True)
    """

    name = "landscape"
    cost = Cost(forward_only=True, param_copies=3.0)
    needs_grad = False
    supports_sharded = True

    def __init__(
        self,
        n_points: int = 21,
        span: float = 1.0,
        normalization: str = "filter",
        directions: Any = None,
        dims: int | None = None,
        include_1d_params: bool = False,
        seed: int = seeds.DEFAULT_SEED,
        n_batches: int | None = None,
        mode: str = "stored",
        hessian_tol: float = 1e-4,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        self.add_state("loss_sums", dist_reduce_fx="sum")
        self.add_state("n_samples", dist_reduce_fx="sum")
        validate.check_int("LossLandscape.n_points", n_points, 3, validate.MAX_GRID_POINTS)
        if n_points % 2 == 0:
            raise ValueError(
                f"LossLandscape.n_points must be odd and >= 3 (the grid is centred on theta); got {n_points!r}"
            )
        validate.check_number("LossLandscape.span", span, 0, MAX_SPAN, lo_open=True)
        check_choice("LossLandscape.normalization", normalization, NORMALIZATIONS)
        check_choice("LossLandscape.mode", mode, MODES)
        given = _check_directions(directions)
        if dims is None:
            dims = len(given) if given else 2
        check_choice("LossLandscape.dims", dims, (1, 2))
        if given and len(given) != dims:
            raise ValueError(
                f"LossLandscape.directions must hold {dims} dict(s) for dims={dims}; got {len(given)}"
            )
        validate.check_int("LossLandscape.n_batches", n_batches, 1, validate.MAX_BATCHES, allow_none=True)
        validate.check_seed("LossLandscape.seed", seed)
        validate.check_number("LossLandscape.hessian_tol", hessian_tol, 0, validate.MAX_TOLERANCE, lo_open=True)
        self.n_points = n_points
        self.span = float(span)
        self.normalization = normalization
        self.directions = directions
        self.dims = dims
        self.include_1d_params = bool(include_1d_params)
        self.seed = seed
        self.n_batches = n_batches
        self._mode = mode  # memory only: not part of the result's identity
        self.hessian_tol = float(hessian_tol)
        self._given = given

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """``[(mode, cost)]`` this metric can run in, fastest first.

        Random directions: ``"stored"`` (theta + ``dims`` directions,
        (1 + dims) P) then ``"lean"`` (theta only, 1 P, plus a few blocks); with
        ``mode="lean"`` only ``"lean"``. Given directions: theta + their copies; Hessian
        directions add a double-backward Lanczos (32 basis vectors and the graph).
        Forward passes of one chunk besides (no backward).
        """
        blocks = 8 * BLOCK_NUMEL * 8
        if self._given or self.directions == "hessian":
            hessian = self.directions == "hessian"
            cost = Cost(
                forward_only=not hessian,
                hvp=hessian,
                param_copies=1.0 + self.dims,
                vectors=40.0 if hessian else 0.0,
                fixed_bytes=blocks,
            )
            return [("stored", cost)]
        lean = ("lean", Cost(forward_only=True, param_copies=1.0, fixed_bytes=blocks))
        if self._mode == "lean":
            return [lean]
        return [("stored", Cost(forward_only=True, param_copies=1.0 + self.dims, fixed_bytes=blocks)), lean]

    def time_cost(self, units: UnitCosts) -> float:
        """One forward of the batches used per grid point (``n_points ** dims`` points)."""
        points = int(self.n_points) ** int(self.dims)
        return points * units.forward * batches_used(self, units) * per_batch(units)

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[LossLandscape, dict[str, list[Any]]]:
        """A coarser grid first (``n_points``, odd, down to 5), then fewer probe batches (``n_batches``)."""
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        dims = int(self.dims)
        per_point = self.time_cost(units) / int(self.n_points) ** dims
        scaling.set("n_points", odd_at_most(math.floor((seconds / per_point) ** (1.0 / dims)), 5))
        scaling.fewer_batches(seconds, units)
        return scaling.done()

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        sharded = is_sharded(ctx.model)
        if sharded:
            reshard_fsdp(ctx.model)  # the shards are what is moved (a root may be left gathered)
            if self.directions == "hessian":
                raise NotImplementedError(
                    "LossLandscape(directions='hessian') needs double backward, which FSDP2 does not give; "
                    "use random or given directions on a sharded model"
                )
            ctx.meta["sharded"] = True
        params = ctx.trainable_params()
        if not params:
            raise ValueError("LossLandscape: the model has no trainable parameters")
        mode = getattr(self, "_memory_mode", self._mode)
        chunks, n_local = _local_chunks(ctx, self.n_batches)
        coords = np.linspace(-self.span, self.span, self.n_points)
        coords[self.n_points // 2] = 0.0
        alphas = coords
        betas = coords if self.dims == 2 else np.zeros(1)
        if self._given:
            names, dirs = _given_directions(self._given, params)
            if sharded:
                dirs = [[local_rows(d, params[k]) for d, k in zip(dk, names)] for dk in dirs]
            ctx.meta["directions"] = "given"
        elif self.directions == "hessian":
            names, dirs = _hessian_directions(ctx, params, self.dims, self.seed, self.hessian_tol)
            ctx.meta["directions"] = "hessian"
        else:
            names, dirs = [], None  # the names are chosen below, with the random directions
            ctx.meta["directions"] = "random"
        sums = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
        done = torch.zeros(sums.shape, dtype=torch.bool)

        def keep(cosine: float) -> None:  # the points done so far, should the time limit stop the grid
            ctx.keep_partial(lambda: _partial_landscape(sums, done, n_local, alphas, betas, cosine, self.dims))

        if dirs is not None:
            targets = [local(params[k]) for k in names]
            cosine = _cosine(dirs, ctx.collective if sharded else None) if self.dims == 2 else math.nan
            keep(cosine)
            with moved_weights(targets) as mover:
                _evaluate_grid(
                    ctx, chunks, alphas, betas, sums, lambda a, b: mover.set_combination((a, b), dirs), done
                )
            ctx.meta["mode"] = "stored"
        else:
            names = [k for k, p in params.items() if self.include_1d_params or p.dim() >= 2]
            if not names:
                raise ValueError("LossLandscape: no parameter of 2 or more dims; set include_1d_params=True")
            targets = [local(params[k]) for k in names]
            with moved_weights(targets) as mover:
                layouts = [local_range(params[k]) for k in names] if sharded else None
                rand = _RandomDirections(
                    mover.theta, self.dims, self.seed, self.normalization, layouts, ctx.collective if sharded else None
                )
                cosine = rand.cosine() if self.dims == 2 else math.nan
                keep(cosine)
                if mode == "stored":
                    stored = rand.materialise()
                    setter = lambda a, b: mover.set_combination((a, b), stored)
                else:
                    setter = lambda a, b: rand.set_point(mover, (a, b))
                _evaluate_grid(ctx, chunks, alphas, betas, sums, setter, done)
                del rand
            ctx.meta["mode"] = mode
            ctx.meta["seeds"] = {f"d{k + 1}": self.seed + k for k in range(self.dims)}
        totals = self.reduce_states(ctx, loss_sums=sums, n_samples=torch.tensor([float(n_local)], dtype=torch.float64))
        grid = (sums / int(totals["n_samples"].item())).numpy()
        if self.dims == 1:
            grid = grid[:, 0]
        ctx.meta.update(n_perturbed_params=len(names), forward_passes=int(sums.numel()) * len(chunks))
        return landscape_result(grid, alphas, betas if self.dims == 2 else np.zeros(1), cosine)


def landscape_result(grid: np.ndarray, alphas: np.ndarray, betas: np.ndarray, cosine: float) -> MetricResult:
    """The :class:`LossLandscape` scalars from ``grid [n, n]`` (or ``[n]``) and the axes.

    Args:
        grid: losses, rows along alphas, columns along betas.
        alphas: ``[n]``.
        betas: ``[n]`` (``[1]`` for 1-D).
        cosine: cos(d1, d2), or NaN for 1-D (then ``orthogonality`` is left out).

    Returns:
        A :class:`MetricResult` named ``landscape``. A grid with NaN (points not reached:
        a partial landscape) gives each scalar over its finite points (``roughness`` over
        the neighbour pairs both reached), and leaves out a scalar with none.
    """
    grid = np.asarray(grid, dtype=np.float64)
    c = grid.shape[0] // 2
    diffs = np.concatenate([np.abs(np.diff(grid, axis=ax)).ravel() for ax in range(grid.ndim)])
    values = grid
    if not np.isfinite(grid).all():
        diffs, values = diffs[np.isfinite(diffs)], grid[np.isfinite(grid)]
    scalars: dict[str, float] = {}
    centre = float(grid[(c,) * grid.ndim])
    if math.isfinite(centre):
        scalars["center_loss"] = centre
    if diffs.size:
        scalars["roughness"] = float(diffs.mean())
    if values.size:
        scalars["loss_mean"] = float(values.mean())
        scalars["loss_std"] = float(values.std())
    if not math.isnan(cosine):
        scalars["orthogonality"] = float(cosine)
    arrays = {
        "grid_losses": grid,
        "alphas": np.asarray(alphas, np.float64),
        "betas": np.asarray(betas, np.float64),
    }
    return MetricResult(name="landscape", scalars=scalars, arrays=arrays)


# ---------------------------------------------------------------------- evaluation
def _local_chunks(ctx: ComputeContext, n_batches: int | None) -> tuple[list[Any], int]:
    batches = ctx.batches if n_batches is None else ctx.batches[:n_batches]
    chunks = [c for b in batches for c in split_batch(b, ctx.chunk_size)]
    if ctx.meta.get("sharded"):
        chunks = list(aligned_chunks(chunks, ctx.collective))
    return chunks, sum(count_samples(b) for b in batches)


def probe_loss_sum(ctx: ComputeContext, chunks: Sequence[Any]) -> torch.Tensor:
    """sum_i l_i over the local ``chunks`` (float64 scalar), by forward passes under no_grad.

    On a sharded model (``chunks`` from :func:`_local_chunks`, padded with ghost chunks to
    the most any rank has): FSDP's gathered copies are dropped first (the shards may have
    moved), every rank agrees it is healthy before the forwards, ghost chunks add nothing.
    """
    if ctx.meta.get("sharded"):
        reshard_fsdp(ctx.model)
        ctx.collective.agree()  # every rank healthy before FSDP's forward all-gathers
    losses = []
    with torch.no_grad():
        for item in chunks:
            chunk, real = unwrap(item)
            out = ctx.loss_fn(ctx.model, chunk).reshape(-1).to(torch.float64)
            if real:
                losses.append(out)
    return torch.cat(losses).sum().cpu() if losses else torch.zeros((), dtype=torch.float64)


def grid_order(rows: int, cols: int) -> list[tuple[int, int]]:
    """The grid's points from the centre out: by ring (Chebyshev distance), then row, then column.

    A landscape stopped by its time limit has then done theta itself and a centred square
    around it. Every point is set from theta afresh, so the order changes no value.

    Example:
        >>> grid_order(3, 1)
        [(1, 0), (0, 0), (2, 0)]
    """
    ci, cj = rows // 2, cols // 2
    points = [(i, j) for i in range(rows) for j in range(cols)]
    return sorted(points, key=lambda p: (max(abs(p[0] - ci), abs(p[1] - cj)), p[0], p[1]))


def _evaluate_grid(
    ctx: ComputeContext,
    chunks: Sequence[Any],
    alphas: np.ndarray,
    betas: np.ndarray,
    sums: torch.Tensor,
    set_point: Callable[[float, float], None],
    done: torch.Tensor,
) -> None:
    """Fill ``sums[i, j]`` point by point in :func:`grid_order`, marking each in ``done``."""
    for count, (i, j) in enumerate(grid_order(len(alphas), len(betas)), start=1):
        set_point(float(alphas[i]), float(betas[j]))
        sums[i, j] = probe_loss_sum(ctx, chunks)
        done[i, j] = True
        ctx.check_time(grid_points_done=count)


def _partial_landscape(
    sums: torch.Tensor,
    done: torch.Tensor,
    n_local: int,
    alphas: np.ndarray,
    betas: np.ndarray,
    cosine: float,
    dims: int,
) -> MetricResult | None:
    """The landscape of the points done (NaN elsewhere), as the full run divides them; ``None``: none done.

    One process only (see :meth:`ComputeContext.keep_partial`): the local sums are the
    probe's, divided by its N exactly as :meth:`LossLandscape._compute` does.
    """
    if not bool(done.any()):
        return None
    grid = (sums / int(n_local)).numpy()
    grid[~done.numpy()] = np.nan
    if dims == 1:
        grid = grid[:, 0]
    result = landscape_result(grid, alphas, betas if dims == 2 else np.zeros(1), cosine)
    result.meta["grid_points_done"] = int(done.sum())
    result.meta["grid_points"] = int(done.numel())
    return result


# ---------------------------------------------------------------------- given directions
def _check_directions(directions: Any) -> list[Mapping[str, torch.Tensor]]:
    """Validate the form of ``directions`` at construction; return the given dicts (or []).

    Raises:
        ValueError: ``directions`` is another string, not one or two dicts, or a dict that is
            empty or holds something other than tensors.
    """
    if directions is None or (isinstance(directions, str) and directions in ("random", "hessian")):
        return []
    if isinstance(directions, str):
        raise ValueError(
            f"LossLandscape.directions must be None, 'random', 'hessian' or one or two dicts; got {directions!r}"
        )
    given = (
        [directions]
        if isinstance(directions, Mapping)
        else list(directions)
        if isinstance(directions, (list, tuple))
        else None
    )
    if not given or len(given) > 2:
        raise ValueError(
            f"LossLandscape.directions must be one or two dicts {{param name: tensor}}; got {type(directions).__name__}"
        )
    for k, d in enumerate(given):
        if not isinstance(d, Mapping) or not d or not all(isinstance(v, torch.Tensor) for v in d.values()):
            raise ValueError(f"LossLandscape.directions[{k}] must be a non-empty dict {{param name: tensor}}")
    return given


def _given_directions(
    given: Sequence[Mapping[str, torch.Tensor]], params: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[list[torch.Tensor]]]:
    names = list(params)
    out = []
    for k, d in enumerate(given):
        missing = [n for n in names if n not in d]
        unknown = [n for n in d if n not in params]
        if missing or unknown:
            raise ValueError(
                f"LossLandscape.directions[{k}] must cover exactly the trainable parameters; "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}"
            )
        bad = [(n, tuple(d[n].shape), tuple(p.shape)) for n, p in params.items() if d[n].shape != p.shape]
        if bad:
            raise ValueError(
                f"LossLandscape.directions[{k}] has mis-shaped tensors (name, got, want): {bad[:5]}"
            )
        out.append([d[n].detach().to(device=p.device, dtype=p.dtype) for n, p in params.items()])
    return names, out


def _hessian_directions(
    ctx: ComputeContext, params: Mapping[str, torch.Tensor], dims: int, seed: int, tol: float
) -> tuple[list[str], list[list[torch.Tensor]]]:
    chunks = list(ctx.chunks())
    with eager_attention(ctx.model, ctx.meta):
        op = HessianOperator(ctx.model, ctx.loss_fn, chunks, params, ctx.n_total(), collective=ctx.collective)
        try:
            lz = top_eigenpairs(op, dims, tol=tol, seed=seed, return_vectors=True)
        finally:
            op.close()
    ctx.meta["hessian_eigenvalues"] = lz.eigenvalues.tolist()
    ctx.meta["hessian_matvecs"] = op.matvecs
    values = list(params.values())
    dirs = []
    assert lz.eigenvectors is not None  # asked for with return_vectors=True
    for k in range(dims):
        vec = lz.eigenvectors[:, k]
        vec = vec if vec[vec.abs().argmax()] >= 0 else -vec
        dirs.append([piece.to(p.dtype).clone() for piece, p in zip(split_flat(vec, values), values)])
    return list(params), dirs


def _cosine(dirs: Sequence[Sequence[torch.Tensor]], collective: Any = None) -> float:
    """cos(d1, d2); with a ``collective`` the dot products of the shards are summed over ranks."""
    pairs = ((0, 1), (0, 0), (1, 1))
    sums = torch.tensor([flat_dot(dirs[a], dirs[b]) for a, b in pairs], dtype=torch.float64)
    if collective is not None:
        collective.sum_([sums])
    dot, n1, n2 = (float(v) for v in sums)
    den = math.sqrt(n1) * math.sqrt(n2)
    return dot / den if den > 0 else math.nan


# ---------------------------------------------------------------------- random directions
class _RandomDirections:
    """Gaussian directions regenerated from per-tensor seeds, with their normalisation.

    Direction k of tensor i is drawn block by block (whole rows, at most ``BLOCK_NUMEL``
    entries) from a generator seeded with ``_tensor_seed(seed + k, i)`` on the tensor's
    device; ``materialise`` and ``set_point`` produce the same numbers. One pass at
    construction computes per-row statistics (||d_r||^2, <d1_r, d2_r>) and the scales.

    Sharded (``layouts[i] = (full shape, lo, hi)``: ``theta[i]`` holds entries ``[lo, hi)``
    of the flattened full tensor): the full tensor's blocks are drawn on every rank (the
    same numbers as one process), the rows' statistics of d are therefore whole everywhere,
    theta's row sums of squares are summed over ranks (``collective``), and each rank keeps
    the entries of its piece.
    """

    def __init__(
        self,
        theta: Sequence[torch.Tensor],
        dims: int,
        seed: int,
        normalization: str,
        layouts: Sequence[tuple[tuple[int, ...], int, int]] | None = None,
        collective: Any = None,
    ) -> None:
        self.theta = list(theta)
        self.dims = dims
        self.layouts = list(layouts) if layouts is not None else None
        self.seeds = [[_tensor_seed(seed + k, i) for i in range(len(self.theta))] for k in range(dims)]
        row_sq: list[list[torch.Tensor]] = [[] for _ in range(dims)]  # per k, per tensor: [rows] sum_r d^2
        dots = []  # per tensor: [rows] <d1_r, d2_r>
        for i, t in enumerate(self.theta):
            gens = [self._generator(k, i) for k in range(dims)]
            shape = self._full_rows(i)
            sq = [torch.zeros(shape[0], dtype=torch.float64, device=t.device) for _ in range(dims)]
            dot = torch.zeros(shape[0], dtype=torch.float64, device=t.device)
            for start, stop in _blocks(shape):
                draws = [
                    _draw(gens[k], torch.empty(stop - start, shape[1], dtype=t.dtype, device=t.device)).to(
                        torch.float64
                    )
                    for k in range(dims)
                ]
                for k in range(dims):
                    sq[k][start:stop] = draws[k].pow(2).sum(1)
                if dims == 2:
                    dot[start:stop] = (draws[0] * draws[1]).sum(1)
            for k in range(dims):
                row_sq[k].append(sq[k])
            dots.append(dot)
        if self.layouts is None:
            theta_sq = [_row_sq(t) for t in self.theta]
        else:  # the full rows' sums of squares: each rank fills its rows, summed over ranks
            theta_sq = [_local_row_sq(t, *layout) for t, layout in zip(self.theta, self.layouts)]
            if collective is not None:
                flat = torch.cat(theta_sq)
                collective.sum_([flat])
                theta_sq = list(flat.split([len(ts) for ts in theta_sq]))
        scales64: list[list[torch.Tensor]] = []  # [k][i]: [rows] (filter) or [1] (layer, global)
        for k in range(dims):
            if normalization == "filter":
                scales = [_safe_ratio(ts, ds) for ts, ds in zip(theta_sq, row_sq[k])]
            elif normalization == "layer":
                scales = [_safe_ratio(ts.sum(), ds.sum()).reshape(1) for ts, ds in zip(theta_sq, row_sq[k])]
            else:
                # both sums are tensors: the parameter list is never empty
                g = _safe_ratio(
                    cast(torch.Tensor, sum(ts.sum() for ts in theta_sq)), cast(torch.Tensor, sum(ds.sum() for ds in row_sq[k]))
                )
                scales = [g.reshape(1) for _ in theta_sq]
            scales64.append(scales)
        # per k, per tensor: a float (one scale) or a [rows, 1] tensor in the tensor's dtype
        self.scales: list[list[float | torch.Tensor]] = [
            [float(s) if s.numel() == 1 else s.to(t.dtype).unsqueeze(1) for s, t in zip(sk, self.theta)]
            for sk in scales64
        ]
        self._cosine = math.nan
        if dims == 2:
            num = sum(float((s1 * s2 * d).sum()) for s1, s2, d in zip(scales64[0], scales64[1], dots))
            n1 = sum(float((s * s * q).sum()) for s, q in zip(scales64[0], row_sq[0]))
            n2 = sum(float((s * s * q).sum()) for s, q in zip(scales64[1], row_sq[1]))
            if n1 > 0 and n2 > 0:
                self._cosine = num / math.sqrt(n1 * n2)
        self._buffer: torch.Tensor | None = None

    def cosine(self) -> float:
        """cos(d1, d2) of the normalised directions (NaN for 1-D or zero directions)."""
        return self._cosine

    def _generator(self, k: int, i: int) -> torch.Generator:
        return torch.Generator(device=self.theta[i].device).manual_seed(self.seeds[k][i])

    def _full_rows(self, i: int) -> tuple[int, int]:
        """``(rows, row_numel)`` of tensor ``i``'s full tensor."""
        if self.layouts is None:
            return _row_shape(self.theta[i])
        return _row_shape(torch.empty(self.layouts[i][0], device="meta"))

    def _local_blocks(self, k: int, i: int) -> Iterator[tuple[torch.Tensor, slice, slice]]:
        """Sharded: ``(scaled draw block flat, this piece's entries flat, block slice)`` per block.

        The blocks are those of direction ``k`` of tensor ``i`` overlapping the piece (all
        blocks are drawn: the generator is sequential).
        """
        t = self.theta[i]
        _, lo, hi = self.layouts[i]  # type: ignore[index]
        rows, width = self._full_rows(i)
        gen, scale = self._generator(k, i), self.scales[k][i]
        for start, stop in _blocks((rows, width)):
            block = _draw(gen, torch.empty(stop - start, width, dtype=t.dtype, device=t.device))
            a, b = max(lo, start * width), min(hi, stop * width)
            if a >= b:
                continue
            block.mul_(scale if isinstance(scale, float) else scale[start:stop])
            yield block.view(-1)[a - start * width : b - start * width], slice(a - lo, b - lo), slice(start, stop)

    def materialise(self) -> list[list[torch.Tensor]]:
        """d_k as full tensors shaped like theta (``mode="stored"``); sharded: this rank's pieces."""
        if self.layouts is not None:
            out = []
            for k in range(self.dims):
                dk = []
                for i, t in enumerate(self.theta):
                    d = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                    flat = d.view(-1)
                    for draw, where, _ in self._local_blocks(k, i):
                        flat[where] = draw
                    dk.append(d)
                out.append(dk)
            return out
        out = []
        for k in range(self.dims):
            dk = []
            for i, t in enumerate(self.theta):
                d = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                rows, gen, scale = _rows(d), self._generator(k, i), self.scales[k][i]
                for start, stop in _blocks(rows.shape):
                    block = _draw(gen, rows[start:stop])
                    block.mul_(scale if isinstance(scale, float) else scale[start:stop])
                dk.append(d)
            out.append(dk)
        return out

    def set_point(self, mover: WeightMover, coeffs: Sequence[float]) -> None:
        """Set ``p <- theta + sum_k c_k d_k``, regenerating each block of d_k (``mode="lean"``)."""

        def add(i: int, p: torch.Tensor) -> None:
            work = p if p.is_contiguous() else p.contiguous()
            if self.layouts is not None:
                flat = work.view(-1)
                for k, c in enumerate(coeffs):
                    if c != 0.0:
                        for draw, where, _ in self._local_blocks(k, i):
                            flat[where].add_(draw, alpha=c)
                if work is not p:
                    p.copy_(work)
                return
            rows = _rows(work)
            buffer = self._buffer_for(p)
            for k, c in enumerate(coeffs):
                if c == 0.0:
                    continue
                gen, scale = self._generator(k, i), self.scales[k][i]
                for start, stop in _blocks(rows.shape):
                    target = rows[start:stop]
                    draw = _draw(gen, buffer[: target.numel()].view(target.shape))
                    if isinstance(scale, float):
                        target.add_(draw, alpha=c * scale)
                    else:
                        target.add_(draw.mul_(scale[start:stop]), alpha=c)
            if work is not p:
                p.copy_(work)

        mover.set_per_tensor(add)

    def _buffer_for(self, p: torch.Tensor) -> torch.Tensor:
        b = self._buffer
        if b is None or b.dtype != p.dtype or b.device != p.device:
            self._buffer = b = torch.empty(BLOCK_NUMEL, dtype=p.dtype, device=p.device)
        return b


def _tensor_seed(seed: int, index: int) -> int:
    """A 63-bit seed for tensor ``index`` of a direction seeded ``seed`` (SeedSequence mixing)."""
    return (
        int(
            np.random.SeedSequence([seed & 0xFFFFFFFF, index])
            .generate_state(2, dtype=np.uint32)
            .view(np.uint64)[0]
        )
        >> 1
    )


def _row_shape(t: torch.Tensor) -> tuple[int, int]:
    """``(rows, row_numel)``: output rows of a weight; one row for 0-D/1-D tensors."""
    return (t.shape[0], t.numel() // max(1, t.shape[0])) if t.dim() >= 2 else (1, t.numel())


def _local_row_sq(t: torch.Tensor, full_shape: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    """``[rows]`` float64 sums of squares of the full tensor's rows, from the piece ``t``.

    ``t`` holds entries ``[lo, hi)`` of the flattened full tensor; rows elsewhere are 0.
    """
    rows, width = _row_shape(torch.empty(full_shape, device="meta"))
    out = torch.zeros(rows, dtype=torch.float64, device=t.device)
    if rows == 1:
        out[0] = t.reshape(-1).to(torch.float64).pow(2).sum() if t.numel() else 0.0
    elif hi > lo:
        out[lo // width : hi // width] = _row_sq(t.reshape(hi // width - lo // width, width))
    return out


def _row_sq(t: torch.Tensor) -> torch.Tensor:
    """``[rows]`` float64 sum of squares of each row, a block of rows at a time.

    No float64 copy of the whole tensor is made.
    """
    rows = t.reshape(_row_shape(t))
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=t.device)
    for start, stop in _blocks(rows.shape):
        out[start:stop] = rows[start:stop].to(torch.float64).pow(2).sum(1)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``t`` viewed as ``[rows, row_numel]`` (see :func:`_row_shape`)."""
    return t.view(_row_shape(t))


def _blocks(shape: tuple[int, int] | torch.Size) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of at most ``BLOCK_NUMEL`` entries (at least one row)."""
    rows, width = shape[0], shape[1]
    per = max(1, BLOCK_NUMEL // max(1, width))
    return [(s, min(s + per, rows)) for s in range(0, rows, per)]


def _draw(gen: torch.Generator, out: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous ``out`` with standard normal draws from ``gen``; return it."""
    if out.dtype in (torch.float32, torch.float64):
        return torch.randn(out.shape, generator=gen, out=out)
    return out.copy_(torch.randn(out.shape, generator=gen, dtype=torch.float32, device=out.device))


def _safe_ratio(theta_sq: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
    """||theta|| / ||d|| elementwise, 0 where either norm is 0 (no division by zero)."""
    theta_sq, d_sq = (
        torch.as_tensor(theta_sq, dtype=torch.float64),
        torch.as_tensor(d_sq, dtype=torch.float64),
    )
    ok = (theta_sq > 0) & (d_sq > 0)
    return torch.where(
        ok, theta_sq.sqrt() / torch.where(ok, d_sq, torch.ones_like(d_sq)).sqrt(), torch.zeros_like(d_sq)
    )
