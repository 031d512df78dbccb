r"""The Hessian operator a curvature metric measures through, set up in one place.

:class:`~uma_callbacks.metrics.hessian.HessianSpectrum` (whole model and per-block) and
:class:`~uma_callbacks.metrics.hessian_density.HessianDensity` take the same steps before
their first product: the trainable parameters ``{name: p}`` (an error naming the metric
when there are none), the dtype of the Lanczos vectors (float64 when any parameter is
float64, else float32, so a bfloat16 model's basis keeps float32 inner products), the
device of the products, and a :class:`~uma_callbacks.linalg.hvp.HessianOperator` of
H = nabla^2 L, L = (1/N) sum_i l_i over the global probe (chunks of ``ctx.chunk_size``,
sums across ranks by ``ctx.collective``), whose every product checks the metric's time
limit (``ctx.check_time(matvecs=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from uma_callbacks.linalg.hvp import HessianOperator
from uma_callbacks.metrics.base import ComputeContext


@dataclass
class HessianSetup:
    """The operator and what the metric's Lanczos runs are built on.

    Attributes:
        op: v [P] -> H v [P] (and its restricted blocks, :meth:`HessianOperator.restrict`).
        params: ``{name: parameter}`` differentiated, in model order (P entries in all).
        dtype: the Lanczos vectors' dtype (float64 when any parameter is, else float32).
        device: where the products are taken (the first parameter's device).
    """

    op: HessianOperator
    params: dict[str, torch.Tensor]
    dtype: torch.dtype
    device: torch.device


def hessian_setup(
    ctx: ComputeContext,
    owner: str,
    *,
    cache_graph: bool | None,
    graph_bytes_limit: Callable[[int], int] | None = None,
) -> HessianSetup:
    """The Hessian operator of the probe loss for the metric ``owner`` (see the module docstring).

    Args:
        ctx: the metric's compute context.
        owner: the metric's class name, for the error message.
        cache_graph: keep every chunk's first-backward graph across products (``None``:
            decide on the first chunk's measured graph, see :class:`HessianOperator`).
        graph_bytes_limit: P -> the most bytes the cached graphs may take when
            ``cache_graph`` is ``None`` (default 0: only a one-chunk probe is cached).

    Returns:
        :class:`HessianSetup`; the caller closes ``op`` when done.

    Raises:
        ValueError: the model has no trainable parameters.
    """
    params = ctx.trainable_params()
    if not params:
        raise ValueError(f"{owner}: the model has no trainable parameters")
    first = next(iter(params.values()))
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32
    dim = sum(p.numel() for p in params.values())
    op = HessianOperator(
        ctx.model,
        ctx.loss_fn,
        list(ctx.chunks()),
        params,
        ctx.n_total(),
        collective=ctx.collective,
        cache_graph=cache_graph,
        on_matvec=lambda m: ctx.check_time(matvecs=m),
        graph_bytes_limit=graph_bytes_limit(dim) if graph_bytes_limit is not None else 0,
    )
    return HessianSetup(op=op, params=params, dtype=dtype, device=first.device)
