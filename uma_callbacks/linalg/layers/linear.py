r"""The per-sample rule of ``nn.Linear`` (y = x W^T + b, any number of sequence dims).

The sequence dims are flattened to T: g_{i,W} = sum_t d_{it} a_{it}^T ``[out, in]``,
g_{i,b} = sum_t d_{it}.
"""

from __future__ import annotations

import torch

from uma_callbacks.linalg.layers.factors import Dense, Factor, Outer
from uma_callbacks.linalg.layers.registry import register_layer_rule


@register_layer_rule(torch.nn.Linear, name="linear")
def linear_rule(module: torch.nn.Linear, x: torch.Tensor, d: torch.Tensor, n: int) -> dict[str, Factor]:
    """``{"weight": Outer(d, x), "bias": Dense(sum_t d)}`` of one call (x ``[n, ..., in]``)."""
    dd = d.reshape(n, -1, d.shape[-1])
    out: dict[str, Factor] = {"weight": Outer(dd, x.reshape(n, -1, x.shape[-1]).to(d.dtype))}
    out["bias"] = Dense(dd.sum(1))
    return out
