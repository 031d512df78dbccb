"""The fallback for parameters no layer rule covers: ``vmap(grad)`` per-sample gradients.

Used for a parameter whose module has no rule, and for one the hooks' run-time checks
reject (a call without the batch dim, a tensor modified in place after the call, a
parameter used outside its layers' forward). It runs on the whole model, differentiating
the leftover parameters only (:func:`~uma_callbacks.linalg.per_sample.per_sample_grads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from uma_callbacks.core.losses import LossFn
from uma_callbacks.linalg.layers.factors import Dense
from uma_callbacks.linalg.per_sample import per_sample_grads


def vmapped_factors(
    model: torch.nn.Module, loss_fn: LossFn, batch: Any, params: Mapping[str, torch.Tensor], names: list[str]
) -> dict[str, Dense]:
    """``vmap(grad)`` per-sample gradients of ``names`` only (the rest of the model fixed)."""
    if not names:
        return {}
    with torch.no_grad():  # no graph to the parameters vmap does not swap (grad ignores an outer no_grad)
        psg = per_sample_grads(model, loss_fn, batch, {name: params[name] for name in names})
    return {name: Dense(g.detach()) for name, g in psg.grads.items()}
