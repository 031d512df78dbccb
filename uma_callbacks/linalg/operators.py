"""One interface for the curvature operators, and one entry point to their top eigenpairs.

A :class:`SymmetricOperator` is anything with ``dim``, ``dtype``, ``device``, ``matvec``
(``v [P] -> A v [P]``) and ``matmat`` (rows in, rows out: ``V [b, P] -> (A V^T)^T [b, P]``).
:class:`~uma_callbacks.linalg.hvp.HessianOperator` is one (b products in one batched
double backward); the Fisher's product ``F v = (1/N) sum_i g_i (g_i^T v)`` becomes one with
:class:`MatvecOperator`. :func:`top_eigenpairs` runs Lanczos on either: classical Lanczos
for ``block_size=1``, block Lanczos otherwise (:mod:`uma_callbacks.linalg.lanczos`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from uma_callbacks.linalg.lanczos import LanczosResult, block_lanczos_top_k, lanczos_top_k


@runtime_checkable
class SymmetricOperator(Protocol):
    """A symmetric linear operator on flat vectors of ``dim`` entries."""

    dim: int

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the flat vectors."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the products are taken."""
        ...

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat ``vector [P]``."""
        ...

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``A`` applied to each row of ``block [b, P]`` (rows in, rows out)."""
        ...


@dataclass
class MatvecOperator:
    """A :class:`SymmetricOperator` from a product function (``matmat`` one row at a time).

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> op = MatvecOperator(lambda v: a @ v, 2, torch.float64, torch.device("cpu"))
        >>> [round(x, 6) for x in top_eigenpairs(op, 2).eigenvalues.tolist()]
        [3.0, 1.0]
    """

    product: Callable[[torch.Tensor], torch.Tensor]
    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``A v``."""
        return self.product(vector)

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``A`` applied to each row of ``block [b, P]``."""
        return torch.stack([self.product(row) for row in block])


def top_eigenpairs(op: SymmetricOperator, k: int, *, block_size: int = 1, max_iter: int | None = None, **options: Any) -> LanczosResult:
    """The ``k`` largest eigenvalues (and, with ``return_vectors=True``, eigenvectors) of ``op``.

    Args:
        op: the operator.
        k: how many.
        block_size: 1 for classical Lanczos on ``matvec``; b > 1 for block Lanczos on
            ``matmat`` (b products per step).
        max_iter: the most products.
        **options: ``tol``, ``seed``, ``basis_device``, ``return_vectors`` (and, for blocks,
            ``start``, ``on_step``).
    """
    if block_size == 1:
        return lanczos_top_k(op.matvec, op.dim, k, max_iter=max_iter, dtype=op.dtype, device=op.device, **options)
    return block_lanczos_top_k(
        op.matmat, op.dim, k, block_size=block_size, max_matvecs=max_iter, dtype=op.dtype, device=op.device, rows=True,
        **options,
    )  # fmt: skip
