"""Fingerprints of model weights: the checkpoint part of the cache key."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from uma_callbacks.core.sharding import is_dtensor, sharded_fingerprint


def weights_fingerprint(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over each parameter's name, dtype, shape and bytes (in name order).

    The same weights give the same fingerprint whether they live in a training model or
    were loaded from a checkpoint's safetensors, so the live callback and a later
    backfill share cache entries. On a sharded model (FSDP2 DTensor parameters) every rank
    must call it; it gives the fingerprint of the full tensors on every rank without
    gathering them (:func:`~uma_callbacks.core.sharding.sharded_fingerprint`).

    Args:
        weights: a model (its ``named_parameters``) or a ``{name: tensor}`` mapping.

    Returns:
        64 hex characters.
    """
    items = dict(weights.named_parameters()) if isinstance(weights, torch.nn.Module) else dict(weights)
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
            digest.update(memoryview(t.view(torch.uint8).numpy()))
    return digest.hexdigest()
