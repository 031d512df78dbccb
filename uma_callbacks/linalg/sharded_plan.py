"""The per-sample plan on a sharded (FSDP2) model: what the hooks can do there, checked up front.

Under FSDP the full parameters exist only inside FSDP's own forward/backward, so
per-sample gradients must come from the per-layer hooks
(:mod:`uma_callbacks.linalg.layer_grads`); this check lives beside them, above
:mod:`uma_callbacks.core.sharding`, which knows layouts but no per-layer rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from uma_callbacks.core.sharding import check_dim0_sharding, reset_fsdp_forward
from uma_callbacks.linalg.layer_grads import hook_plan


def check_sharded_plan(model: torch.nn.Module, params: Mapping[str, torch.Tensor], method: str) -> None:
    """Refuse what the per-sample path cannot do on a sharded model, before any collective.

    Under FSDP the full parameters exist only inside FSDP's own forward/backward, so
    per-sample gradients must come from the per-layer hooks (activations and output
    gradients); ``vmap(grad)`` over ``functional_call`` would need every parameter whole.

    Raises:
        NotImplementedError: ``method="vmap"``, a parameter without a per-layer rule, or a
            layout other than ``Shard(0)`` on a 1-D mesh (the message names it).
    """
    reset_fsdp_forward(model)
    for name, p in params.items():
        check_dim0_sharding(name, p)
    if method == "vmap":
        raise NotImplementedError("method='vmap' needs whole parameters; on a sharded (FSDP) model use method='hooks'")
    leftover = hook_plan(model, params).leftover
    if leftover:
        raise NotImplementedError(
            f"on a sharded (FSDP) model every trainable parameter needs a per-layer rule; these have none: {leftover[:5]}"
        )
