"""One chunk's per-sample gradients, in whichever form a path gives them.

:class:`ChunkGradients` is what the Fisher needs of a chunk of B samples (the per-row
squared norms, sums, products g_i^T v and sum_i u_i g_i); three representations provide it:

- :class:`StackedGrads`: ``vmap(grad)`` per-sample gradients ``{name: [B, *shape]}``
  (any model, any ``loss_fn``);
- :class:`~uma_callbacks.linalg.linear_factors.LinearFactors`: per-layer activations and
  output gradients, when every trainable parameter is an ``nn.Linear`` weight/bias;
- :class:`~uma_callbacks.linalg.layer_grads.LayerGradients`: per-layer factors from one
  ordinary backward with hooks (:mod:`uma_callbacks.linalg.layers`; ``vmap`` for the rest).

:func:`chunk_gradients` picks one for a chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from uma_callbacks.core.losses import LossFn
from uma_callbacks.linalg.layer_grads import HookPlan, layer_gradients
from uma_callbacks.linalg.linear_factors import linear_factors
from uma_callbacks.linalg.per_sample import PerSampleGradients, per_sample_grads


class ChunkGradients(Protocol):
    """What the Fisher needs from one chunk's per-sample gradients (B rows)."""

    losses: torch.Tensor
    n: int
    names: list[str]

    def nbytes(self) -> int:
        """Bytes held."""
        ...

    def square_stats(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: sum_i g_{i,p}^2}, [B, n_params] float64 ||g_{i,p}||^2)``."""
        ...

    def grad_sums(self) -> dict[str, torch.Tensor]:
        """``{name: sum_i g_{i,p}}``."""
        ...

    def dot(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u [B]``, u_i = g_i^T v."""
        ...

    def weighted_sum(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: sum_i u_i g_{i,p}}``."""
        ...


class StackedGrads:
    """:class:`ChunkGradients` over ``vmap(grad)`` output ``{name: [B, *shape]}``."""

    def __init__(self, psg: PerSampleGradients) -> None:
        self.losses = psg.losses
        self.grads = psg.grads
        self.names = list(psg.grads)
        self.n = int(psg.losses.shape[0])

    def nbytes(self) -> int:
        """Bytes of the stacked gradients."""
        return sum(g.numel() * g.element_size() for g in self.grads.values())

    def square_stats(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: sum_i g_{i,p}^2}, [B, n_params] float64 ||g_{i,p}||^2)``."""
        sums, norms = {}, []
        for name, g in self.grads.items():
            sq = g.square()
            sums[name] = sq.sum(0)
            norms.append(sq.reshape(self.n, -1).sum(1).double())
            del sq
        return sums, torch.stack(norms, dim=1)

    def grad_sums(self) -> dict[str, torch.Tensor]:
        """``{name: sum_i g_{i,p}}``."""
        return {n: g.sum(0) for n, g in self.grads.items()}

    def dot(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u [B]``, u_i = g_i^T v."""
        return sum(g.reshape(self.n, -1) @ v[n].reshape(-1).to(g.dtype) for n, g in self.grads.items())

    def weighted_sum(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: sum_i u_i g_{i,p}}``."""
        return {n: torch.tensordot(u.to(g.dtype), g, dims=1) for n, g in self.grads.items()}

    def gram(self) -> torch.Tensor:
        """``G G^T [B, B]`` float64."""
        return self.cross_gram(self)

    def cross_gram(self, other: StackedGrads) -> torch.Tensor:
        """``G_self G_other^T`` float64."""
        return sum(
            (g.reshape(self.n, -1) @ other.grads[n].reshape(other.n, -1).T).double() for n, g in self.grads.items()
        )


def chunk_gradients(
    model: torch.nn.Module,
    loss_fn: LossFn,
    chunk: Any,
    params: Mapping[str, torch.Tensor],
    param_map: Mapping[str, tuple[str, str]] | None,
    verify: bool = False,
    plan: HookPlan | None = None,
) -> ChunkGradients:
    """Per-sample gradients of one chunk: hooks when ``plan`` is given, linear factors when ``param_map`` is, else vmap.

    Raises:
        ValueError: ``param_map`` given but a run-time check of the linear path fails
            (``verify`` also checks the factors against autograd's summed gradient).
    """
    if plan is not None:
        return layer_gradients(model, loss_fn, chunk, params, plan)
    if param_map is not None:
        factors, reason = linear_factors(model, loss_fn, chunk, param_map, params if verify else None)
        if factors is None:
            raise ValueError(f"method='linear' does not apply: {reason}; use method='vmap'")
        return factors
    return StackedGrads(per_sample_grads(model, loss_fn, chunk, params))
