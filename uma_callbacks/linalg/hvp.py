r"""Hessian-vector products of the probe loss by double backward (reverse-over-reverse).

N probe samples with per-sample losses l_i(theta), probe loss L = (1/N) sum_i l_i, and
H = nabla^2 L [P, P]. For a vector v [P] (split per parameter tensor),

    H v = (1/N) sum_c  nabla_theta [ (nabla_theta sum_{i in c} l_i) . v ],

summed over the local chunks c of the probe, then over ranks (``collective.sum_``), then
divided by the global N, so that a probe sharded over ranks gives the single-process
product (Pearlmutter 1994, "Fast exact multiplication by the Hessian").

Why reverse-over-reverse: forward-mode AD (``jvp(grad(.))``, forward-over-reverse) has no
rule for ``aten::silu_backward`` in torch 2.13, so it fails on Qwen2/Llama MLPs.

Graph caching: the first backward (``create_graph=True``) builds a graph whose size is
that of the activations of the chunk. With ``cache_graph`` the gradient graph of every
local chunk is kept and each product is one extra backward through it (about a third of
the cost of recomputing forward + backward); without it, each product re-runs the
forward and both backwards, a chunk at a time. The default ``cache_graph=None`` decides
on the first chunk: 3 x the bytes its forward saves (counted by a ``saved_tensors_hooks``
pack hook on one extra forward, each storage once), scaled to all local samples, against
``graph_bytes_limit``; a probe of one chunk is always cached (free in peak memory).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from uma_callbacks.core.batches import count_samples
from uma_callbacks.core.distributed import Collective, LocalCollective
from uma_callbacks.core.losses import LossFn


def split_flat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a flat ``vector [P]`` shaped like each tensor of ``like`` (model order).

    Args:
        vector: ``[P]`` with P = sum of the numels of ``like``.
        like: tensors whose shapes cut the vector.

    Returns:
        One view per tensor of ``like``, with its shape (dtype and device of ``vector``).

    Raises:
        ValueError: the vector's length is not P.
    """
    sizes = [t.numel() for t in like]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector must be 1-D with {sum(sizes)} entries; got shape {tuple(vector.shape)}")
    return [piece.view(t.shape) for piece, t in zip(torch.split(vector, sizes), like)]


