r"""The per-sample rule of GPT-2's ``Conv1D`` (y = x W + b, W ``[in, out]``).

g_{i,W} = sum_t a_{it} d_{it}^T, g_{i,b} = sum_t d_{it}.

Matched by structure (a class named ``Conv1D`` with ``nf`` and a 2-D ``weight``), so that
the rule costs no ``transformers`` import and covers the copies of the class other
packages define.
"""

from __future__ import annotations

import torch

from uma_callbacks.linalg.layers.factors import Dense, Factor, Outer
from uma_callbacks.linalg.layers.registry import register_layer_rule_matching


def is_conv1d(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a GPT-2 style ``Conv1D``."""
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and weight.dim() == 2


@register_layer_rule_matching(is_conv1d, name="conv1d")
def conv1d_rule(module: torch.nn.Module, x: torch.Tensor, d: torch.Tensor, n: int) -> dict[str, Factor]:
    """``{"weight": Outer(x, d), "bias": Dense(sum_t d)}`` of one call (x ``[n, ..., in]``)."""
    dd = d.reshape(n, -1, d.shape[-1])
    return {"weight": Outer(x.reshape(n, -1, x.shape[-1]).to(d.dtype), dd), "bias": Dense(dd.sum(1))}
