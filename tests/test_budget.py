"""Memory budget: planned chunks, peaks under the budget, OOM fallback, skips, chunk-invariant results."""

from __future__ import annotations

import pytest
import torch

from tests.metrics.test_contract import SMALL, _build
from uma_callbacks.budget import BudgetExceeded, MemoryBudget, PeakMemory, compute_within_budget, param_bytes
from uma_callbacks.journal import Journal
from uma_callbacks.metrics import METRICS, GradientFlow
from uma_callbacks.probe import Probe
from uma_callbacks.suite import MetricSuite


class Wide(torch.nn.Module):
    """256 -> 512 -> 512 -> 10 (about 400k parameters, 1.6 MB in float32)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 10)
        )

    def forward(self, x):
        return self.net(x)


def ce_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def wide_case(n=64, dtype=torch.float32):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(n, 256, generator=gen, dtype=dtype), "y": torch.randint(0, 10, (n,), generator=gen)}
    return Wide().to(dtype), [batch], ce_loss


def test_plan_picks_the_largest_chunk_that_fits():
    metric = GradientFlow()
    p = 1_000_000
    budget = MemoryBudget(max_bytes=p * 1 + 5 * (p + 2 * 1000) + 10)
    plan = budget.plan(metric, p, 1000, largest_chunk=64)
    assert plan.chunk_size == 5 and plan.mode == "default"
    assert budget.plan(metric, p, 1000, largest_chunk=3).chunk_size == 3


def test_impossible_budget_is_a_skip_with_the_reason():
    plan = MemoryBudget(max_bytes=1000).plan(GradientFlow(), 10**6, 10**4, largest_chunk=8)
    assert plan.chunk_size is None and "too small for gradient_flow" in plan.reason


@pytest.mark.parametrize("name", ["gradient_flow", "fisher"])
def test_small_budget_runs_small_chunks_and_peak_stays_under_it(name):
    model, batches, loss_fn = wide_case()
    P = param_bytes(model)
    metric = METRICS[name](**SMALL.get(name, {}))
    cost = metric.memory_modes()[0][1]
    # a budget that fits the fixed part and about 8 samples of per-sample gradients
    budget = MemoryBudget(max_bytes=int(cost.bytes_needed(P, 0, 0) + 8 * (P + 2 * 200_000)))
    METRICS[name](**SMALL.get(name, {})).compute(model, batches, loss_fn, chunk_size=2)  # one-time torch.func warm-up
    result = compute_within_budget(metric, model, batches, loss_fn, budget)
    assert 1 <= result.meta["chunk_size"] <= 16
    # measured extra peak (process RSS high-water mark) within the budget, 25% + 8 MiB tolerance
    assert result.meta["peak_bytes"] <= 1.25 * budget.max_bytes + 8 * 2**20
    unbounded = METRICS[name](**SMALL.get(name, {})).compute(model, batches, loss_fn)
    assert unbounded.meta["peak_bytes"] > result.meta["peak_bytes"] or unbounded.meta["chunk_size"] == result.meta["chunk_size"]


class OOMAbove16(GradientFlow):
    """Raises the accelerator's OOM error for chunks above 16 samples (injected fault)."""

    def _compute(self, ctx):
        if ctx.chunk_size > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super()._compute(ctx)


def test_oom_at_32_succeeds_at_16_with_one_retry():
    model, batches, loss_fn = wide_case(n=32)
    result = compute_within_budget(OOMAbove16(), model, batches, loss_fn, MemoryBudget(max_gb=64), chunk_size=32)
    assert result.meta["chunk_size"] == 16 and result.meta["retries"] == 1
    reference = GradientFlow(chunk_size=16).compute(model, batches, loss_fn)
    assert result.scalars == reference.scalars


def test_oom_below_min_batch_size_is_a_skip(tmp_path):
    model, batches, loss_fn = wide_case(n=32)
    suite = MetricSuite(
        metrics=[OOMAbove16(), GradientFlow()],
        journal=Journal(tmp_path),
        loss_fn=loss_fn,
        budget=MemoryBudget(max_gb=64, min_batch_size=20),
        chunk_sizes={"gradient_flow": 32},
        draw_figures=False,
    )
    records = suite.run(model, Probe(batches), step=1)
    assert records[0].status == "skipped" and "ran out of memory at chunk 32" in records[0].error["message"]
    assert records[1].status == "ok"  # the fault was injected into the first metric only
    assert records[0].error["type"] == "BudgetExceeded"


def test_cpu_allocation_failure_is_recognised():
    from uma_callbacks.budget import is_out_of_memory

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_results_identical_whatever_the_chunk(name):
    from tests.cases import qwen2_case

    model, batches, loss_fn = qwen2_case(dtype=torch.float64)
    whole = _build(name, model).compute(model, batches, loss_fn)
    chunked = _build(name, model).compute(model, batches, loss_fn, chunk_size=1)
    assert chunked.meta["chunk_size"] == 1
    for key, value in whole.scalars.items():
        assert chunked.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_peak_memory_meter_sees_an_allocation():
    with PeakMemory("cpu") as meter:
        block = torch.ones(64 * 2**20 // 4)
        block += 1
    assert meter.peak_bytes >= 32 * 2**20


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_gb": 0}, "max_gb"), ({"max_bytes": -1}, "max_bytes"), ({"margin": 1.5}, "margin"),
     ({"min_batch_size": 0}, "min_batch_size"), ({"min_batch_size": 8, "max_batch_size": 4}, "max_batch_size")],
)
def test_bad_budget(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MemoryBudget(**kwargs)
