"""Hessian spectrum: top-k eigenvalues by Lanczos, trace by Hutchinson, spectrum scalars."""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.linalg.hutchinson import (
    TRACE_STDERR_SHARE,
    HutchinsonResult,
    hutchinson_trace,
    mean_and_stderr,
    probes_needed,
    trace_spread,
    trace_too_uncertain,
)
from uma_callbacks.linalg.hvp import HessianBlock, HessianOperator, split_flat
from uma_callbacks.linalg.lanczos import (
    LanczosProgress,
    LanczosResult,
    block_lanczos_top_k,
    lanczos_top_k,
    relative_residuals,
    within_tolerance,
)
from uma_callbacks.metrics.base import (
    ComputeContext,
    Cost,
    Metric,
    MetricResult,
    check_choice,
    module_of,
)
from uma_callbacks.metrics.hessian_setup import hessian_setup
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts


class HessianSpectrum(Metric):
    r"""Top eigenvalues and trace of the Hessian of the probe loss.

    N probe samples, L = (1/N) sum_i l_i, H = nabla^2 L [P, P], applied matrix-free by
    double backward (:class:`~uma_callbacks.linalg.hvp.HessianOperator`; the products
    are summed over chunks and ranks, then divided by the global N).

    - ``top_eigenvalues [k]``: the k algebraically largest eigenvalues, descending, by
      block Lanczos (:func:`~uma_callbacks.linalg.lanczos.block_lanczos_top_k`: b =
      ``block_size`` products per step in one batched double backward, block
      reorthogonalisation with a second pass only when needed; ``block_size=1`` is
      classical Lanczos with full reorthogonalisation; Lanczos 1950, Golub & Underwood
      1977; for networks Ghorbani et al. 2019, Papyan 2020), stopped when every Ritz
      residual is below ``tol * |lambda_1|`` or after ``max_iter`` products
      (``meta["lanczos_converged"]`` says which; ``meta["lanczos_residuals"]`` holds the
      residual norms ||H y_i - theta_i y_i|| of the Ritz pairs and
      ``meta["lanczos_relative_residuals"]`` the same divided by |lambda_1|).
    - ``trace`` = (1/m) sum_j z_j^T H z_j over m Rademacher probes (Hutchinson 1989),
      ``trace_stderr`` its standard error. A trace whose standard error exceeds |trace| / 2
      (:func:`~uma_callbacks.linalg.hutchinson.trace_too_uncertain`) makes the result
      ``"partial"`` (``meta["partial_reason"]``, ``meta["trace_spread"]`` = std(t_j) / |trace|).
    - ``top_eigenvalue`` = lambda_1.
    - ``top_k_effective_rank`` = exp(-sum_j p_j log p_j) with p_j = |lambda_j| / sum_l
      |lambda_l| over the computed top-k only (at most k, whatever the rank of H).
      Negative eigenvalues count by magnitude: a Hessian away from a minimum has some,
      and the entropy needs a distribution.
    - ``top_k_condition_number`` = lambda_1 / lambda_k over the computed top-k only (not
      lambda_max / lambda_min of H) when lambda_k > 0; ``inf`` when lambda_k <= 0 (the
      top-k block is not positive definite). Journals before these names call the two
      ``effective_rank`` and ``condition_number``.

    Per-block curvature (``blocks``): for each block S of parameters (a module's),
    ``layers/<module>/top_eigenvalue`` = lambda_1(H_SS), the top eigenvalue of the diagonal
    block of H for the block's parameters, by Lanczos (top-1, the same ``tol``,
    ``residual_tol`` and start rule, the start being the block's slice of the gradient
    sketch) on products restricted to the block
    (:class:`~uma_callbacks.linalg.hvp.HessianBlock`: the second backward differentiates
    only the block's gradients, with respect to the block's parameters; every block
    shares the whole model's cached first backward). ``layers/<module>/trace`` =
    tr(H_SS) and ``layers/<module>/trace_stderr``, from the whole model's Hutchinson
    probes at no extra product: t_j,S = sum_{i in S} z_j,i (H z_j)_i is unbiased for
    tr(H_SS) (E[z_i z_l] = delta_il), its variance including the off-block terms.
    ``meta["blocks"]`` holds each block's products, parameters and relative residual; a
    block outside ``residual_tol`` makes the result ``"partial"``.

    Stopped by its time limit (one process), the result keeps what was finished
    (``status="partial"``, ``meta["progress"]``): during Lanczos, the Ritz values and
    residuals of the products taken (exactly what ``max_iter`` = those products gives,
    without eigenvectors; ``meta["lanczos_converged_count"]`` counts the leading pairs
    within ``residual_tol``); during Hutchinson, the whole Lanczos result and the trace of
    the probes taken (two at least). Stopped in the first product, it is a ``timeout``.

    Attention implementations without a double backward (SDPA, flash) are switched to
    eager for the computation and restored after (``meta["attn_implementation"]``).

    Memory: the Lanczos basis holds up to ``max_iter`` vectors [P] (default
    ``max(4k, k + 40)``; ``max(6k, k + 55)`` with ``block_size=1``) in the parameters' dtype (float32 at least) on
    ``basis_device``; the products hold the double-backward graph of one chunk (of
    every local chunk when cached, see ``cache_graph``).

    Args:
        top_k: number of eigenvalues k.
        hutchinson_samples: Rademacher probes m for the trace; 0 skips the trace. A
            compute budget never scales them below
            :func:`~uma_callbacks.linalg.hutchinson.probes_needed` of the spread measured
            at this metric's previous run (18 before any: the bound for a positive
            semi-definite H), nor above this.
        return_eigenvectors: also return the Ritz vectors as
            ``result.tensors["eigvec_<j>/<param name>"]`` (j = 0 is lambda_1), on CPU;
            :func:`eigenvector_directions` turns them into landscape directions.
        tol: relative Ritz-residual tolerance of Lanczos (it stops once every top-k pair
            meets it); ``None``: ``residual_tol`` (stop as soon as the result is as good as
            it vouches for).
        residual_tol: the relative residual the result vouches for: when some top-k
            pair's ||H y - theta y|| / |lambda_1| exceeds it after ``max_iter`` products,
            ``result.status`` is ``"partial"`` (values kept; ``meta["lanczos_residual_tol"]``
            and the residuals say by how much) instead of ``"ok"``.
        start: the Lanczos start vector (block): ``"gradients"`` (b random combinations of
            the per-sample gradients, one batched backward: they span the Gauss-Newton
            part's range for a 2-class softmax; measured, their span holds 96% of the
            MiniLM probe's top Hessian eigenvector but 8-40% of each of the next nine, and
            10% then under 2% of the bench Qwen2's, so it saves no products: a Gaussian
            start passes the residual test sooner on both, with a top-10 eigenvalue missed,
            ``bench/spectra_starts.py``), ``"random"`` (Gaussian from ``seed``) or
            ``"previous"``: the sum of the top-k Ritz vectors this metric found at the
            previous checkpoint it measured (a warm start; ``"gradients"`` at the first, or
            when the parameters changed; ``meta["lanczos_start"]`` says which ran). It keeps
            one vector [P] in host memory between checkpoints (91 MB on the MiniLM) and forms
            the Ritz vectors at each run. ``bench/spectra.py``: on its Qwen2 one AdamW step
            (lr 1e-4) after a checkpoint, 48 products instead of 63 for the top-10 at a
            relative residual of 1e-2, the same eigenvalues (2.3e-4 against 2.7e-4 of
            |lambda_1| from a converged reference); the nearer the checkpoints, the larger
            the saving, and a top-10 eigenvalue the previous checkpoint missed is found no
            sooner than from ``"gradients"``.
        seed: seeds the Lanczos start vector; the Hutchinson probes use ``seed + 1``.
        max_iter: the most Lanczos products (default above, at most P).
        cache_graph: keep the first-backward graph across products (see
            :mod:`~uma_callbacks.linalg.hvp`); ``None``: when the local probe is one chunk,
            or when every chunk's graph (measured on the first, ``meta["hvp_graph_bytes"]``)
            adds at most a quarter of the Lanczos basis; under a memory plan, in the plan's
            ``"device"`` mode (which prices them). A memory knob: not part of the configuration.
        basis_device: where the Lanczos basis lives (``"cpu"`` saves accelerator memory;
            a memory knob, not part of the configuration).
        block_size: products per Lanczos step (and per Hutchinson call), taken at once;
            ``None``: 1 on CPU, ``min(top_k, 4)`` on an accelerator. A block's products run
            as one batched double backward, which pays on a GPU; on CPU a batched product
            costs what one alone does (2.15 vs 2.04 training steps on the MiniLM probe)
            while a block Krylov space of the same size has a lower polynomial degree:
            top-10 on the MiniLM reached a relative residual of 4.4e-2 in 48 products with
            b = 4 and 1e-2 in about 52 with b = 1 (``bench/spectra.py``). 1: classical
            Lanczos (the three-term recurrence with measured coefficients, then a full
            reorthogonalisation whenever Simon's estimate of the lost orthogonality asks
            for one; ``meta["lanczos_basis_rows_read"]`` counts what those passes read).
        blocks: per-block top eigenvalue and trace (see above): ``"layers"`` (one block per
            module owning trainable parameters, its own parameters), a list of module names
            (each block: every trainable parameter under the module), or ``None`` (none).
        chunk_size: samples per double backward.
        timeout_seconds: stop between products past this time.

    Raises:
        ValueError: ``top_k < 1``, ``hutchinson_samples`` negative or 1, ``tol`` not
            positive, ``max_iter`` not a positive integer, ``blocks`` not ``"layers"``, a
            list of module names or ``None`` (at compute: a name the model does not have, or
            a module without trainable parameters).

    Example:
        >>> lin = torch.nn.Linear(3, 1).double()
        >>> batch = {"x": torch.randn(8, 3, dtype=torch.float64), "y": torch.randn(8, 1, dtype=torch.float64)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)
        >>> r = HessianSpectrum(top_k=2, hutchinson_samples=4).compute(lin, [batch], loss)
        >>> r.arrays["top_eigenvalues"].shape, r.meta["lanczos_converged"]
        ((2,), True)
    """

    name = "hessian"
    needs_eager_attention = True
    #: default config: basis of max(6k, k + 55) = 65 vectors, plus the accumulator and a product.
    cost = Cost(hvp=True, param_copies=67.0)

    def __init__(
        self,
        top_k: int = 10,
        hutchinson_samples: int = 50,
        return_eigenvectors: bool = False,
        tol: float | None = None,
        seed: int = seeds.DEFAULT_SEED,
        max_iter: int | None = None,
        cache_graph: bool | None = None,
        basis_device: str | None = None,
        *,
        block_size: int | None = None,
        residual_tol: float = 1e-2,
        start: str = "gradients",
        blocks: str | Sequence[str] | None = None,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        validate.check_int("HessianSpectrum.top_k", top_k, 1, validate.MAX_TOP_K)
        validate.check_int("HessianSpectrum.hutchinson_samples", hutchinson_samples, 0, validate.MAX_DRAWS)
        if hutchinson_samples == 1:
            raise ValueError(
                "HessianSpectrum.hutchinson_samples must be 0 (no trace) or an integer in [2, "
                f"{validate.MAX_DRAWS}] (the standard error needs two probes); got {hutchinson_samples!r}"
            )
        validate.check_number("HessianSpectrum.tol", tol, 0, validate.MAX_TOLERANCE, lo_open=True, allow_none=True)
        validate.check_number("HessianSpectrum.residual_tol", residual_tol, 0, validate.MAX_TOLERANCE, lo_open=True)
        validate.check_int("HessianSpectrum.max_iter", max_iter, 1, validate.MAX_ITERATIONS, allow_none=True)
        validate.check_seed("HessianSpectrum.seed", seed)
        validate.check_int("HessianSpectrum.block_size", block_size, 1, validate.MAX_TOP_K, allow_none=True)
        check_choice("HessianSpectrum.start", start, ("gradients", "random", "previous"))
        self.blocks = check_blocks(blocks)
        self.top_k = top_k
        self.hutchinson_samples = hutchinson_samples
        self.return_eigenvectors = bool(return_eigenvectors)
        self.residual_tol = float(residual_tol)
        self.tol = float(tol) if tol is not None else self.residual_tol
        self.start = start
        self.seed = seed
        self.max_iter = max_iter
        self.block_size = block_size
        self._cache_graph = cache_graph
        self._basis_device = basis_device
        # std(t_j) / |trace| of the latest run, shared with the budget's scaled copies (a
        # shallow copy keeps this dict), read by scaled_to: not configuration
        self._measured: dict[str, float] = {}
        # start="previous": {"names": parameter names, "vector": the sum of the last top-k Ritz
        # vectors [P] on the host}, shared by the budget's scaled copies: not configuration
        self._previous: dict[str, Any] = {}

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """``[(mode, cost)]`` this metric can run in, fastest first.

        ``"device"`` (the Lanczos basis on ``basis_device``, graphs
        cached as ``cache_graph`` says), ``"uncached_graph"`` (only with
        ``cache_graph=True``: each product re-runs its chunk) and ``"cpu_basis"`` (the
        basis in host memory; helps on an accelerator only). Each counts the basis
        (``max_iter`` vectors in float32, float64 for float64 models), about 8 work
        vectors (Lanczos, Hutchinson, the product's accumulator) and one chunk's
        double-backward graph; a cached graph of every chunk counts N samples.
        """
        on_cpu = self._basis_device is not None and torch.device(self._basis_device).type == "cpu"
        basis = self._basis_bytes
        device_basis: dict[str, Any] = {"host_extra_bytes": basis} if on_cpu else {"extra_bytes": basis}
        common: dict[str, Any] = {"hvp": True, "vectors": 8.0, "vector_itemsize": 4}
        modes = [("device", Cost(**common, probe_graph_samples=self._cache_graph is not False, **device_basis))]
        if self._cache_graph is not False:
            modes.append(("uncached_graph", Cost(**common, **device_basis)))
        if not on_cpu:
            modes.append(("cpu_basis", Cost(**common, host_extra_bytes=basis)))
        return modes

    def _basis_bytes(self, n: int, itemsize: float, n_samples: int) -> int:
        k = min(self.top_k, n)
        block = self._block(k)
        max_iter = max(min(self.max_iter or max(self.default_max_iter(k, 1), self.default_max_iter(k, block)), n), k)
        return int((max_iter + 2 * block) * n * max(4.0, itemsize))

    def _block(self, k: int, device: torch.device | None = None) -> int:
        """Products per Lanczos step; without a device (memory planning) the accelerator's."""
        if self.block_size:
            return self.block_size
        if device is not None and device.type == "cpu":
            return 1
        return min(k, 4) if k > 1 else 1

    def default_max_iter(self, k: int, block: int | None = None) -> int:
        """The most Lanczos products when ``max_iter`` is not given.

        ``max(6k, k + 55)`` for single vectors, ``max(4k, k + 40)`` for blocks. For k = 10
        that is 65: the MiniLM probe's top-10 takes 58 products to a relative residual of
        1e-2 from the default start (seed 42) and the bench Qwen2's 62 (the earlier 55 left
        the MiniLM's default run ``"partial"`` at 2.2e-2). The 52 that earlier default was set
        from came from seed 0 (the metrics' default before the run's seed became 42), and that
        run passed the residual test with a top-10 eigenvalue missed; so do seeds 0-3 at 51-53
        products (``bench/spectra_starts.py --sketch-seeds``). A cap, not a count: Lanczos
        stops when every pair passes.
        """
        block = self._block(k) if block is None else block
        return max(6 * k, k + 55) if block == 1 else max(4 * k, k + 40)

    def time_cost(self, units: UnitCosts) -> float:
        """One Hessian-vector product per Lanczos product and per Hutchinson probe, plus the blocks.

        ``blocks="layers"``: about one top-1 run (``bench/spectra.py``: the 21 blocks of its
        Qwen2 took 0.8-1.0 of ``HessianSpectrum(top_k=1)``; a model with more modules takes
        more); a list of modules: 12 whole-model products per block (a restricted product costs
        at most a whole one; a top-1 took about 11 on that Qwen2).
        """
        products = self.max_iter or self.default_max_iter(int(self.top_k), 1)
        if self.blocks == "layers":
            products += self.default_max_iter(1, 1) + self.hutchinson_samples
        elif self.blocks:
            products += 12 * len(self.blocks)
        return (products + self.hutchinson_samples) * units.hvp

    def min_probes(self) -> int:
        """The fewest Hutchinson probes the budget's scaling keeps (the configured count at most).

        :func:`~uma_callbacks.linalg.hutchinson.probes_needed` of the spread std(t_j) /
        |trace| measured at this metric's latest run (before any: the bound for a positive
        semi-definite Hessian, 18 probes): the count whose standard error is expected at a
        third of |trace|, so that a scaled trace is unlikely to pass |trace| / 2 and turn
        ``partial``. 0 when the trace is off.
        """
        if not self.hutchinson_samples:
            return 0
        return min(int(self.hutchinson_samples), probes_needed(self._measured.get("trace_spread")))

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[HessianSpectrum, dict[str, list[Any]]]:
        """Fit ``seconds``: fewer Hutchinson probes, then fewer Lanczos products, then a smaller ``top_k``.

        Hutchinson probes go down to :meth:`min_probes` (never below the count that makes a
        ``partial`` trace likely), the Lanczos products (``max_iter``) to ``top_k + 2``,
        then ``top_k`` itself to 1.
        """
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        scaled = scaling.metric
        k = int(scaled.top_k)
        default_iter = scaled.max_iter or scaled.default_max_iter(k, 1)
        room = seconds / units.hvp
        probes = scaled.hutchinson_samples
        scaling.set("hutchinson_samples", 0 if probes == 0 else max(self.min_probes(), min(probes, int(room - default_iter))))
        left = room - scaled.hutchinson_samples
        if left < default_iter:
            scaling.set("max_iter", max(k + 2, int(left)))
        if (scaled.max_iter or default_iter) > left and k > 1:
            new_k = max(1, int(left) - 2)
            scaling.set("top_k", new_k)
            scaling.set("max_iter", max(new_k + 2, min(default_iter, int(left))))
        return scaling.done()

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        planned = hasattr(self, "_memory_mode")
        mode = getattr(self, "_memory_mode", "device")
        cache_graph = False if mode == "uncached_graph" else self._cache_graph
        if cache_graph is None and planned:
            cache_graph = mode == "device"  # the plan priced every chunk's graph in this mode only
        basis_device = "cpu" if mode == "cpu_basis" else self._basis_device
        ctx.meta["memory_mode"] = mode
        n = ctx.n_total()
        hut = None
        setup = hessian_setup(
            ctx,
            "HessianSpectrum",
            cache_graph=cache_graph,
            # unplanned: every chunk's graph is kept when, measured on the first, it adds at
            # most a quarter of the Lanczos basis (re-running each chunk per product triples
            # the products' cost)
            graph_bytes_limit=lambda dim: self._basis_bytes(dim, 4.0, n) // 4,
        )
        op, params, dtype, device = setup.op, setup.params, setup.dtype, setup.device
        block = self._block(min(self.top_k, op.dim), device)
        history: list[list[float]] = []  # [matvecs, max absolute Ritz residual] per block step
        progress = LanczosProgress()  # the Ritz values so far, should the time limit stop Lanczos
        probes: list[float] = []  # the Hutchinson t_j taken so far
        blocks = _Blocks({m: op.restrict(names) for m, names in self._block_names(ctx.model, params).items()})
        ctx.keep_partial(lambda: self._kept(ctx, params, progress.result(), probes, op, block, history))
        lanczos_started = time.perf_counter()
        try:
            warm = self._previous_start(params, block, dtype, device)
            ctx.meta["lanczos_start"] = self.start if warm is not None or self.start != "previous" else "gradients"
            gradients = self.start == "gradients" or (self.start == "previous" and warm is None)
            sketch = op.gradient_sketch(block, self.seed) if gradients else warm
            vectors = self.return_eigenvectors or self.start == "previous"
            if block == 1:
                product = _rows_product(op, 1, dtype, device)
                lz = lanczos_top_k(
                    lambda v: product(v.reshape(1, -1))[0],
                    op.dim,
                    self.top_k,
                    max_iter=self.max_iter or self.default_max_iter(min(self.top_k, op.dim), 1),
                    tol=self.tol,
                    seed=self.seed,
                    dtype=dtype,
                    device=device,
                    basis_device=basis_device,
                    return_vectors=vectors,
                    start=sketch[0] if sketch is not None else None,
                    on_step=lambda m, res: history.append([m, float(res.max()) if res.numel() else math.nan]),
                    check_every=1,  # the Ritz values of an m x m tridiagonal cost nothing next to a product
                    product_is_scratch=True,  # the product's reused buffer becomes the work vector
                    progress=progress,
                )
            else:
                lz = block_lanczos_top_k(
                    _rows_product(op, block, dtype, device),
                    op.dim,
                    self.top_k,
                    block_size=block,
                    max_matvecs=self.max_iter or self.default_max_iter(min(self.top_k, op.dim), block),
                    tol=self.tol,
                    seed=self.seed,
                    dtype=dtype,
                    device=device,
                    basis_device=basis_device,
                    return_vectors=vectors,
                    rows=True,
                    start=sketch,
                    on_step=lambda m, res: history.append([m, float(res.max()) if res.numel() else math.nan]),
                    progress=progress,
                )
            lanczos_matvecs = op.matvecs
            ctx.meta["lanczos_seconds"] = time.perf_counter() - lanczos_started
            lz = self._remember(lz, params)
            done = lz  # Lanczos finished: a stop during Hutchinson keeps all of it
            keep = lambda: self._kept(ctx, params, done, probes, op, block, history, lanczos_matvecs, blocks)  # noqa: E731
            ctx.keep_partial(keep)
            if blocks.ops:
                started = time.perf_counter()
                self._block_spectra(blocks, sketch, dtype, device, basis_device)
                ctx.meta["blocks_seconds"] = time.perf_counter() - started
            if self.hutchinson_samples:
                hut = hutchinson_trace(
                    blocks.traced(op.matvec),
                    op.dim,
                    self.hutchinson_samples,
                    seed=self.seed + 1,
                    dtype=dtype,
                    device=device,
                    matmat=blocks.traced(op.matmat),
                    block_size=block,
                    done=probes,
                )
        finally:
            op.close()
        return self._assemble(ctx, params, lz, hut, op, block, history, lanczos_matvecs, blocks)

    def _block_names(self, model: torch.nn.Module, params: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """``{module: [parameter names]}`` of the configured blocks (see ``blocks``), in order.

        Raises:
            ValueError: a named module the model does not have (the closest listed), or one
                without trainable parameters.
        """
        if self.blocks is None:
            return {}
        if self.blocks == "layers":
            out: dict[str, list[str]] = {}
            for name in params:
                out.setdefault(module_of(name), []).append(name)
            return out
        modules = dict(model.named_modules())
        out = {}
        for module in self.blocks:
            if module not in modules:
                close = difflib.get_close_matches(module, [m for m in modules if m], n=3)
                raise ValueError(
                    f"HessianSpectrum.blocks must be \"layers\" or names of the model's modules; "
                    f"{module!r} is not one (closest: {close})"
                )
            names = [n for n in params if not module or n.startswith(module + ".")]
            if not names:
                raise ValueError(f"HessianSpectrum.blocks: the module {module!r} has no trainable parameters")
            out[module] = names
        return out

    def _previous_start(
        self, params: dict[str, torch.Tensor], block: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """``[block, P]`` start rows from the previous checkpoint (``start="previous"``); ``None`` without one.

        Row 0 is the sum of the previous top-k Ritz vectors; further rows (block Lanczos)
        are Gaussian from ``seed``.
        """
        kept = self._previous
        if self.start != "previous" or kept.get("names") != tuple(params):
            return None
        first = kept["vector"].to(device=device, dtype=dtype)
        if block == 1:
            return first[None]
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        rest = torch.randn(block - 1, first.numel(), generator=gen, dtype=dtype).to(device)
        return torch.cat([first[None], rest])

    def _remember(self, lz: LanczosResult, params: dict[str, torch.Tensor]) -> LanczosResult:
        """Keep the sum of the Ritz vectors for the next checkpoint (``start="previous"``); drop vectors not asked for."""
        if self.start != "previous" or lz.eigenvectors is None:
            return lz
        total = lz.eigenvectors.sum(dim=1)
        if bool(torch.isfinite(total).all()) and float(total.norm()) > 0:
            self._previous.clear()
            self._previous.update(names=tuple(params), vector=total.detach().to("cpu").clone())
        if not self.return_eigenvectors:
            lz.eigenvectors = None
        return lz

    def _block_spectra(
        self,
        blocks: _Blocks,
        sketch: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
        basis_device: str | None,
    ) -> None:
        """Top-1 Lanczos of every block's H_SS, into ``blocks.results`` as each finishes."""
        for module, blk in blocks.ops.items():
            start = blk.flat_slice(sketch[0]) if sketch is not None else None

            def product(v: torch.Tensor, blk: HessianBlock = blk) -> torch.Tensor:
                started = time.perf_counter()
                out = blk.matmat_rows(v.reshape(1, -1).to(blk.parent._dtype))[0]
                blk.parent.product_seconds += time.perf_counter() - started
                return out

            blocks.results[module] = lanczos_top_k(
                product,
                blk.dim,
                1,
                max_iter=min(blk.dim, self.max_iter or self.default_max_iter(1, 1)),
                tol=self.tol,
                seed=self.seed,
                dtype=dtype,
                device=device,
                basis_device=basis_device,
                start=start,
                check_every=1,  # the Ritz value of a top-1 costs nothing next to a product
            )

    def _kept(
        self,
        ctx: ComputeContext,
        params: dict[str, torch.Tensor],
        lz: LanczosResult | None,
        probes: list[float],
        op: HessianOperator,
        block: int,
        history: list[list[float]],
        lanczos_matvecs: int | None = None,
        blocks: _Blocks | None = None,
    ) -> MetricResult | None:
        """What a run stopped by its time limit finished (see the class docstring); ``None``: no Lanczos step.

        During Lanczos, ``lz`` is :meth:`LanczosProgress.result` (no vectors); during
        Hutchinson, the finished Lanczos result and the probes taken (a trace from two).
        """
        if lz is None:
            return None
        hut = None
        if len(probes) >= 2:
            samples = torch.tensor(probes, dtype=torch.float64)
            trace, stderr = mean_and_stderr(samples)
            hut = HutchinsonResult(trace, stderr, samples, len(probes), self.seed + 1)
            ctx.meta["hutchinson_samples_done"] = len(probes)
        matvecs = lz.matvecs if lanczos_matvecs is None else lanczos_matvecs
        return self._assemble(ctx, params, lz, hut, op, block, history, matvecs, blocks)

    def _assemble(
        self,
        ctx: ComputeContext,
        params: dict[str, torch.Tensor],
        lz: LanczosResult,
        hut: HutchinsonResult | None,
        op: HessianOperator,
        block: int,
        history: list[list[float]],
        lanczos_matvecs: int,
        blocks: _Blocks | None = None,
    ) -> MetricResult:
        """The result of a Lanczos run and a trace: scalars, arrays, vectors, meta, and its status."""
        eigenvalues = lz.eigenvalues.to(torch.float64).cpu()
        scalars = spectrum_scalars(eigenvalues.tolist())
        reasons = []
        if hut is not None:
            scalars["trace"] = hut.trace
            scalars["trace_stderr"] = hut.stderr
            spread = trace_spread(hut)
            ctx.meta["trace_spread"] = spread
            if not math.isnan(spread):
                self._measured["trace_spread"] = spread  # the next save's scaling keeps enough probes
            if trace_too_uncertain(hut.trace, hut.stderr):
                reasons.append(
                    f"the Hutchinson trace {hut.trace:.4g} has a standard error of {hut.stderr:.3g} > "
                    f"{TRACE_STDERR_SHARE:g} |trace| with {hut.matvecs} probes; about {probes_needed(spread)} "
                    "would bring it to a third (raise hutchinson_samples)"
                )
        result = MetricResult(name=self.name, scalars=scalars, arrays={"top_eigenvalues": eigenvalues.numpy()})
        if lz.eigenvectors is not None:
            for j in range(lz.eigenvectors.shape[1]):
                vec = _fix_sign(lz.eigenvectors[:, j])
                for name, piece in zip(params, split_flat(vec, list(params.values()))):
                    result.tensors[f"eigvec_{j}/{name}"] = (
                        piece.detach().to(params[name].dtype).cpu().contiguous()
                    )
        relative = relative_residuals(lz)
        ctx.meta.update(
            matvecs=op.matvecs,
            lanczos_matvecs=lanczos_matvecs,
            hutchinson_matvecs=op.matvecs - lanczos_matvecs,
            lanczos_converged=bool(lz.converged),
            lanczos_converged_count=_leading_within(relative, self.residual_tol),
            lanczos_residuals=lz.residuals.to(torch.float64).cpu().tolist(),
            lanczos_relative_residuals=relative.tolist(),
            lanczos_residual_tol=self.residual_tol,
            lanczos_block_size=block,
            lanczos_reorthogonalised=lz.reorthogonalised,
            lanczos_basis_rows_read=lz.basis_rows_read,
            lanczos_product_seconds=op.product_seconds,
            lanczos_start=ctx.meta.get("lanczos_start", self.start),
            lanczos_history=[
                [int(m), r / max(float(eigenvalues.abs().max()), 1e-300) if eigenvalues.numel() else math.nan]
                for m, r in history
            ],
            hvp_batched=op.batched,
            seeds={"lanczos": self.seed, "hutchinson": self.seed + 1},
            hvp_method="double_backward",
            cache_graph=op.cache_graph,
            n_params=op.dim,
        )
        if op.graph_bytes is not None:  # the caching was decided on the first chunk's graph
            ctx.meta["hvp_graph_bytes"] = op.graph_bytes
        if op.batch_error:
            ctx.meta["hvp_batch_error"] = op.batch_error
        if not within_tolerance(lz, self.residual_tol):
            reasons.insert(
                0,
                f"Lanczos stopped after {lanczos_matvecs} products with a relative residual of "
                f"{float(relative.max()):.3g} > residual_tol={self.residual_tol:g}; raise max_iter",
            )
        if blocks is not None and blocks.ops:
            reasons += self._block_scalars(ctx, result, blocks, hut)
        if reasons:
            result.status = "partial"
            result.meta["partial_reason"] = "; ".join(reasons)
        return result


    def _block_scalars(
        self, ctx: ComputeContext, result: MetricResult, blocks: _Blocks, hut: HutchinsonResult | None
    ) -> list[str]:
        """Each finished block's ``layers/<module>/...`` scalars and ``meta["blocks"]``; the partial reasons."""
        reasons = []
        info: dict[str, dict[str, Any]] = {}
        unconverged = []
        for module, blk in blocks.ops.items():
            entry: dict[str, Any] = {"n_params": blk.dim, "matvecs": blk.matvecs}
            lz = blocks.results.get(module)
            if lz is not None:
                relative = relative_residuals(lz)
                result.scalars[f"layers/{module}/top_eigenvalue"] = float(lz.eigenvalues[0]) if lz.eigenvalues.numel() else math.nan
                entry["relative_residual"] = float(relative.max()) if relative.numel() else math.nan
                entry["converged"] = bool(lz.converged)
                if not within_tolerance(lz, self.residual_tol):
                    unconverged.append(module)
            samples = blocks.probes.get(module, [])
            if hut is not None and len(samples) >= 2:
                trace, stderr = mean_and_stderr(torch.tensor(samples[: hut.matvecs], dtype=torch.float64))
                result.scalars[f"layers/{module}/trace"] = trace
                result.scalars[f"layers/{module}/trace_stderr"] = stderr
            info[module] = entry
        ctx.meta["blocks"] = info
        ctx.meta["block_matvecs"] = sum(blk.matvecs for blk in blocks.ops.values())
        missing = [m for m in blocks.ops if m not in blocks.results]
        if missing:
            reasons.append(f"{len(missing)} of {len(blocks.ops)} blocks not reached (first: {missing[0]})")
        if unconverged:
            reasons.append(
                f"{len(unconverged)} blocks' top eigenvalue above residual_tol={self.residual_tol:g} "
                f"(first: {unconverged[0]}); raise max_iter"
            )
        return reasons


@dataclass
class _Blocks:
    """The per-block operators (:meth:`HessianSpectrum._block_names`) and what each has finished.

    ``results``: top-1 Lanczos of H_SS per module; ``probes``: the t_j,S of every
    Hutchinson probe taken so far (:meth:`traced`).
    """

    ops: dict[str, HessianBlock]
    results: dict[str, LanczosResult] = field(default_factory=dict)
    probes: dict[str, list[float]] = field(default_factory=dict)

    def traced(self, product: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``product`` (``z [P] or Z [P, b] -> H Z``), also adding each block's sum_{i in S} z_i (H z)_i to ``probes``."""
        if not self.ops:
            return product
        parent = next(iter(self.ops.values())).parent
        sizes = [p.numel() for p in parent.params]

        def traced(z: torch.Tensor) -> torch.Tensor:
            hz = product(z)
            terms = (z.to(torch.float64) * hz.to(torch.float64)).reshape(z.shape[0], -1)  # [P, b]
            per_param = torch.stack([part.sum(0) for part in torch.split(terms, sizes)]).cpu()  # [params, b]
            for module, blk in self.ops.items():
                self.probes.setdefault(module, []).extend(per_param[blk.positions].sum(0).tolist())
            return hz

        return traced


def check_blocks(blocks: Any) -> str | list[str] | None:
    """``HessianSpectrum.blocks`` validated: ``None``, ``"layers"`` or a list of distinct module names.

    Args:
        blocks: the argument.

    Returns:
        ``None``, ``"layers"`` or a list of strings.

    Raises:
        ValueError: anything else (the field and the allowed values named).
    """
    allowed = '"layers", a non-empty list of distinct module names (model.named_modules()) or None'
    if blocks is None or blocks == "layers":
        return blocks
    if isinstance(blocks, str) or not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError(f"HessianSpectrum.blocks must be {allowed}; got {blocks!r}")
    if not all(isinstance(m, str) for m in blocks) or len(set(blocks)) != len(blocks) or len(blocks) > validate.MAX_DRAWS:
        raise ValueError(f"HessianSpectrum.blocks must be {allowed}; got {list(blocks)!r}")
    return list(blocks)


def _leading_within(relative: torch.Tensor, tol: float) -> int:
    """How many leading Ritz pairs (lambda_1 first) have a relative residual within ``tol``."""
    count = 0
    for value in relative.tolist():
        if value > tol:
            break
        count += 1
    return count


def _rows_product(
    op: HessianOperator, block: int, dtype: torch.dtype, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V [b, P] -> H V [b, P]`` for block Lanczos.

    The product is written into one ``[block, P]`` buffer reused by every step when the
    basis has the parameters' dtype (no fresh allocation per product; Lanczos consumes each
    result before the next call).
    """
    buffer = torch.empty(block, op.dim, dtype=dtype, device=device) if dtype == op._dtype else None

    def product(rows: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        if buffer is None:
            out = op.matmat_rows(rows.to(op._dtype))
        else:
            out = op.matmat_rows(rows, out=buffer[: rows.shape[0]])
        op.product_seconds += time.perf_counter() - started
        return out

    return product


def spectrum_scalars(eigenvalues: Sequence[float]) -> dict[str, float]:
    """``top_eigenvalue``, ``top_k_effective_rank`` and ``top_k_condition_number`` of a top-k spectrum.

    Both are over the given top-k eigenvalues only (see :class:`HessianSpectrum`).

    Args:
        eigenvalues: lambda_1 >= ... >= lambda_k (descending; any sign).

    Returns:
        The scalars defined in :class:`HessianSpectrum`; NaN for an empty or all-zero list.

    Example:
        >>> s = spectrum_scalars([4.0, 2.0, 2.0])
        >>> round(s["top_k_effective_rank"], 6), s["top_k_condition_number"]
        (2.828427, 2.0)
    """
    lam = np.asarray(list(eigenvalues), dtype=np.float64)
    if lam.size == 0:
        return {"top_eigenvalue": math.nan, "top_k_effective_rank": math.nan, "top_k_condition_number": math.nan}
    mags = np.abs(lam)
    total = mags.sum()
    if total > 0:
        p = mags[mags > 0] / total
        effective_rank = float(np.exp(-(p * np.log(p)).sum()))
    else:
        effective_rank = math.nan
    last = lam[-1]
    condition = float(lam[0] / last) if last > 0 else math.inf
    return {"top_eigenvalue": float(lam[0]), "top_k_effective_rank": effective_rank, "top_k_condition_number": condition}


def eigenvector_directions(result: MetricResult, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """The top ``count`` Hessian eigenvectors of a result as ``{param name: tensor}`` dicts.

    Args:
        result: a ``HessianSpectrum(return_eigenvectors=True)`` result.
        count: how many (1 or 2 for a landscape).

    Returns:
        ``count`` dicts, the j-th holding ``result.tensors["eigvec_<j>/<name>"]``.

    Raises:
        ValueError: the result holds fewer than ``count`` eigenvectors.
    """
    out: list[dict[str, torch.Tensor]] = []
    for j in range(count):
        prefix = f"eigvec_{j}/"
        found = {k[len(prefix) :]: v for k, v in result.tensors.items() if k.startswith(prefix)}
        if not found:
            raise ValueError(
                f"eigenvector_directions: the result has no {prefix}* tensors; "
                "compute it with HessianSpectrum(return_eigenvectors=True, top_k>=count)"
            )
        out.append(found)
    return out


def _fix_sign(vector: torch.Tensor) -> torch.Tensor:
    """The eigenvector with its largest-magnitude entry positive (a deterministic sign)."""
    return vector if vector[vector.abs().argmax()] >= 0 else -vector
