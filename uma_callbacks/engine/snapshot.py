"""Fingerprints of model weights: the checkpoint part of the cache key."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from uma_callbacks.core.sharding import is_dtensor, sharded_fingerprint


def weights_fingerprint(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over each state entry's name, dtype, shape and bytes (in name order).

    A model's state entries are its parameters and its persistent buffers (BatchNorm's
    running statistics and counter, ...): everything ``state_dict`` holds, so a change of
    the running statistics alone (SWA's ``update_bn``) gives another fingerprint.
    Non-persistent buffers (rotary ``inv_freq``, causal masks) are left out: a checkpoint
    does not hold them, and the model recomputes them from its config.

    The same weights give the same fingerprint whether they live in a training model or
    were loaded from a checkpoint's safetensors, so the live callback and a later
    backfill share cache entries. On a sharded model (FSDP2 DTensor parameters) every rank
    must call it; it gives the fingerprint of the full tensors on every rank without
    gathering them (:func:`~uma_callbacks.core.sharding.sharded_fingerprint`).

    Args:
        weights: a model (its parameters and persistent buffers, :func:`state_tensors`) or a
            ``{name: tensor}`` mapping.

    Returns:
        64 hex characters.
    """
    items = state_tensors(weights) if isinstance(weights, torch.nn.Module) else dict(weights)
    if any(is_dtensor(t) for t in items.values()):  # FSDP2: streamed shard by shard, same on every rank
        return sharded_fingerprint(items)
    digest = hashlib.sha256()
    for name in sorted(items):
        t = items[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # 0-d too (BatchNorm counter)
    return digest.hexdigest()


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the model's parameters and persistent buffers, under their ``state_dict`` names.

    A tensor shared by two modules appears once, under its first name.

    Read from the modules themselves, not through ``state_dict()``: no state-dict hook
    runs (a wrapper's hook may gather shards), and DTensor entries stay DTensors.
    """
    items: dict[str, torch.Tensor] = dict(model.named_parameters())
    seen = {id(t) for t in items.values()}
    for prefix, module in model.named_modules():
        transient = getattr(module, "_non_persistent_buffers_set", set())
        for name, buffer in module._buffers.items():
            if buffer is None or name in transient or id(buffer) in seen:
                continue
            seen.add(id(buffer))
            items[f"{prefix}.{name}" if prefix else name] = buffer
    return items