def split_flat_rows(block: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``block [b, P]`` shaped ``[b, *t.shape]`` for each tensor of ``like``.

    Copies only when ``block``'s rows are not contiguous.
    """
    sizes = [t.numel() for t in like]
    return [piece.reshape(block.shape[0], *t.shape) for piece, t in zip(torch.split(block, sizes, dim=1), like)]


def _row_views(block: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[b, numel]`` column slices of ``block [b, P]``, one per tensor of ``like`` (views)."""
    return list(torch.split(block, [t.numel() for t in like], dim=1))


class HessianOperator:
    r"""The matrix-free operator v [P] -> H v [P] of the probe loss (see the module docstring).

    Every rank must call :meth:`matvec` the same number of times with the same vector
    (Lanczos and Hutchinson draw their vectors from recorded seeds, so they do).
    The caller keeps attention switched to a double-backward-capable implementation
    (:func:`~uma_callbacks.core.model_state.eager_attention`) while the operator is used.

    Args:
        model: the model; its parameters are read, never written; no ``.grad`` is set.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``.
        chunks: the local probe, cut in chunks (``list(ctx.chunks())``).
        params: ``{name: parameter}`` to differentiate (model order), each requiring grad.
        n_total: the global number of samples N (summed over ranks).
        collective: cross-rank sums (default: one process).
        cache_graph: keep the first-backward graph of every chunk across products;
            ``None`` keeps it when there is a single local chunk, or when the graphs of
            all local chunks, measured on the first, take at most ``graph_bytes_limit``.
        graph_bytes_limit: see ``cache_graph`` (``graph_bytes`` holds the estimate).
        on_matvec: called after each product with the running count (time checks).

    Attributes:
        dim: P, the number of entries of the flat vectors.
        matvecs: products taken so far.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> batch = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> loss = lambda m, b: m(b).squeeze(-1) ** 2      # l_i = (w . x_i)^2, H = (2/N) X^T X
        >>> op = HessianOperator(lin, loss, [batch], dict(lin.named_parameters()), n_total=2)
        >>> op.matvec(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
        [10.0, 14.0]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        chunks: Sequence[Any],
        params: Mapping[str, torch.Tensor],
        n_total: int,
        *,
        collective: Collective | None = None,
        cache_graph: bool | None = None,
        on_matvec: Callable[[int], None] | None = None,
        graph_bytes_limit: int = 0,
    ) -> None:
        if n_total < 1:
            raise ValueError(f"HessianOperator.n_total must be >= 1; got {n_total!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.chunks = list(chunks)
        self.names = list(params)
        self.params = list(params.values())
        self.n_total = int(n_total)
        self.collective = collective or LocalCollective()
        self.cache_graph = len(self.chunks) <= 1 if cache_graph is None else bool(cache_graph)
        #: decide on the first chunk's measured graph (``cache_graph=None``, several chunks)
        self._decide_cache = cache_graph is None and len(self.chunks) > 1
        self.graph_bytes_limit = int(graph_bytes_limit)
        self.graph_bytes: int | None = None  # all local chunks' graphs, as estimated
        self.on_matvec = on_matvec
        self.dim = sum(p.numel() for p in self.params)
        self._dtype = self.params[0].dtype if self.params else torch.float32
        self._device = self.params[0].device if self.params else torch.device("cpu")
        if any(p.dtype != self._dtype for p in self.params):
            self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.matvecs = 0
        self.block_matvecs = 0  # products of restricted blocks (:meth:`restrict`)
        self.product_seconds = 0.0  # time callers spent in products (they add it)
        self.batched = True
        self.batch_error = ""
        self._graph: list[tuple[list[torch.Tensor], list[int], torch.Tensor]] | None = None

    # ------------------------------------------------------------------ products
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the flat vectors (float32 at least): a :class:`~uma_callbacks.linalg.operators.SymmetricOperator`."""
        return torch.promote_types(self._dtype, torch.float32)

    @property
    def device(self) -> torch.device:
        """Where the products are taken."""
        return self._device

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """H v for a flat ``vector [P]``; returns ``[P]`` in the vector's dtype and device."""
        out = self.matmat_rows(vector.reshape(1, -1))
        return out.reshape(-1).to(vector.dtype).to(vector.device)

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v for ``v`` given per parameter (shapes and dtypes of the parameters).

        Args:
            vectors: one tensor per parameter, model order.

        Returns:
            ``[H v]_p`` per parameter (views of one flat ``[P]`` buffer), summed over
            ranks and divided by N.
        """
        flat = torch.cat([v.reshape(-1).to(self._dtype) for v in vectors]).reshape(1, -1)
        out = self.matmat_rows(flat).reshape(-1)
        return split_flat(out, self.params)

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """H V for a block ``V [P, b]`` (see :meth:`matmat_rows`, which avoids the transposes).

        Returns:
            ``[P, b]`` in the block's dtype and device.
        """
        return self.matmat_rows(block.T).T.to(block.dtype).to(block.device)

    def matmat_rows(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """H v_j for the rows of ``V [b, P]``, written into one flat ``[b, P]`` buffer.

        All b products run in one batched double backward
        (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over the backward),
        or one at a time when a backward op has no batching rule (``batch_error`` says
        which). Each chunk's per-parameter parts are copied (first chunk) or added
        (later chunks) straight into their slice of the buffer: no zero-filled
        accumulators and no concatenation of ``[b, P]`` vectors. Counts b products.

        Args:
            rows: ``[b, P]``; the row slices of a row-major basis are used as they are.
            out: an optional ``[b, P]`` buffer in the parameters' dtype and device, reused
                across calls (a fresh allocation of that size costs about as much as
                writing it, in page faults); must not overlap ``rows``.

        Returns:
            ``out`` (or a new ``[b, P]``) in the parameters' dtype and device.

        Raises:
            ValueError: ``rows`` is not ``[b, P]``, or ``out`` is not ``[b, P]`` in the
                parameters' dtype.
        """  # noqa: DOC502 (raised by _products)
        out = self._products(rows, out, list(range(len(self.params))))
        self.matvecs += rows.shape[0]
        if self.on_matvec is not None:
            self.on_matvec(self.matvecs + self.block_matvecs)
        return out

    def _products(self, rows: torch.Tensor, out: torch.Tensor | None, positions: list[int]) -> torch.Tensor:
        """``H_SS v_j`` for the rows of ``V [b, P_S]``: the products restricted to the parameters ``positions``.

        S = all parameters is :meth:`matmat_rows`; a block S is :meth:`restrict`'s operator.
        Summed over ranks and divided by N; counts nothing.

        Raises:
            ValueError: ``rows`` is not ``[b, P_S]``, or ``out`` is not ``[b, P_S]`` in the
                parameters' dtype.
        """
        like = [self.params[j] for j in positions]
        dim = sum(p.numel() for p in like)
        b = rows.shape[0]
        if rows.dim() != 2 or rows.shape[1] != dim:
            raise ValueError(f"rows must be [b, {dim}]; got shape {tuple(rows.shape)}")
        if out is None:
            out = torch.empty(b, dim, dtype=self._dtype, device=self._device)
        elif out.shape != (b, dim) or out.dtype != self._dtype:
            raise ValueError(f"out must be [{b}, {dim}] of {self._dtype}; got {tuple(out.shape)} {out.dtype}")
        rows = rows.to(self._device)
        if b > 1 and self.batched:
            try:
                self._accumulate(rows, out, positions, batched=True)
            except RuntimeError as err:  # no batching rule for some backward op: one at a time
                self.batched = False
                self.batch_error = str(err).splitlines()[0][:200]
        if b == 1 or not self.batched:
            for j in range(b):
                self._accumulate(rows[j : j + 1], out[j : j + 1], positions, batched=False)
        if not self.cache_graph:
            self._graph = None
        self.collective.sum_([out])
        out.div_(self.n_total)
        return out

    def _accumulate(self, rows: torch.Tensor, out: torch.Tensor, positions: list[int], *, batched: bool) -> None:
        """``out [b, P_S] = sum over local chunks of d/dtheta_S (g_S,c . v_j)`` for the rows v_j.

        S = the parameters ``positions``: only their first-backward gradients are
        differentiated, and only with respect to them (autograd runs no node off the paths
        from g_S to theta_S, and forms no other parameter's gradient). b = 1 when not
        ``batched``. Per chunk one double backward, its parts copied or added into the
        parameter slices of ``out``.
        """
        like = [self.params[j] for j in positions]
        targets = _row_views(out, like)
        vectors = [
            v.reshape(v.shape[0], *p.shape).to(p.dtype) if batched else v.reshape(p.shape).to(p.dtype)
            for v, p in zip(_row_views(rows, like), like)
        ]
        written = [False] * len(like)
        for grads, index, _losses in self._gradients():
            differentiable = set(index)
            used = [i for i, j in enumerate(positions) if j in differentiable]
            if not used:
                continue
            with torch.enable_grad():
                parts = torch.autograd.grad(
                    [grads[positions[i]] for i in used],
                    like,
                    grad_outputs=[vectors[i] for i in used],
                    # read per chunk: the first chunk's graph may just have decided the caching
                    retain_graph=True if batched else self.cache_graph,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            for j, part in enumerate(parts):
                if part is None:
                    continue
                part = part.detach().reshape(targets[j].shape)
                if written[j]:
                    targets[j].add_(part)
                else:
                    targets[j].copy_(part)
                    written[j] = True
        for j, done in enumerate(written):
            if not done:
                targets[j].zero_()

    def restrict(self, names: Sequence[str]) -> HessianBlock:
        """The operator of the diagonal block H_SS for the parameters ``names`` (a subset of :attr:`names`).

        It shares this operator's first backward: the cached graph of every chunk (or, when
        not cached, the same re-run per product), so any number of blocks pay for one.

        Args:
            names: parameter names of the block, each in :attr:`names`.

        Returns:
            A :class:`HessianBlock` (its flat vectors follow the order of :attr:`names`).

        Raises:
            ValueError: a name that is not a parameter of this operator, or none.
        """
        where = {n: j for j, n in enumerate(self.names)}
        missing = [n for n in names if n not in where]
        if missing or not names:
            raise ValueError(f"HessianOperator.restrict: names must be a non-empty subset of the operator's parameters; got {missing or list(names)}")
        return HessianBlock(self, sorted({where[n] for n in names}))

    def close(self) -> None:
        """Free the cached graphs (also done when the operator is garbage-collected)."""
        self._graph = None

    # ------------------------------------------------------------------ internals
    def _gradients(self):
        """Yield ``(grads, index, losses)`` per chunk.

        That is the first-backward gradients (with graph), the indices of those that depend
        on the parameters (others add nothing) and the chunk's per-sample losses ``[n_c]``
        (with graph).
        """
        if self.cache_graph and self._graph is not None:
            yield from self._graph
            return
        cached: list[tuple[list[torch.Tensor], list[int], torch.Tensor]] = []
        for chunk in self.chunks:
            if self._decide_cache:
                entry = self._measured_first_backward(chunk)
            else:
                entry = self._first_backward(chunk)
            if self.cache_graph:
                cached.append(entry)
            yield entry
        if self.cache_graph:
            self._graph = cached

    def _measured_first_backward(self, chunk: Any) -> tuple[list[torch.Tensor], list[int], torch.Tensor]:
        """:meth:`_first_backward`, after deciding whether every chunk's graph is cached.

        The decision measures one extra forward of this chunk whose ``saved_tensors_hooks``
        pack hook counts the bytes autograd saves (each storage once) and keeps nothing:
        that forward's graph can never be used, so it frees at once (a pack hook returning
        the tensor itself would tie an op that saves its own output, such as tanh, to its
        node in a cycle Python cannot free). The first backward with ``create_graph``
        saves about as much again, and its gradients one parameter vector: the estimate is
        3 x the forward's bytes, scaled from this chunk's samples to all local ones.
        """
        seen: set[tuple[int, int]] = set()
        saved = 0

        def pack(t: torch.Tensor) -> None:
            nonlocal saved
            if t.layout == torch.strided and not t.is_meta:
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in seen:
                    seen.add(key)
                    saved += storage.nbytes()
            return None

        def unpack(_: None) -> torch.Tensor:
            raise RuntimeError("HessianOperator: the measuring forward's graph is never differentiated")

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            self.loss_fn(self.model, chunk)
        local = sum(count_samples(c) for c in self.chunks)
        self.graph_bytes = int(3 * saved * local / max(1, count_samples(chunk)))
        self.cache_graph = self.graph_bytes <= self.graph_bytes_limit
        self._decide_cache = False
        return self._first_backward(chunk)

    def _first_backward(self, chunk: Any) -> tuple[list[torch.Tensor], list[int], torch.Tensor]:
        with torch.enable_grad():
            losses = self.loss_fn(self.model, chunk)
            grads = torch.autograd.grad(losses.sum(), self.params, create_graph=True, allow_unused=True)
        kept = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        index = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        return kept, index, losses

    def gradient_sketch(self, b: int, seed: int) -> torch.Tensor:
        r"""``S [b, P]``, rows s_j = sum_i c_ij nabla l_i: b random combinations of the per-sample gradients.

        The c_ij are Gaussian, from a local generator seeded with ``seed`` and drawn chunk
        by chunk; the combinations are summed over chunks and ranks.

        A start block for Lanczos inside the span of the per-sample gradients, which is
        the range of the Gauss-Newton part of H for a 2-class softmax and holds most of the
        top eigenvectors in practice (Papyan 2020: the outliers come from class-gradient
        structure). One batched backward through each chunk's first-backward graph (built
        here when not cached: about one training step).
        """
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        out = torch.zeros(b, self.dim, dtype=self._dtype, device=self._device)
        targets = _row_views(out, self.params)
        for _grads, _index, losses in self._gradients():
            if not losses.requires_grad:
                continue
            weights = torch.randn(b, losses.shape[0], generator=gen, dtype=torch.float64)
            with torch.enable_grad():
                parts = torch.autograd.grad(
                    losses,
                    self.params,
                    grad_outputs=weights.to(losses.dtype).to(losses.device),
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            for target, part in zip(targets, parts):
                if part is not None:
                    target.add_(part.detach().reshape(target.shape))
        if not self.cache_graph:
            self._graph = None
        self.collective.sum_([out])
        return out


class HessianBlock:
    r"""The diagonal block H_SS [P_S, P_S] of a :class:`HessianOperator`, for a subset S of its parameters.

    v_S -> H_SS v_S = (1/N) sum_c nabla_{theta_S} [ g_{S,c} . v_S ], with g_{S,c} the
    chunk's first-backward gradients of the block's parameters: the second backward
    differentiates only those, with respect to the block's parameters only, so the other
    parameters' Hessian rows are neither formed nor stored. The first backward is the
    parent's (:meth:`HessianOperator.restrict`): cached once, every block reuses it.

    Attributes:
        parent: the whole-model operator.
        names: the block's parameter names (the parent's order).
        params: the block's parameters.
        dim: P_S.
        matvecs: products of this block so far (also counted in ``parent.block_matvecs``).
    """

    def __init__(self, parent: HessianOperator, positions: list[int]) -> None:
        self.parent = parent
        self.positions = list(positions)
        self.names = [parent.names[j] for j in self.positions]
        self.params = [parent.params[j] for j in self.positions]
        self.dim = sum(p.numel() for p in self.params)
        self.matvecs = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the flat vectors (the parent's)."""
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        """Where the products are taken."""
        return self.parent.device

    def flat_slice(self, vectors: torch.Tensor) -> torch.Tensor:
        """The block's entries of whole-model flat vectors: ``[..., P] -> [..., P_S]`` (a copy).

        Args:
            vectors: ``[P]`` or ``[b, P]`` in the parent's parameter order.

        Returns:
            The columns of the block's parameters, in the block's order.
        """
        starts = [0]
        for p in self.parent.params:
            starts.append(starts[-1] + p.numel())
        return torch.cat([vectors[..., starts[j] : starts[j + 1]] for j in self.positions], dim=-1)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """H_SS v for a flat ``vector [P_S]``; returns ``[P_S]`` in the vector's dtype and device."""
        out = self.matmat_rows(vector.reshape(1, -1).to(self.parent._dtype))
        return out.reshape(-1).to(vector.dtype).to(vector.device)

    def matmat_rows(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """H_SS v_j for the rows of ``V [b, P_S]`` (see :meth:`HessianOperator.matmat_rows`).

        Args:
            rows: ``[b, P_S]``.
            out: an optional ``[b, P_S]`` buffer in the parameters' dtype and device.

        Returns:
            ``out`` (or a new ``[b, P_S]``) in the parameters' dtype and device.
        """  # noqa: DOC502 (the ValueError of a wrong shape comes from HessianOperator._products)
        out = self.parent._products(rows, out, self.positions)
        self.matvecs += rows.shape[0]
        self.parent.block_matvecs += rows.shape[0]
        if self.parent.on_matvec is not None:
            self.parent.on_matvec(self.parent.matvecs + self.parent.block_matvecs)
        return out


def hessian_matrix(operator: HessianOperator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense H [P, P] by P products with unit vectors (tiny models only; tests, benches).

    Args:
        operator: a :class:`HessianOperator`.
        dtype: dtype of the result.

    Returns:
        ``[P, P]``, column j = H e_j.
    """
    device = operator.params[0].device if operator.params else torch.device("cpu")
    cols = []
    for j in range(operator.dim):
        e = torch.zeros(operator.dim, dtype=dtype, device=device)
        e[j] = 1.0
        cols.append(operator.matvec(e))
    return torch.stack(cols, dim=1)
