r"""Fisher information: diagonal, trace per parameter and layer, top eigenvalues, importance masks."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.core.sharding import (
    aligned_chunks,
    is_sharded,
    local_entries,
    sharded_start_vector,
    unwrap,
)
from uma_callbacks.linalg.chunk_grads import chunk_gradients
from uma_callbacks.linalg.fisher_products import (
    METHODS,
    FisherSums,
    accumulate_fisher,
    fisher_matvec,
    group_draws,
    parameter_groups,
    sample_mc_labels,
)
from uma_callbacks.linalg.lanczos import relative_residuals
from uma_callbacks.linalg.layer_grads import hook_plan
from uma_callbacks.linalg.linear_factors import linear_param_map
from uma_callbacks.linalg.operators import MatvecOperator, top_eigenpairs
from uma_callbacks.linalg.sharded_plan import check_sharded_plan
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, check_choice, module_of

logger = logging.getLogger(__name__)

KINDS = ("empirical", "mc")
#: A Lanczos spectrum whose largest relative residual exceeds this is reported ``partial``.
RESIDUAL_TOL = 1e-2
ACCUMULATE_DTYPES = ("float32", "float64")
#: Lanczos keeps its basis in float64 for float64 models or while it takes at most this many bytes,
#: else float32 (enough for 1e-4 relative eigenvalues; the basis dominates Lanczos's time).
LANCZOS_FLOAT64_BYTES = 1 << 25
#: Parameter groups of the ``"grouped"`` memory mode (per-sample gradients of one group at a time).
PARAMETER_GROUPS = 4
#: The spectrum comes from the exact Gram matrix G G^T / R up to this many rows R (float64
#: [R, R]: 128 MiB at 4096), from Lanczos above it.
GRAM_MAX_ROWS = 4096
#: What a run holds outside its tensors, planned as fixed bytes: the math libraries' buffers
#: and the allocator's own (the measured peak was 0 to 5.5 MiB over the tensors' peak on
#: GPT-2 2-layer, 30M and 124M, whose tensors the plan counts to within 0.1%).
WORKSPACE_BYTES = 8 << 20


class FisherInformation(Metric):
    r"""Empirical or Monte-Carlo Fisher: diagonal, traces, top eigenvalues.

    N probe samples, per-sample gradients g_i [P] of the per-sample losses l_i.

    - ``kind="empirical"``: F = (1/N) sum_i g_i g_i^T with the probe's own labels.
    - ``kind="mc"`` ("true" Fisher): the same over N x M rows, the gradients of the losses at
      labels drawn from the model's own predictive distribution (per token for causal LMs,
      per example for classification), M = ``mc_samples`` draws per sample. Its expectation
      over the draws is the GGN; for classification E[F] = (1/N) sum_i J_i^T (diag(p_i) -
      p_i p_i^T) J_i. Needs HF-style batches (dicts with ``labels``) and outputs with
      ``.logits``; the loss (the user's ``loss_fn`` if given) is evaluated at the drawn
      labels, so it must be the model's negative log-likelihood. Draws are seeded from
      ``seed`` and each sample's input bytes (independent of chunking and sharding).

    Outputs (R = N, or N x M for MC):

    - ``tensors``: ``{param name: diag [*shape]}`` with diag = (1/R) sum_i g_i^2, on CPU, when
      ``keep_diagonal``;
    - ``trace`` = (1/R) sum_i ||g_i||^2; ``trace_stderr`` = std_i(||g_i||^2) / sqrt(R) (two-pass);
      ``params/<p>/trace``, ``layers/<module>/trace`` (sum over the module's own parameters);
    - ``top_eigenvalues`` [k] (descending): F = G^T G / R has rank <= R and its non-zero
      eigenvalues are exactly those of the R x R Gram matrix G G^T / R, formed in the same
      pass (``meta["spectrum_method"] = "gram"``; all R eigenvalues in
      ``arrays["gram_eigenvalues"]``; the blocks between chunks from the chunks kept within
      ``cache_bytes``, the others recomputed a block at a time,
      ``meta["gram_chunks_recomputed"]``); on several ranks, above :data:`GRAM_MAX_ROWS`
      rows, with the linear factors, or in the ``"streamed"`` memory modes with several
      chunks, by Lanczos with full reorthogonalisation on the matrix-free F v = (1/R) sum_i g_i (g_i^T v) (each product
      all-reduced over ranks; ``"lanczos"``). On a sharded (FSDP2) model each Lanczos
      vector is the rank's piece (its shards' entries, ``meta["lanczos_vector_entries"]``),
      inner products are summed over ranks and the product gathers one parameter's v at a
      time and reduce-scatters its result (:func:`~uma_callbacks.linalg.fisher_products.fisher_matvec`),
      so the basis per rank shrinks with the ranks;
      ``top_k_effective_rank`` = exp(-sum_j q_j log q_j), q = lambda / sum(lambda), and
      ``top_k_condition_number`` = lambda_1 / lambda_k, both over the computed top-k only
      (not the whole spectrum of F; journals before these names call them
      ``effective_rank`` and ``condition_number``). F has rank <= R: k is capped at R
      (``meta["top_k_capped"]``, a warning);
    - with ``top_percent``: ``top_percent_mass`` (share of the trace held by the top-p%
      entries of the diagonal) and ``layers/<module>/top_percent_fraction`` (share of the
      module's entries in that mask; see :func:`top_percent_mask`).

    Handed to later metrics of the same save that ask for them (``ctx.results.requested``;
    in ``result.provided``, never journalled): ``"diagonal"`` (``{param name: diag}``, formed
    then even without ``keep_diagonal``) and ``"top_eigenvector"`` (``{param name: v_1
    [*shape]}``, the unit eigenvector of F's largest eigenvalue over all trainable
    parameters, in the parameters' dtype, its sign fixed so that its largest entry is
    positive). From the Gram spectrum v_1 = G^T u_1 / ||G^T u_1|| with u_1 the top
    eigenvector of G G^T (one pass over the kept, or recomputed, chunks' gradients); from
    Lanczos the first Ritz vector (Lanczos then forms its k Ritz vectors, k x P entries,
    before the first is kept). Not formed on a sharded model or without a spectrum
    (``top_k=None``): ``meta["not_provided"]`` says why.

    Per-sample gradients: ``method="hooks"`` (one ordinary backward with per-layer rules
    for Linear, GPT-2 Conv1D, Embedding, LayerNorm and HF RMSNorm, ``vmap`` for the other
    parameters; see :mod:`~uma_callbacks.linalg.layer_grads`), ``"linear"`` (per-layer
    factors, models made of ``nn.Linear`` only), ``"vmap"`` (``torch.func``, any model) or
    ``"auto"`` (hooks); ``meta["per_sample_method"]`` says which ran. Without
    ``keep_diagonal``/``top_percent`` the diagonal is not formed (the traces come from
    per-sample norms, by ghost kernels where cheaper). Products reuse the chunks' gradients
    when they fit ``cache_bytes``, else recompute them chunk by chunk per product
    (``meta["cached"]``). The chunks' sums are added in float64 (Kahan-compensated float32
    on a device without float64) and returned in ``accumulate_dtype``.

    Args:
        kind: ``"empirical"`` or ``"mc"``.
        top_k: eigenvalues wanted (>= 1), or ``None`` for no spectrum.
        mc_samples: label draws per sample for ``kind="mc"``.
        seed: seeds the MC draws and the Lanczos start vector.
        accumulate_dtype: ``"float32"`` or ``"float64"``.
        keep_diagonal: return the diagonal in ``result.tensors``.
        top_percent: in (0, 100]: importance-mask scalars for the top-p% entries.
        method: ``"auto"``, ``"hooks"``, ``"vmap"`` or ``"linear"``.
        cache_bytes: the most bytes of per-sample gradients kept for the products (a
            memory knob: not part of the configuration).
        lanczos_tol: relative residual tolerance of the Ritz values.
        max_matvecs: the most Lanczos products (default ``max(3k, k + 30)``).
        chunk_size: samples per chunk.
        timeout_seconds: stop between chunks past this time.

    Raises:
        ValueError: a field out of range or not among its allowed values (named).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = {"x": torch.randn(6, 3), "y": torch.randn(6, 2)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)
        >>> r = FisherInformation(top_k=2).compute(model, [batch], loss)
        >>> r.arrays["top_eigenvalues"].shape, r.meta["per_sample_method"], r.meta["spectrum_method"]
        ((2,), 'hooks', 'gram')
    """

    name = "fisher"
    needs_eager_attention = True
    supports_sharded = True
    cost = Cost(per_sample_grads=True, param_copies=2.0)
    #: one chunk holds its forward graph and every layer's output gradients: chunks of at
    #: most 512 tokens keep that near a quarter of a 16 x 128-token training batch's peak
    #: while the products stay large enough to run at speed (bench/per_sample.py)
    default_chunk_tokens = 512

    def __init__(
        self,
        kind: str = "empirical",
        top_k: int | None = 10,
        *,
        mc_samples: int = 1,
        seed: int = seeds.DEFAULT_SEED,
        accumulate_dtype: str = "float32",
        keep_diagonal: bool = False,
        top_percent: float | None = None,
        method: str = "auto",
        cache_bytes: int = 1 << 30,
        lanczos_tol: float = 1e-6,
        max_matvecs: int | None = None,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        check_choice("FisherInformation.kind", kind, KINDS)
        validate.check_int("FisherInformation.top_k", top_k, 1, validate.MAX_TOP_K, allow_none=True)
        validate.check_int("FisherInformation.mc_samples", mc_samples, 1, validate.MAX_DRAWS)
        validate.check_seed("FisherInformation.seed", seed)
        check_choice("FisherInformation.accumulate_dtype", accumulate_dtype, ACCUMULATE_DTYPES)
        check_choice("FisherInformation.method", method, METHODS)
        if top_percent is not None:
            check_percent("FisherInformation.top_percent", top_percent)
        validate.check_int("FisherInformation.cache_bytes", cache_bytes, 0, 2**60)
        validate.check_number("FisherInformation.lanczos_tol", lanczos_tol, 0, validate.MAX_TOLERANCE, lo_open=True)
        validate.check_int("FisherInformation.max_matvecs", max_matvecs, 1, validate.MAX_ITERATIONS, allow_none=True)
        self.kind = kind
        self.top_k = top_k
        self.mc_samples = mc_samples
        self.seed = seed
        self.accumulate_dtype = accumulate_dtype
        self.keep_diagonal = bool(keep_diagonal)
        self.top_percent = None if top_percent is None else float(top_percent)
        self.method = method
        self._cache_bytes = cache_bytes
        self.lanczos_tol = float(lanczos_tol)
        self.max_matvecs = max_matvecs

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """``[(mode, cost)]`` this metric can run in, fastest first.

        ``"cached"`` (every row's gradient kept for the Lanczos products,
        when they fit ``cache_bytes``), ``"streamed"`` (recomputed chunk by chunk per
        product), ``"streamed_cpu_basis"`` (the Lanczos basis in host memory; helps on an
        accelerator only). Each counts one chunk's per-sample gradients (on the hooks path
        one layer's [B, *shape] at a time: the largest trainable tensor per sample; vmap
        and linear factors: P) and, with a spectrum on the hooks or linear path, the
        factors' phase (``Cost.layer_factors``: the per-layer factors F kept past the
        backward, measured by the planner, and the largest tensor's per-sample gradient
        formed from them; on GPT-2 124M F is 221 MiB a sample, and F + 147 MiB is the
        measured per-sample peak), and the Lanczos basis: ``max_iter`` vectors in the
        Lanczos dtype plus 4 of work (and 2 in the parameters' dtype).
        When the spectrum comes from the Gram matrix (one process, N x mc_samples <=
        :data:`GRAM_MAX_ROWS`), ``"cached"`` counts no Lanczos basis: a run of one chunk
        holds nothing more, and one of several keeps the chunks' factors for the blocks
        between chunks, at most ``cache_bytes`` of them, plus one chunk's while the next
        is recomputed (``Cost.kept_chunks``; see
        :func:`~uma_callbacks.linalg.fisher_products.accumulate_fisher`).
        Each counts :data:`WORKSPACE_BYTES` for what is held outside tensors.
        The diagonal's accumulators (:meth:`_diagonal_bytes`) count when ``keep_diagonal``
        or ``top_percent`` asks for it, else only when a later metric of the save asks for
        ``"diagonal"``; the top eigenvector's vectors (:meth:`_eigenvector_bytes`) only
        when one asks for ``"top_eigenvector"`` (``Cost.requested_bytes``).
        Last, ``"grouped"``: per-sample gradients of one parameter group at a time
        (:data:`PARAMETER_GROUPS` groups of about equal size, so about P / 4 per sample;
        a tensor larger than that stays whole), the same sums; each Lanczos product then
        recomputes every group twice per chunk (u_i = sum_G g_{i,G}^T v_G, then
        sum_i u_i g_{i,G}), so it is the slowest.

        On a sharded (FSDP2) model the Lanczos vectors are the rank's pieces: each extra-bytes
        function carries ``on_shard(n, n_held, itemsize, N)`` (read by the planner,
        :func:`~uma_callbacks.engine.budget.planned_bytes`), which prices the basis and its
        work vectors on the ``n_held`` local entries and the cached per-sample gradients
        (the rank's own samples, full-size) on ``n``.
        """
        diagonal = self.keep_diagonal or self.top_percent is not None
        requested: tuple[tuple[str, Any], ...] = (("top_eigenvector", self._eigenvector_bytes),)
        if not diagonal:
            requested = (("diagonal", self._diagonal_bytes), *requested)
        base: dict[str, Any] = {
            "per_sample_grads": True,
            "fixed_bytes": WORKSPACE_BYTES,
            "per_sample_grad_by_tensor": self.method in ("auto", "hooks"),
            # the chunks' gradients are kept as factors past the backward (kept for the products
            # or the Gram, or recomputed for each product); without a spectrum they are reduced
            # during the backward
            "layer_factors": self.method in ("auto", "hooks", "linear") and self.top_k is not None,
            "extra_bytes": self._diagonal_bytes if diagonal else None,
            "requested_bytes": requested,
        }  # fmt: skip

        def rows(n: int, itemsize: float, n_samples: int) -> int:
            # nothing is kept without a spectrum (traces and the diagonal need no products)
            kept = n_samples * self.mc_samples * n * itemsize if self.top_k is not None else 0
            return int(kept if kept <= self._cache_bytes else 0)

        def basis_on_shard(n: int, held: int, itemsize: float, n_samples: int) -> int:
            return self._lanczos_bytes(n, itemsize, n_samples, held)

        def work_on_shard(n: int, held: int, itemsize: float, n_samples: int) -> int:
            return self._lanczos_work_bytes(n, itemsize, n_samples, held)

        def streamed_on_shard(n: int, held: int, itemsize: float, n_samples: int) -> int:
            return basis_on_shard(n, held, itemsize, n_samples) + work_on_shard(n, held, itemsize, n_samples)

        def cached_on_shard(n: int, held: int, itemsize: float, n_samples: int) -> int:
            return rows(n, itemsize, n_samples) + streamed_on_shard(n, held, itemsize, n_samples)

        def basis(n: int, itemsize: float, n_samples: int) -> int:
            return self._lanczos_bytes(n, itemsize, n_samples)

        def work(n: int, itemsize: float, n_samples: int) -> int:
            return self._lanczos_work_bytes(n, itemsize, n_samples)

        def cached(n: int, itemsize: float, n_samples: int) -> int:
            if self._gram_path(n_samples):
                return 0  # all N eigenvalues from the Gram matrix: no Lanczos basis (kept chunks: gram_chunks)
            return rows(n, itemsize, n_samples) + basis(n, itemsize, n_samples) + work(n, itemsize, n_samples)

        def gram_chunks(n: int, itemsize: float, n_samples: int) -> int | None:
            # the Gram's blocks between chunks: the chunks' gradients kept, at most cache_bytes
            # (and a block of one chunk at least); Lanczos keeps its rows in extra_bytes
            return self._cache_bytes if self._gram_path(n_samples) else None

        def streamed(n: int, itemsize: float, n_samples: int) -> int:
            return basis(n, itemsize, n_samples) + work(n, itemsize, n_samples)

        pairs = ((basis, basis_on_shard), (work, work_on_shard), (cached, cached_on_shard), (streamed, streamed_on_shard))
        for fn, on_shard in pairs:
            fn.on_shard = on_shard  # type: ignore[attr-defined]
        modes = [
            ("cached", Cost(**{**base, "extra_bytes": _summed_bytes(base["extra_bytes"], cached)}, kept_chunks=gram_chunks)),
            ("streamed", Cost(**{**base, "extra_bytes": _summed_bytes(base["extra_bytes"], streamed)})),
        ]
        if self.top_k is not None:
            cpu_basis = {**base, "extra_bytes": _summed_bytes(base["extra_bytes"], work), "host_extra_bytes": basis}
            modes.append(("streamed_cpu_basis", Cost(**cpu_basis)))
        grouped: dict[str, Any] = {
            **base, "per_sample_grad_fraction": 1.0 / PARAMETER_GROUPS, "per_sample_grad_by_tensor": False,
            "layer_factors": False, "extra_bytes": _summed_bytes(base["extra_bytes"], streamed),
        }  # fmt: skip
        modes.append(("grouped", Cost(**grouped)))
        return modes

    def _diagonal_bytes(self, n: int, itemsize: float, n_samples: int) -> int:
        """Bytes of the diagonal, the larger of what the pass and what follows it hold.

        During the pass its float64 running sums (8 bytes an entry, as a float32 sum and its
        Kahan compensation on a device without float64); after it, the summed and the
        divided diagonal in the accumulation dtype, and with ``top_percent`` the mask's
        float64 copy of the diagonal, its [n] bool mask and the top-k values and indices.
        """
        acc = max(8 if self.accumulate_dtype == "float64" else 4, int(itemsize))
        after = 2 * acc * n
        if self.top_percent is not None:
            k = math.ceil(n * self.top_percent / 100)
            after += 9 * n + 16 * k
        return int(max(8 * n, after))

    def _eigenvector_bytes(self, n: int, itemsize: float, n_samples: int) -> int:
        """Bytes of the top eigenvector handed on (``"top_eigenvector"`` asked).

        From the Gram, G^T u_1 summed a chunk at a time (the sum and one chunk's term) and
        its unit copy: 3 vectors in the parameters' dtype. From Lanczos, its k Ritz vectors
        and the first one's copy in the Lanczos dtype, and the unit copy (see :meth:`_spectrum`).
        """
        if self.top_k is None:
            return 0
        if self._gram_path(n_samples):
            return int(3 * n * itemsize)
        max_iter, size = self._lanczos_shape(n, itemsize, n_samples)
        k = min(self.top_k, max(1, n_samples * self.mc_samples), n, max_iter)
        return int((k + 1) * n * size + n * itemsize)

    def _gram_path(self, n_samples: int) -> bool:
        """Whether the spectrum comes from the Gram matrix, as :meth:`_compute` decides.

        It does for a spectrum asked, one process, at most :data:`GRAM_MAX_ROWS` rows, on a
        path whose chunks give their Gram blocks (not the linear factors: Lanczos there).
        """
        if self.top_k is None or n_samples * self.mc_samples > GRAM_MAX_ROWS or self.method == "linear":
            return False
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)

    def _lanczos_shape(self, n: int, itemsize: float, n_samples: int) -> tuple[int, int]:
        """``(max_iter, bytes per entry)`` of the Lanczos basis (as :meth:`_spectrum` picks them)."""
        if self.top_k is None:
            return 0, 0
        k = min(self.top_k, max(1, n_samples * self.mc_samples), n)
        max_iter = max(min(self.max_matvecs or max(3 * k, k + 30), n), k)
        wide = itemsize >= 8 or n * 8 * (max_iter + 1) <= LANCZOS_FLOAT64_BYTES
        return max_iter, 8 if wide else 4

    def _lanczos_bytes(self, n: int, itemsize: float, n_samples: int, held: int | None = None) -> int:
        """The bytes of the Lanczos basis: ``max_iter`` vectors of ``held`` entries.

        ``held`` is the rank's pieces on a sharded model (default ``n``); the vectors' count
        and dtype are chosen from the full ``n``.
        """
        max_iter, size = self._lanczos_shape(n, itemsize, n_samples)
        return max_iter * (n if held is None else held) * size

    def _lanczos_work_bytes(self, n: int, itemsize: float, n_samples: int, held: int | None = None) -> int:
        max_iter, size = self._lanczos_shape(n, itemsize, n_samples)
        entries = n if held is None else held
        # v, w, the product's float result and its scaled copy; the cast of v and the accumulator
        return int(4 * entries * size + 2 * entries * itemsize) if max_iter else 0

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        ctx.meta["memory_mode"] = getattr(self, "_memory_mode", "cached")
        mode = getattr(self, "_memory_mode", "cached")
        # the chunks' gradients are kept only for what needs them again: Lanczos products, or
        # the Gram blocks between chunks; traces and the diagonal are done in one pass
        cache = self._cache_bytes if mode.startswith("cached") and self.top_k is not None else 0
        groups = PARAMETER_GROUPS if mode == "grouped" else None
        want_gram = (
            self.top_k is not None
            and ctx.collective.world_size == 1
            and ctx.n_local * self.mc_samples <= GRAM_MAX_ROWS
        )
        stats = gather_fisher(
            ctx,
            self.kind,
            self.seed,
            self.mc_samples,
            self.method,
            self.accumulate_dtype,
            cache,
            groups=groups,
            want_diag=self.keep_diagonal or self.top_percent is not None or "diagonal" in ctx.results.requested,
            want_gram=want_gram,
            # the cached mode's plan counts the Gram's kept chunks (Cost.kept_chunks), never a
            # Lanczos basis: the blocks the cache cannot keep are recomputed instead
            fill_gram=mode.startswith("cached"),
        )
        scalars = trace_scalars(stats)
        arrays: dict[str, np.ndarray] = {}
        provided: dict[str, Any] = {}
        if self.top_k is not None:
            if stats.local.gram is not None:
                eig = self._gram_spectrum(ctx, stats, arrays, provided)
            else:
                eig = self._spectrum(ctx, stats, provided)
            arrays["top_eigenvalues"] = eig
            scalars.update(spectrum_scalars(eig))
        diag = {n: d / stats.rows for n, d in stats.diag_sum.items()}
        if self.top_percent is not None:
            if ctx.meta.get("sharded"):
                raise NotImplementedError("FisherInformation.top_percent on a sharded (FSDP) model is not supported yet")
            scalars.update(mask_scalars(diag, top_percent_mask(diag, self.top_percent)))
        tensors = {n: d.detach().cpu() for n, d in diag.items()} if self.keep_diagonal else {}
        self._hand_on(ctx, diag, provided)
        result = MetricResult(name=self.name, scalars=scalars, arrays=arrays, tensors=tensors, provided=provided)
        worst = max(ctx.meta.get("lanczos_relative_residuals") or [0.0])
        if worst > RESIDUAL_TOL:  # the Gram spectrum is exact; a Lanczos one may fall short
            result.status = "partial"
            ctx.meta["partial_reason"] = f"Lanczos relative residual {worst:.3g} > {RESIDUAL_TOL:g}"
        return result

    def _hand_on(self, ctx: ComputeContext, diag: Mapping[str, torch.Tensor], provided: dict[str, Any]) -> None:
        """Put the diagonal in ``provided`` when a later metric asked for it; say why an asked output is not there."""
        requested = ctx.results.requested
        missing: dict[str, str] = {}
        if "diagonal" in requested:
            if ctx.meta.get("sharded"):
                missing["diagonal"] = "fisher on a sharded (FSDP) model holds each rank's shard of the diagonal only"
            else:
                provided["diagonal"] = dict(diag)
        if "top_eigenvector" in requested and "top_eigenvector" not in provided:
            missing["top_eigenvector"] = (
                "fisher ran with top_k=None (no spectrum)" if self.top_k is None
                else "fisher on a sharded (FSDP) model holds each rank's piece of the eigenvector only"
                if ctx.meta.get("sharded") else "fisher's top eigenvalue is not positive (F = 0 on the probe)"
            )  # fmt: skip
        if missing:
            ctx.meta["not_provided"] = missing

    def _gram_spectrum(
        self, ctx: ComputeContext, stats: GlobalFisher, arrays: dict[str, np.ndarray], provided: dict[str, Any]
    ) -> np.ndarray:
        """The top-k of all R eigenvalues of G G^T / R (float64 ``eigh``, exact); v_1 into ``provided`` when asked."""
        top_k = self.top_k
        assert top_k is not None and stats.local.gram is not None  # _compute calls this only then
        gram = stats.local.gram.double().cpu()
        sym = (gram + gram.T) / (2 * stats.rows)
        if "top_eigenvector" in ctx.results.requested:
            values, vectors = torch.linalg.eigh(sym)
            every = values.flip(0)
            if float(every[0]) > 0:
                rows = _rows_combination(ctx, stats.local, vectors[:, -1])
                provided["top_eigenvector"] = _unit_with_sign(rows, ctx.trainable_params())
        else:
            every = torch.linalg.eigvalsh(sym).flip(0)
        k = min(top_k, stats.rows)
        if k < top_k:
            ctx.meta["top_k_capped"] = f"top_k={top_k} capped at {k}: F has rank <= {stats.rows} rows"
            logger.warning("FisherInformation: %s", ctx.meta["top_k_capped"])
        arrays["gram_eigenvalues"] = every.numpy()
        ctx.meta.update(spectrum_method="gram", matvecs=0, top_k=k)
        return every[:k].numpy()

    def _spectrum(self, ctx: ComputeContext, stats: GlobalFisher, provided: dict[str, Any]) -> np.ndarray:
        params = ctx.trainable_params()
        dim = sum(p.numel() for p in params.values())
        top_k = self.top_k
        assert top_k is not None  # _compute calls this only with a spectrum asked for
        k = min(top_k, stats.rows, dim)
        if k < top_k:
            ctx.meta["top_k_capped"] = f"top_k={top_k} capped at {k}: F has rank <= {stats.rows} rows"
            logger.warning("FisherInformation: %s", ctx.meta["top_k_capped"])
        max_iter = self.max_matvecs or max(3 * k, k + 30)
        wide = any(p.dtype == torch.float64 for p in params.values())
        dtype = torch.float64 if wide or dim * 8 * (max_iter + 1) <= LANCZOS_FLOAT64_BYTES else torch.float32
        sharded = bool(ctx.meta.get("sharded"))
        matvec = fisher_matvec(
            stats.local,
            ctx.model,
            ctx.loss_fn,
            params,
            stats.rows,
            ctx.collective.sum_,
            collective=ctx.collective if sharded else None,
        )
        device = next(iter(params.values())).device
        # sharded (FSDP2): every Lanczos vector is this rank's piece (its shards' entries),
        # inner products summed over ranks, the start vector drawn per full tensor and sliced
        entries = local_entries(params) if sharded else dim
        options: dict[str, Any] = {}
        if sharded:
            options = {
                "reduce_sum": _summed(ctx.collective),
                "total_dim": dim,
                "start": sharded_start_vector(params, self.seed, dtype, device),
            }
        counted = {"matvecs": 0}

        def timed_matvec(v: torch.Tensor) -> torch.Tensor:
            out = matvec(v)
            counted["matvecs"] += 1
            ctx.check_time(matvecs=counted["matvecs"])
            return out

        basis_device = "cpu" if getattr(self, "_memory_mode", "").endswith("cpu_basis") else None
        operator = MatvecOperator(timed_matvec, entries, dtype, torch.device(device))
        vector = "top_eigenvector" in ctx.results.requested and not sharded
        result = top_eigenpairs(
            operator, k, max_iter=max_iter, tol=self.lanczos_tol, seed=self.seed, basis_device=basis_device,
            return_vectors=vector, **options,
        )  # fmt: skip
        if vector and result.eigenvectors is not None and float(result.eigenvalues[0]) > 0:
            first = result.eigenvectors[:, 0].clone()
            result.eigenvectors = None  # the other k - 1 Ritz vectors are not kept
            pieces = torch.split(first, [p.numel() for p in params.values()])
            named = {n: piece.view(p.shape) for (n, p), piece in zip(params.items(), pieces)}
            provided["top_eigenvector"] = _unit_with_sign(named, params)
        relative = relative_residuals(result)
        ctx.meta.update(
            spectrum_method="lanczos",
            lanczos_vector_entries=entries,
            matvecs=result.matvecs,
            lanczos_relative_residuals=relative.tolist(),
            lanczos_converged=result.converged,
            lanczos_dtype=str(dtype).replace("torch.", ""),
            top_k=int(result.eigenvalues.numel()),
        )
        return result.eigenvalues.double().cpu().numpy()


def _summed_bytes(*fns: Callable[[int, float, int], int] | None) -> Callable[[int, float, int], int]:
    """``(n, itemsize, N) -> the sum of fns' bytes`` (``None`` ones left out); keeps the last one's ``on_shard``."""
    parts = [f for f in fns if f is not None]

    def total(n: int, itemsize: float, n_samples: int) -> int:
        return sum(f(n, itemsize, n_samples) for f in parts)

    on_shard = getattr(parts[-1], "on_shard", None) if parts else None
    if on_shard is not None:
        first = parts[:-1]

        def total_on_shard(n: int, held: int, itemsize: float, n_samples: int) -> int:
            return sum(f(n, itemsize, n_samples) for f in first) + on_shard(n, held, itemsize, n_samples)

        total.on_shard = total_on_shard  # type: ignore[attr-defined]
    return total


def _rows_combination(ctx: ComputeContext, local: FisherSums, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """G^T u = sum_i u_i g_i over this rank's rows, ``{param name: [*shape]}``.

    From the chunks' kept gradients, else recomputed chunk by chunk (the same rows, in the
    same order, as the Gram matrix: the chunks as drawn, MC labels included).

    Args:
        ctx: the computation's context (model, loss, trainable parameters).
        local: this rank's sums (kept gradients or chunks, the per-sample plan).
        u: ``[R_local]`` row weights.
    """
    params = ctx.trainable_params()
    u = u.to(next(iter(params.values())).device)  # the Gram's eigenvector is on the host
    if local.cache is not None:
        reps: Any = iter(local.cache)
    else:
        reps = (
            chunk_gradients(ctx.model, ctx.loss_fn, unwrap(item)[0], params, local.param_map, plan=local.plan)
            for item in local.chunks
        )
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for rep in reps:
        part = rep.weighted_sum(u[offset : offset + rep.n])
        offset += rep.n
        for name, t in part.items():
            out[name] = t if name not in out else out[name].add_(t)
    return {n: out[n] if n in out else torch.zeros_like(p) for n, p in params.items()}


def _unit_with_sign(vector: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vector / ||vector||`` in the parameters' dtypes, its sign chosen so that its entry of largest magnitude is positive."""
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in vector.values()))
    peak, sign = -1.0, 1.0
    for t in vector.values():
        if t.numel():
            i = int(t.abs().argmax())
            value = float(t.reshape(-1)[i])
            if abs(value) > peak:
                peak, sign = abs(value), (1.0 if value >= 0 else -1.0)
    return {n: (vector[n].double() * (sign / norm)).to(p.dtype).detach() for n, p in params.items()}


