"""Hessian-vector products by double backward against the dense float64 Hessian."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from tests.cases import TINY_CASES
from tests.oracles import oracle_hessian
from uma_callbacks.core.distributed import Collective
from uma_callbacks.core.model_state import eager_attention
from uma_callbacks.engine.probe import Probe, split_batch
from uma_callbacks.linalg.hvp import HessianOperator, hessian_matrix, split_flat


class ThreadCollective(Collective):
    """Test double for R ranks as R Python threads: ``sum_`` adds every rank's tensors
    (in rank order, so every rank gets the same bits)."""

    def __init__(self, rank: int, world_size: int, shared: dict[str, Any]) -> None:
        self.rank, self.world_size, self._shared = rank, world_size, shared

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        slots[self.rank] = [t.detach().clone() for t in tensors]
        barrier.wait()
        totals = [sum(slots[r][j] for r in range(self.world_size)) for j in range(len(tensors))]
        barrier.wait()
        for t, total in zip(tensors, totals):
            t.copy_(total)


def run_ranks(world_size: int, fn: Callable[[int, Collective], Any]) -> list[Any]:
    """Run ``fn(rank, collective)`` on ``world_size`` threads; return the results by rank."""
    shared = {"slots": [None] * world_size, "barrier": threading.Barrier(world_size, timeout=60)}
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, ThreadCollective(rank, world_size, shared))
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(err)
            shared["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _operator(model, batches, loss_fn, chunk_size=None, **kwargs) -> HessianOperator:
    chunks = [c for b in batches for c in split_batch(b, chunk_size or 10**9)]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    return HessianOperator(model, loss_fn, chunks, params, n, **kwargs)


@pytest.fixture(scope="module")
def mlp_hessian() -> torch.Tensor:
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    return oracle_hessian(model, batches, loss_fn)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("cache_graph", [None, True, False])
def test_hvp_matches_dense_hessian_mlp(chunk_size, cache_graph, mlp_hessian):
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    H = mlp_hessian
    op = _operator(model, batches, loss_fn, chunk_size, cache_graph=cache_graph)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.matvecs == 3
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(hessian_matrix(op), H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("limit", [0, 10**12])
def test_graph_caching_is_decided_on_the_first_chunk(limit, mlp_hessian):
    """``cache_graph=None`` with several chunks: the first chunk's graph is measured and every
    chunk's graph kept when the estimate fits ``graph_bytes_limit`` (then each chunk's
    forward runs once in all, plus one measuring forward; otherwise once per product);
    products are exact either way,
    also when the first call is a product (its backward must keep the graph it caches)."""
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    calls = []

    def counting(m, b):
        calls.append(1)
        return loss_fn(m, b)

    op = _operator(model, batches, counting, chunk_size=2, graph_bytes_limit=limit)
    n_chunks = len(op.chunks)
    assert n_chunks > 1 and op.graph_bytes is None
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), mlp_hessian @ v, rtol=1e-10, atol=1e-12)
    activations = sum(b["x"].numel() for b in batches) * 8  # at least the inputs' bytes are saved
    assert op.graph_bytes >= activations
    assert op.cache_graph is (limit > 0)
    assert len(calls) == 1 + (n_chunks if limit > 0 else 3 * n_chunks)  # 1: the measuring forward


def test_measuring_the_graph_frees_everything():
    """Deciding the caching leaves nothing behind: after ``close()`` every activation of
    every chunk is freed (a pack hook that kept the tensors it saw would tie tanh's output
    to its own node in a cycle Python cannot collect)."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    alive: list[weakref.ref] = []
    model[1].register_forward_hook(lambda _m, _i, out: alive.append(weakref.ref(out)))
    gen = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(6, 3, generator=gen, dtype=torch.float64), "y": torch.randn(6, generator=gen, dtype=torch.float64)}]
    loss_fn = lambda m, b: (m(b["x"]).squeeze(-1) - b["y"]) ** 2  # noqa: E731
    for limit in (0, 10**12):
        op = _operator(model, batches, loss_fn, chunk_size=2, graph_bytes_limit=limit)
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        assert op.cache_graph is (limit > 0)
        op.close()
        del op
        gc.collect()
        assert alive and all(ref() is None for ref in alive), limit


def test_hvp_qwen2_chunking_and_cache_agree():
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64)
    v = torch.randn(
        sum(p.numel() for p in model.parameters()),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    with eager_attention(model):
        ref = _operator(model, batches, loss_fn, cache_graph=True).matvec(v)
        op = _operator(model, batches, loss_fn, chunk_size=2, cache_graph=False)
        torch.testing.assert_close(op.matvec(v), ref, rtol=1e-9, atol=1e-12)
        cached = _operator(model, batches, loss_fn, cache_graph=True)
        torch.testing.assert_close(cached.matvec(v), cached.matvec(v), rtol=0, atol=0)


def test_hvp_sharded_over_two_ranks_equals_one_process():
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64)
    probe = Probe(batches)
    params = dict(model.named_parameters())
    v = torch.randn(
        sum(p.numel() for p in params.values()),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(3),
    )
    with eager_attention(model):
        single = HessianOperator(model, loss_fn, probe.batches, params, probe.n_samples).matvec(v)
    models = [TINY_CASES[1].build(dtype=torch.float64)[0] for _ in range(2)]

    def rank_fn(rank: int, coll: Collective) -> torch.Tensor:
        m = models[rank]
        with eager_attention(m):
            op = HessianOperator(
                m, loss_fn, probe.shard(rank, 2), dict(m.named_parameters()), probe.n_samples, collective=coll
            )
            return op.matvec(v)

    out = run_ranks(2, rank_fn)
    torch.testing.assert_close(out[0], single, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_split_flat_checks_length():
    like = [torch.zeros(2, 3), torch.zeros(4)]
    pieces = split_flat(torch.arange(10.0), like)
    assert [p.shape for p in pieces] == [torch.Size([2, 3]), torch.Size([4])]
    with pytest.raises(ValueError, match="10 entries"):
        split_flat(torch.arange(9.0), like)


def test_operator_rejects_empty_probe():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    with pytest.raises(ValueError, match="n_total"):
        HessianOperator(model, loss_fn, batches, dict(model.named_parameters()), 0)
