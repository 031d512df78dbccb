"""Exact reductions of large tensors without a float64 copy of the whole tensor."""

from __future__ import annotations

import torch

#: entries per block: a float64 copy of one block is 8 MiB
BLOCK = 1 << 20


def squared_norm64(tensor: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``||t||^2`` summed in float64, a block of ``block`` entries at a time.

    ``t.double().pow(2).sum()`` holds two float64 copies of ``t`` at once (twice the bytes of
    a float32 tensor each: a 30k x 384 embedding is 180 MiB of temporaries); this holds one
    block's.

    Returns:
        A 0-d float64 tensor on ``tensor``'s device.

    Example:
        >>> t = torch.arange(5.0)
        >>> float(squared_norm64(t, block=2))
        30.0
    """
    flat = tensor.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for part in flat.split(block):
        total += part.to(torch.float64).square().sum()
    return total
