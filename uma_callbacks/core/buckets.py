"""Collectives in buckets: one all-gather or reduce-scatter for many parameters of a sharded model.

A sharded (FSDP2) metric moves full-size tensors of one parameter at a time: the full
vector ``v_p`` gathered from the ranks' pieces, or the sums ``sum_i g_{i,p}`` (``[d0, ...]``)
reduce-scattered into the rank's shard. On gloo a collective costs about a millisecond
whatever its size, so one per parameter dominated a small model's Fisher spectrum (5,600
collectives, 8.4 s of a two-rank run on a 20k-parameter Qwen2). Consecutive parameters
therefore travel together, in buckets of at most ``cap`` entries::

    cap = max(largest parameter's entries, BUCKET_FLOOR_ENTRIES)

A bucket's full-size tensors are never larger than the largest parameter's, which a rank
already held on its own, or than the floor (1 MiB in float64, inside a metric's
workspace). The sums are those of one collective per parameter, entry by entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch

from uma_callbacks.core.sharding import is_dtensor, local_range

#: Entries a bucket may hold whatever the largest parameter (1 MiB in float64).
BUCKET_FLOOR_ENTRIES = 1 << 17


def bucket_cap(params: Iterable[torch.Tensor]) -> int:
    """Entries of a bucket: the largest full tensor's or :data:`BUCKET_FLOOR_ENTRIES`, whichever is more.

    Example:
        >>> bucket_cap([torch.zeros(3, 4)]) == BUCKET_FLOOR_ENTRIES
        True
    """
    return max([BUCKET_FLOOR_ENTRIES, *(int(math.prod(p.shape)) for p in params)])


def buckets(params: Mapping[str, torch.Tensor], names: Sequence[str], cap: int) -> list[list[str]]:
    """``names`` in order, cut into runs whose full tensors hold at most ``cap`` entries together.

    A tensor larger than ``cap`` is a bucket of its own.

    Example:
        >>> shapes = {"a": torch.zeros(4), "b": torch.zeros(3), "c": torch.zeros(5)}
        >>> buckets(shapes, ["a", "b", "c"], cap=7)
        [['a', 'b'], ['c']]
    """
    out: list[list[str]] = []
    held = cap + 1
    for name in names:
        size = int(math.prod(params[name].shape))
        if held + size > cap:
            out.append([])
            held = 0
        out[-1].append(name)
        held += size
    return out


def full_from_pieces(pieces: Sequence[torch.Tensor], params: Sequence[torch.Tensor], collective: Any) -> list[torch.Tensor]:
    """The full tensors whose rank-``r`` pieces are ``pieces`` on rank r: an all-gather, one all-reduce for all.

    A flat buffer of every sharded parameter's full entries, this rank's filled and zeros
    elsewhere, summed over ranks (exact: each entry is one piece plus zeros). Every rank
    must call it with the same parameters (a collective). Plain parameters are reshaped, no
    communication.

    Args:
        pieces: this rank's entries ``[lo, hi)`` of each flattened full tensor, one dtype and device.
        params: the (possibly DTensor) parameters giving the layouts.
        collective: sums over ranks.

    Returns:
        ``[*param.shape]`` for each parameter, views of one buffer in the pieces' dtype.
    """
    ranges = [local_range(param) for param in params]
    sharded = [i for i, param in enumerate(params) if is_dtensor(param)]
    out = [piece if is_dtensor(param) else piece.reshape(shape) for piece, param, (shape, _, _) in zip(pieces, params, ranges)]
    if not sharded:
        return out
    sizes = [math.prod(ranges[i][0]) for i in sharded]
    first = pieces[sharded[0]]
    flat = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
    offset = 0
    for i, size in zip(sharded, sizes):
        shape, lo, hi = ranges[i]
        flat[offset + lo : offset + hi] = pieces[i].reshape(-1)
        out[i] = flat[offset : offset + size].view(shape)
        offset += size
    collective.sum_([flat])
    return out


class ScatterQueue:
    """Full-size tensors queued and reduce-scattered together once the next would pass ``cap`` entries.

    ``deliver(key, piece)`` receives each tensor's piece (this rank's rows of its sum over
    ranks, :meth:`~uma_callbacks.core.distributed.Collective.sum_scatter_dim0`) in the order
    put. Every rank must put the same shapes in the same order and :meth:`flush` at the same
    points (the queue is a collective).

    Args:
        collective: sums over ranks.
        cap: entries held before a reduce-scatter (see :func:`bucket_cap`).
        deliver: called with ``(key, piece)`` for each tensor put.
    """

    def __init__(self, collective: Any, cap: int, deliver: Callable[[Hashable, torch.Tensor], None]) -> None:
        self.collective = collective
        self.cap = cap
        self.deliver = deliver
        self._keys: list[Hashable] = []
        self._fulls: list[torch.Tensor] = []
        self._held = 0

    def put(self, key: Hashable, full: torch.Tensor) -> None:
        """Queue ``full`` (reduce-scattering what is queued first, when it would pass ``cap``)."""
        if self._fulls and self._held + full.numel() > self.cap:
            self.flush()
        self._keys.append(key)
        self._fulls.append(full)
        self._held += full.numel()

    def flush(self) -> None:
        """Reduce-scatter what is queued and deliver the pieces."""
        if not self._fulls:
            return
        keys, fulls = self._keys, self._fulls
        self._keys, self._fulls, self._held = [], [], 0
        pieces = self.collective.sum_scatter_dim0_many(fulls)
        del fulls
        for key, piece in zip(keys, pieces):
            self.deliver(key, piece)
