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
forward and both backwards, a chunk at a time. Caching is free in peak memory when the
probe is one chunk (the default ``cache_graph=None`` caches exactly then).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

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
    """Views of ``block [b, P]`` shaped ``[b, *t.shape]`` for each tensor of ``like``."""
    sizes = [t.numel() for t in like]
    return [piece.reshape(block.shape[0], *t.shape) for piece, t in zip(torch.split(block, sizes, dim=1), like)]


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
            ``None`` keeps it when there is a single local chunk.
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
        self.on_matvec = on_matvec
        self.dim = sum(p.numel() for p in self.params)
        self.matvecs = 0
        self.batched = True
        self.batch_error = ""
        self._graph: list[tuple[list[torch.Tensor], list[int]]] | None = None

    # ------------------------------------------------------------------ products
    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """H v for a flat ``vector [P]``; returns ``[P]`` in the vector's dtype and device."""
        pieces = split_flat(vector, self.params)
        hv = self.hvp([v.to(p.dtype) for v, p in zip(pieces, self.params)])
        flat = torch.cat([h.reshape(-1) for h in hv]).to(vector.dtype)
        return flat.to(vector.device)

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v for ``v`` given per parameter (shapes and dtypes of the parameters).

        Args:
            vectors: one tensor per parameter, model order.

        Returns:
            ``[H v]_p`` per parameter, summed over ranks and divided by N.
        """
        total = [torch.zeros_like(p) for p in self.params]
        for grads, index in self._gradients():
            if index:
                outs = [grads[j] for j in index]
                vs = [vectors[j] for j in index]
                with torch.enable_grad():
                    parts = torch.autograd.grad(
                        outs,
                        self.params,
                        grad_outputs=vs,
                        retain_graph=self.cache_graph,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                torch._foreach_add_(total, [part.detach() for part in parts])
        flat = torch.cat([t.reshape(-1) for t in total])
        self.collective.sum_([flat])
        flat.div_(self.n_total)
        self.matvecs += 1
        if self.on_matvec is not None:
            self.on_matvec(self.matvecs)
        return [
            piece.view(p.shape)
            for piece, p in zip(torch.split(flat, [p.numel() for p in self.params]), self.params)
        ]

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """H V for a block ``V [P, b]``: b products in one batched double backward
        (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over the backward);
        one product at a time when a backward op has no batching rule. Counts b products.

        Returns:
            ``[P, b]`` in the block's dtype and device.
        """
        b = block.shape[1]
        if b == 1 or not self.batched:
            return torch.stack([self.matvec(block[:, j]) for j in range(b)], dim=1)
        pieces = [piece.to(p.dtype) for piece, p in zip(split_flat_rows(block.T, self.params), self.params)]
        total = [torch.zeros(b, *p.shape, dtype=p.dtype, device=p.device) for p in self.params]
        try:
            for grads, index in self._gradients():
                if index:
                    with torch.enable_grad():
                        parts = torch.autograd.grad(
                            [grads[j] for j in index],
                            self.params,
                            grad_outputs=[pieces[j] for j in index],
                            retain_graph=True,
                            allow_unused=True,
                            materialize_grads=True,
                            is_grads_batched=True,
                        )
                    torch._foreach_add_(total, [part.detach() for part in parts])
        except RuntimeError as err:  # no batching rule for some backward op: one at a time
            self.batched = False
            self.batch_error = str(err).splitlines()[0][:200]
            return self.matmat(block)
        if not self.cache_graph:
            self._graph = None
        flat = torch.cat([t.reshape(b, -1) for t in total], dim=1)
        self.collective.sum_([flat])
        flat.div_(self.n_total)
        self.matvecs += b
        if self.on_matvec is not None:
            self.on_matvec(self.matvecs)
        return flat.T.to(block.dtype).to(block.device)

    def close(self) -> None:
        """Free the cached graphs (also done when the operator is garbage-collected)."""
        self._graph = None

    # ------------------------------------------------------------------ internals
    def _gradients(self):
        """Yield ``(grads, index)`` per chunk: the first-backward gradients (with graph)
        and the indices of those that depend on the parameters (others add nothing)."""
        if self.cache_graph and self._graph is not None:
            yield from self._graph
            return
        cached: list[tuple[list[torch.Tensor], list[int]]] = []
        for chunk in self.chunks:
            entry = self._first_backward(chunk)
            if self.cache_graph:
                cached.append(entry)
            yield entry
        if self.cache_graph:
            self._graph = cached

    def _first_backward(self, chunk: Any) -> tuple[list[torch.Tensor], list[int]]:
        with torch.enable_grad():
            loss = self.loss_fn(self.model, chunk).sum()
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        kept = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        index = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        return kept, index


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
