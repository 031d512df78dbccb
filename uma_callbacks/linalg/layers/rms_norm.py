r"""The per-sample rule of HF RMSNorm (Qwen2, Llama, Mistral): g_{i,w} = sum_t d_{it} * xhat_{it}.

xhat = x / sqrt(mean(x^2) + eps), recomputed with the module's own float32 ops.

Every model file of ``transformers`` defines its own copy of the class, so the rule matches
by structure: a class name ending in ``RMSNorm``, a ``weight`` parameter, a
``variance_epsilon`` and no child modules (Gemma's ``1 + weight`` variant has ``eps``
instead and goes to vmap).
"""

from __future__ import annotations

from typing import Any

import torch

from uma_callbacks.linalg.layers.factors import Dense, Factor
from uma_callbacks.linalg.layers.registry import register_layer_rule_matching


def is_hf_rms_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an HF-style RMSNorm (see the module docstring)."""
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and hasattr(module, "variance_epsilon")
        and not any(True for _ in module.children())
    )


@register_layer_rule_matching(is_hf_rms_norm, name="rmsnorm", params=("weight",))
def rms_norm_rule(module: Any, x: torch.Tensor, d: torch.Tensor, n: int) -> dict[str, Factor]:
    """``{"weight": Dense}`` of one call (x ``[n, ..., H]``; HF: float32 statistics, cast back)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    xhat = h.to(x.dtype)
    return {"weight": Dense((d * xhat).reshape(n, -1, d.shape[-1]).sum(1))}
