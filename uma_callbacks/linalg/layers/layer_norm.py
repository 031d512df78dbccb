r"""The per-sample rule of ``nn.LayerNorm``: g_{i,w} = sum_t d_{it} * xhat_{it}, g_{i,b} = sum_t d_{it}.

xhat = (x - mean) / sqrt(var + eps) over the normalised dims (biased variance).
"""

from __future__ import annotations

import torch

from uma_callbacks.linalg.layers.factors import Dense, Factor
from uma_callbacks.linalg.layers.registry import register_layer_rule


@register_layer_rule(torch.nn.LayerNorm, name="layernorm")
def layer_norm_rule(module: torch.nn.LayerNorm, x: torch.Tensor, d: torch.Tensor, n: int) -> dict[str, Factor]:
    """``{"weight": Dense, "bias": Dense}`` of one call (x ``[n, ..., *normalized_shape]``)."""
    dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    xhat = (x - mean) * torch.rsqrt(var + module.eps)
    shape = (n, -1, *module.normalized_shape)
    return {"weight": Dense((d * xhat).reshape(shape).sum(1)), "bias": Dense(d.reshape(shape).sum(1))}
