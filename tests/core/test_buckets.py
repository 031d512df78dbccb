"""Bucketed collectives: one reduce-scatter for many tensors gives each rank the rows one per tensor gives.

The ranks are Python threads; ``reduce_scatter_tensor`` sums every rank's send buffer (in
rank order) and hands rank r its r-th equal part, as ``torch.distributed`` does. The two-rank
FSDP2 run (tests/distributed/test_fsdp.py) checks the metrics built on these against one
process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.linalg.test_hvp import run_ranks as run_thread_ranks
from uma_callbacks.core.buckets import BUCKET_FLOOR_ENTRIES, ScatterQueue, bucket_cap, buckets, full_from_pieces
from uma_callbacks.core.distributed import Collective, scatter_dim0_many


class ThreadDist:
    """``torch.distributed.reduce_scatter_tensor`` for one of R thread ranks; counts its calls."""

    def __init__(self, rank: int, world: int, shared: dict[str, Any]) -> None:
        self.rank, self.world, self.shared = rank, world, shared
        self.calls = 0

    def reduce_scatter_tensor(self, out: torch.Tensor, send: torch.Tensor) -> None:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = send.clone()
        barrier.wait()
        total = sum(slots[r] for r in range(self.world))
        barrier.wait()
        out.copy_(total.view(self.world, -1)[self.rank])
        self.calls += 1


class ThreadScatter(Collective):
    """A collective whose reduce-scatters go through :class:`ThreadDist`."""

    def __init__(self, dist: ThreadDist) -> None:
        self.dist, self.rank, self.world_size = dist, dist.rank, dist.world

    def sum_scatter_dim0_many(self, fulls):
        return scatter_dim0_many(fulls, self.rank, self.world_size, self.dist, None)


def run_ranks(world: int, fn: Callable[[ThreadDist], Any]) -> list[Any]:
    """``fn(dist)`` on ``world`` thread ranks (test_hvp's threads, their barrier and slots shared)."""
    return run_thread_ranks(world, lambda rank, coll: fn(ThreadDist(rank, world, coll._shared)))


def rank_tensors(rank: int) -> list[torch.Tensor]:
    """Each rank's full-size tensors: odd row counts, a 0-d, an empty one, two dtypes."""
    g = torch.Generator().manual_seed(rank)
    return [
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn((), generator=g, dtype=torch.float64),
        torch.randn(1, generator=g, dtype=torch.float32),
        torch.randn(4, generator=g, dtype=torch.float64),
        torch.zeros(0, 2, dtype=torch.float64),
        torch.randn(7, 2, 2, generator=g, dtype=torch.float32),
    ]


def chunk_rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """FSDP2's Shard(0) piece: rows [r * ceil(d0 / R), ...) of the full tensor, ``torch.chunk`` sizes."""
    x = full.reshape(1) if full.dim() == 0 else full
    step = -(-x.shape[0] // world)
    return x[rank * step : (rank + 1) * step]


@pytest.mark.parametrize("world", [2, 3])
def test_one_reduce_scatter_per_dtype_gives_every_rank_its_rows_of_the_sum(world):
    def rank_fn(dist: ThreadDist):
        return scatter_dim0_many(rank_tensors(dist.rank), dist.rank, world, dist, None), dist.calls

    results = run_ranks(world, rank_fn)
    totals = [sum(rank_tensors(r)[i] for r in range(world)) for i in range(len(rank_tensors(0)))]
    for rank, (pieces, calls) in enumerate(results):
        assert calls == 2  # float64 and float32: one reduce-scatter each
        assert len(pieces) == len(totals)
        for piece, total in zip(pieces, totals):
            want = chunk_rows(total, rank, world)
            assert piece.dtype == total.dtype and piece.shape == want.shape
            assert torch.equal(piece, want)


def test_queue_scatters_in_buckets_of_cap_entries_and_delivers_in_order():
    def rank_fn(dist: ThreadDist):
        got: list[tuple[str, torch.Tensor]] = []
        queue = ScatterQueue(ThreadScatter(dist), cap=7, deliver=lambda key, piece: got.append((key, piece)))
        g = torch.Generator().manual_seed(dist.rank)
        for key, size in (("a", 4), ("b", 3), ("c", 5), ("d", 9)):
            queue.put(key, torch.randn(size, generator=g, dtype=torch.float64))
        queue.flush()
        queue.flush()  # nothing queued: no collective
        return got, dist.calls

    (got0, calls0), (got1, calls1) = run_ranks(2, rank_fn)
    assert calls0 == calls1 == 3  # [a, b], [c], [d]: d alone passes the cap
    assert [key for key, _ in got0] == ["a", "b", "c", "d"]
    sums = {}
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        for key, size in (("a", 4), ("b", 3), ("c", 5), ("d", 9)):
            sums[key] = sums.get(key, 0) + torch.randn(size, generator=g, dtype=torch.float64)
    for rank, got in enumerate((got0, got1)):
        for key, piece in got:
            assert torch.equal(piece, chunk_rows(sums[key], rank, 2))


def test_buckets_hold_at_most_the_largest_tensor_or_the_floor():
    params = {"emb": torch.zeros(2 * BUCKET_FLOOR_ENTRIES), "w": torch.zeros(BUCKET_FLOOR_ENTRIES, 1), "b": torch.zeros(3)}
    cap = bucket_cap(params.values())
    assert cap == 2 * BUCKET_FLOOR_ENTRIES
    assert buckets(params, ["w", "b", "emb"], cap) == [["w", "b"], ["emb"]]
    assert buckets(params, ["emb", "w", "b"], BUCKET_FLOOR_ENTRIES) == [["emb"], ["w"], ["b"]]
    assert bucket_cap([torch.zeros(3)]) == BUCKET_FLOOR_ENTRIES


def test_full_from_pieces_of_plain_parameters_is_a_reshape_without_communication():
    class Refuses(Collective):
        def sum_(self, tensors):
            raise AssertionError("plain parameters need no collective")

    params = [torch.zeros(2, 3), torch.zeros(4)]
    pieces = [torch.arange(6.0), torch.arange(4.0)]
    fulls = full_from_pieces(pieces, params, Refuses())
    assert [tuple(f.shape) for f in fulls] == [(2, 3), (4,)]
    assert torch.equal(fulls[0].reshape(-1), pieces[0])
