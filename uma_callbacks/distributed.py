"""Sums across ranks, probe sharding, and rank-0-only logging.

Every metric keeps sufficient statistics (sums and counts) and reduces them with
:meth:`Collective.sum_`, so that a probe split over R ranks gives the same numbers as one
process on all of it: sum_r sum_{i in shard r} x_i = sum_i x_i.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch


class Collective:
    """Cross-rank reductions used by metrics. The base class is one process (identity)."""

    rank: int = 0
    world_size: int = 1

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place sum of each tensor over ranks (identity here)."""

    def sum_scalar(self, value: float) -> float:
        """Sum of a Python float over ranks, as float64."""
        t = torch.tensor([value], dtype=torch.float64)
        self.sum_([t])
        return float(t.item())

    def any_(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (used to agree on failures)."""
        return self.sum_scalar(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        """Wait for every rank (no-op here)."""


class LocalCollective(Collective):
    """One process: every reduction is the identity."""


class TorchDistributedCollective(Collective):
    """``torch.distributed`` all-reduce (SUM) on the default process group.

    Tensors are reduced on the device the group's backend needs (gloo: CPU) and copied back.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self._device = torch.device("cpu") if backend == "gloo" else None

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            if self._device is not None and t.device != self._device:
                buf = t.to(self._device)
                self._dist.all_reduce(buf)
                t.copy_(buf)
            else:
                self._dist.all_reduce(t)

    def barrier(self) -> None:
        self._dist.barrier()


def current_collective() -> Collective:
    """A :class:`TorchDistributedCollective` when a process group with >1 rank is up, else local."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return TorchDistributedCollective()
    return LocalCollective()


def world_rank() -> int:
    """This process's world rank (0 without distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only world rank 0 logs and writes the journal."""
    return world_rank() == 0


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item from ``rank`` on."""
    return list(items[rank::world_size])