def _summed(collective: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> sum over ranks of t`` (a copy, all-reduced): Lanczos's ``reduce_sum``."""

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        collective.sum_([out])  # type: ignore[attr-defined]
        return out

    return reduce_sum


@dataclass
class GlobalFisher:
    """Fisher statistics summed over ranks (what every Fisher metric reports from).

    Attributes:
        local: this rank's :class:`FisherSums` (cache and chunks for products).
        diag_sum: ``{name: sum_i g_{i,p}^2}`` over all rows of all ranks.
        grad_sum: ``{name: sum_i g_{i,p}}`` over all ranks, or ``None``.
        sq_norm_sum: ``[n_params]`` float64, sum_i ||g_{i,p}||^2.
        sq_norm_dev: sum_i (||g_i||^2 - trace)^2 (float64, two-pass).
        rows: R, the global row count; loss: mean row loss.
    """

    local: FisherSums
    diag_sum: dict[str, torch.Tensor]
    grad_sum: dict[str, torch.Tensor] | None
    sq_norm_sum: torch.Tensor
    sq_norm_dev: float
    rows: int
    loss: float


def gather_fisher(
    ctx: ComputeContext,
    kind: str,
    seed: int,
    mc_samples: int,
    method: str,
    accumulate_dtype: str,
    cache_bytes: int,
    want_grad_sum: bool = False,
    groups: int | None = None,
    *,
    want_diag: bool = True,
    want_gram: bool = False,
    fill_gram: bool = False,
) -> GlobalFisher:
    """Accumulate the Fisher statistics of ``ctx``'s probe and all-reduce them.

    ``want_diag=False`` leaves ``diag_sum`` empty (traces only); ``want_gram`` forms this
    rank's Gram matrix G G^T in ``local.gram`` when it can, and ``fill_gram`` also when the
    chunks do not all fit ``cache_bytes`` (see ``accumulate_fisher``).

    Raises:
        ValueError: fewer than 2 samples in the probe, no trainable parameters,
            ``method="linear"`` on a model it does not fit, or ``kind="mc"`` on batches
            without labels or a model without logits.
    """
    params = ctx.trainable_params()
    if not params:
        raise ValueError("FisherInformation: the model has no trainable parameters")
    n_total = ctx.n_total()
    if n_total < 2:
        raise ValueError(f"FisherInformation: the probe has n_samples={n_total}; it needs at least 2 samples")
    param_map = linear_param_map(ctx.model, params) if method == "linear" and not groups else None
    if method == "linear" and param_map is None and not groups:
        raise ValueError("FisherInformation.method='linear' needs every trainable parameter in an nn.Linear")
    sharded = is_sharded(ctx.model)
    if sharded:  # per-layer hooks only; sums reduce-scattered into each rank's shard
        check_sharded_plan(ctx.model, params, "vmap" if method == "vmap" else "hooks")
        if kind == "mc":
            raise NotImplementedError("FisherInformation(kind='mc') on a sharded (FSDP) model is not supported yet")
        groups, param_map = None, None
    plan = hook_plan(ctx.model, params) if (method in ("auto", "hooks") or sharded) and not groups else None
    chunks = aligned_chunks(ctx.chunks(), ctx.collective) if sharded else ctx.chunks()
    if kind == "mc":
        chunks = (
            group
            for c in ctx.chunks()
            for group in group_draws(sample_mc_labels(ctx.model, c, seed, mc_samples), ctx.chunk_size)
        )
        ctx.meta.update(seed=seed, mc_samples=mc_samples)
    acc = torch.float64 if accumulate_dtype == "float64" else torch.float32
    local = accumulate_fisher(
        ctx.model,
        ctx.loss_fn,
        chunks,
        params,
        param_map=param_map,
        accumulate_dtype=acc,
        want_grad_sum=want_grad_sum,
        cache_bytes=cache_bytes,
        on_chunk=lambda i: ctx.check_time(chunks_done=i),
        auto_fallback=False,
        groups=parameter_groups(params, groups) if groups else None,
        plan=plan,
        want_diag=want_diag,
        want_gram=want_gram,
        collective=ctx.collective if sharded else None,
        fill_gram=fill_gram,
    )
    if groups:
        ctx.meta["parameter_groups"] = len(local.groups or [])
    if local.fallback:
        ctx.meta["linear_fallback"] = local.fallback
    if local.gram_recomputed:
        ctx.meta["gram_chunks_recomputed"] = local.gram_recomputed
    col = local.sq_norms.sum(0)
    head = torch.tensor([float(local.rows), local.loss_sum], dtype=torch.float64, device=col.device)
    diag = dict(local.diag_sum)
    grad = dict(local.grad_sum) if local.grad_sum is not None else None
    if sharded:  # diag and grad are reduce-scattered already: this rank's shards of the sums
        ctx.collective.sum_([col, head])
        ctx.meta["sharded"] = True
    else:
        ctx.collective.sum_([*diag.values(), *(grad or {}).values(), col, head])
    rows = int(round(float(head[0])))
    trace = float(col.sum()) / rows
    dev = torch.tensor([float((local.sq_norms.sum(1) - trace).square().sum())], dtype=torch.float64)
    ctx.collective.sum_([dev])
    ctx.meta.update(
        kind=kind,
        rows=rows,
        per_sample_method=local.method,
        cached=local.cache is not None,
    )
    if local.vmapped:
        ctx.meta["vmap_params"] = {n: (plan.reasons.get(n, "") if plan else "") for n in local.vmapped}
    return GlobalFisher(local, diag, grad, col, float(dev[0]), rows, float(head[1]) / rows)


def trace_scalars(stats: GlobalFisher) -> dict[str, float]:
    """``trace``, ``trace_stderr``, ``loss``, ``params/<p>/trace`` and ``layers/<m>/trace``."""
    r = stats.rows
    per_param = (stats.sq_norm_sum / r).tolist()
    trace = float(stats.sq_norm_sum.sum()) / r
    scalars = {
        "trace": trace,
        "trace_stderr": math.sqrt(stats.sq_norm_dev / (r - 1) / r) if r > 1 else math.nan,
        "loss": stats.loss,
    }
    layers: dict[str, float] = defaultdict(float)
    for name, value in zip(stats.local.names, per_param):
        scalars[f"params/{name}/trace"] = value
        layers[module_of(name)] += value
    scalars.update({f"layers/{m}/trace": v for m, v in layers.items()})
    return scalars


def spectrum_scalars(eigenvalues: np.ndarray) -> dict[str, float]:
    """``top_k_effective_rank`` and ``top_k_condition_number`` over the computed top-k only (descending).

    top_k_effective_rank = exp(-sum_j q_j log q_j), q_j = lambda_j / sum(lambda) (negative
    round-off clipped to 0); top_k_condition_number = lambda_1 / lambda_k (inf when
    lambda_k <= 0).

    Example:
        >>> spectrum_scalars(np.array([2.0, 2.0]))
        {'top_k_effective_rank': 2.0, 'top_k_condition_number': 1.0}
    """
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = lam.sum()
    if total <= 0:
        return {"top_k_effective_rank": math.nan, "top_k_condition_number": math.nan}
    q = lam[lam > 0] / total
    eff = float(np.exp(-(q * np.log(q)).sum()))
    cond = float(lam[0] / lam[-1]) if lam[-1] > 0 else math.inf
    return {"top_k_effective_rank": eff, "top_k_condition_number": cond}


def check_percent(field_name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in (0, 100]."""
    validate.check_number(field_name, value, 0, 100, lo_open=True)


def top_percent_mask(diagonal: Mapping[str, torch.Tensor], top_percent: float) -> dict[str, torch.Tensor]:
    """Masks of the ceil(p% x P) entries with the largest Fisher diagonal, over all parameters.

    Ties at the threshold are broken by position (model order), so exactly that many
    entries are kept.

    Args:
        diagonal: ``{param name: diag [*shape]}`` (e.g. ``result.tensors``).
        top_percent: p in (0, 100].

    Returns:
        ``{param name: bool mask [*shape]}``.

    Raises:
        ValueError: ``top_percent`` out of range.

    Example:
        >>> m = top_percent_mask({"w": torch.tensor([3.0, 1.0, 2.0, 0.0])}, 50)
        >>> m["w"].tolist()
        [True, False, True, False]
    """  # noqa: DOC502 (from check_percent)
    check_percent("top_percent", top_percent)
    flat = torch.cat([d.detach().reshape(-1).double() for d in diagonal.values()])
    k = min(flat.numel(), math.ceil(flat.numel() * top_percent / 100 - 1e-9))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for name, d in diagonal.items():
        out[name] = keep[start : start + d.numel()].reshape(d.shape)
        start += d.numel()
    return out


def mask_scalars(diagonal: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``top_percent_mass`` (share of sum(diag) inside the masks) and ``layers/<m>/top_percent_fraction``."""
    total = sum(float(d.double().sum()) for d in diagonal.values())
    kept = sum(float(d.double()[masks[n]].sum()) for n, d in diagonal.items())
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, m in masks.items():
        counts[module_of(name)][0] += int(m.sum())
        counts[module_of(name)][1] += m.numel()
    out = {"top_percent_mass": kept / total if total > 0 else math.nan}
    out.update({f"layers/{mod}/top_percent_fraction": k / n for mod, (k, n) in counts.items()})
    return out
