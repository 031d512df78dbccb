"""Memory budget: planned chunks, peaks under the budget, OOM fallback, skips, chunk-invariant results."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from tests.metrics.test_contract import SMALL, _build
from uma_callbacks.engine.budget import MemoryBudget, PeakMemory, compute_within_budget, param_bytes
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import METRICS, GradientFlow


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
    (mode, cost), = metric.memory_modes()
    fixed = cost.bytes_needed(p, 1000, 0)
    per_sample = cost.bytes_needed(p, 1000, 1) - fixed
    budget = MemoryBudget(max_bytes=fixed + 5 * per_sample + 10)  # room for exactly 5 samples
    plan = budget.plan(metric, p, 1000, largest_chunk=64)
    assert plan.chunk_size == 5 and plan.mode == mode
    assert budget.plan(metric, p, 1000, largest_chunk=3).chunk_size == 3


def test_impossible_budget_is_a_skip_with_the_reason():
    plan = MemoryBudget(max_bytes=1000).plan(GradientFlow(), 10**6, 10**4, largest_chunk=8)
    assert plan.chunk_size is None and "too small for gradient_flow" in plan.reason


#: Peak tolerance of the CPU measurement: the measured extra peak (VmHWM above the resident
#: set at entry, in a child process where glibc serves and returns every block >= 64 KiB by
#: mmap, so the resident set follows the live tensors) may exceed the budget by 10% + 4 MiB:
#: the cost model leaves out per-tensor temporaries (a square, a cast, a sum) and torch's
#: small-allocation caches, which a real budget's margin absorbs.
PEAK_TOLERANCE = (1.10, 4 * 2**20)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


#: small settings for the peak test (the Hessian's trace needs only two probes here, and its
#: Lanczos four products: each product's memory is what the budget plans)
PEAK_SETTINGS = {
    **SMALL,
    "hessian": {"top_k": 2, "hutchinson_samples": 2, "max_iter": 4},
    "fisher": {"top_k": 2, "max_matvecs": 8},
}


class SeqWide(Wide):
    """:class:`Wide` applied to each of T positions: activations of one sample (about
    T x 5 KiB) are large enough to be measured."""


def seq_case(n=24, length=64):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(n, length, 256, generator=gen), "y": torch.randint(0, 10, (n, length), generator=gen)}
    return SeqWide(), [batch], seq_loss


def seq_loss(model, batch):
    logits = model(batch["x"])
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none").mean(1)


def _metric(name, model):
    metric = METRICS[name](**PEAK_SETTINGS.get(name, {}))
    if name == "interpolation":
        metric.set_previous({n: p.detach().clone() + 0.01 for n, p in model.named_parameters()})
    return metric


def _tight_budget(metric, model, batches, loss_fn, samples=4):
    """A budget that fits the metric's fastest mode with about ``samples`` samples a chunk."""
    from uma_callbacks.engine.budget import measure_sample_bytes

    sample = measure_sample_bytes(model, loss_fn, batches[0])
    n = sum(p.numel() for p in model.parameters())
    sizes = {"n_params": n, "n_samples": sum(b["x"].shape[0] for b in batches)}
    cost = metric.memory_modes()[0][1]
    fixed = cost.bytes_needed(param_bytes(model), sample, 0, **sizes)
    per = cost.bytes_needed(param_bytes(model), sample, 1, **sizes) - fixed
    return MemoryBudget(max_bytes=int(fixed + (samples + 0.5) * per) + 1)


#: Metrics that run on any model (the peak check's plain ``nn.Module``); the transformer
#: families (attention, circuits, representations, information, modularity) need blocks.
ANY_MODEL = ("fisher", "gradient_flow", "hessian", "interpolation", "landscape", "pruning")


def child_peaks() -> None:
    """Child process: for each metric, print ``name chunk peak budget mode`` under a tight budget."""
    torch.set_num_threads(1)
    for name in ANY_MODEL:
        model, batches, loss_fn = seq_case()
        _metric(name, model).compute(model, batches, loss_fn, chunk_size=2)  # warm-up (torch.func, allocator)
        metric = _metric(name, model)
        budget = _tight_budget(metric, model, batches, loss_fn)
        started = time.perf_counter()
        result = compute_within_budget(metric, model, batches, loss_fn, budget)
        print(f"# {name} {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(name, result.meta["chunk_size"], result.meta["peak_bytes"], budget.max_bytes, result.meta["memory_mode"])


def test_small_budget_runs_small_chunks_and_peak_stays_under_it():
    import subprocess
    import sys

    env = {**__import__("os").environ, **MEMORY_ENV}
    out = subprocess.run(
        [sys.executable, "-c", "from tests.engine.test_budget import child_peaks; child_peaks()"],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split() and line.split()[0] in METRICS}
    assert sorted(rows) == sorted(ANY_MODEL), out
    for name, (chunk, peak, budget, mode) in rows.items():
        assert 1 <= int(chunk) <= 12, (name, chunk)  # the tight budget binds (probe of 24)
        assert int(peak) <= PEAK_TOLERANCE[0] * int(budget) + PEAK_TOLERANCE[1], (name, int(peak) / int(budget), mode)


def test_fisher_cost_counts_the_lanczos_basis_and_the_cache(monkeypatch):
    monkeypatch.setattr("uma_callbacks.metrics.fisher.GRAM_MAX_ROWS", 0)  # the Lanczos path's accounting
    model, batches, loss_fn = wide_case()
    n = sum(p.numel() for p in model.parameters())
    P = param_bytes(model)
    modes = dict(METRICS["fisher"](top_k=2).memory_modes())
    cached = modes["cached"].bytes_needed(P, 0, 0, n_params=n, n_samples=64)
    streamed = modes["streamed"].bytes_needed(P, 0, 0, n_params=n, n_samples=64)
    assert streamed >= 32 * P  # 32 float32 Lanczos vectors
    assert cached - streamed == 64 * P  # the cached rows
    cpu = modes["streamed_cpu_basis"]
    assert cpu.bytes_needed(P, 0, 0, n_params=n, on_host=False) < streamed - 30 * P
    no_spectrum = dict(METRICS["fisher"](top_k=None).memory_modes())["streamed"]
    assert no_spectrum.bytes_needed(P, 0, 0, n_params=n) < 6 * P


def test_memory_mode_is_not_part_of_the_config():
    for name in sorted(METRICS):
        metric = METRICS[name](**SMALL.get(name, {}))
        before = metric.config()
        for mode, _ in metric.memory_modes():
            metric.use_memory_mode(mode)
            assert metric.config() == before, (name, mode)


def test_tight_budget_picks_lean_landscape_and_streamed_fisher_with_the_same_values(monkeypatch):
    monkeypatch.setattr("uma_callbacks.metrics.fisher.GRAM_MAX_ROWS", 0)  # the Lanczos path's accounting
    model, batches, loss_fn = wide_case(n=24)
    n = sum(p.numel() for p in model.parameters())
    P = param_bytes(model)
    # Fisher with an uncapped Lanczos: streamed mode takes Lanczos products (cached mode the exact
    # Gram), which agree to 1e-6 once Lanczos has converged, not at a cap of 8 products
    settings = {**PEAK_SETTINGS, "fisher": {"top_k": 2}}
    rel = {"landscape": 1e-6, "fisher": 2e-5}  # a float32 model: Lanczos vs the Gram agree to float32 accuracy
    for name, lean_mode in (("landscape", "lean"), ("fisher", "streamed")):
        fast = METRICS[name](**settings.get(name, {}))
        fast_result = compute_within_budget(fast, model, batches, loss_fn, MemoryBudget(max_gb=64))
        assert fast_result.meta["memory_mode"] == fast.memory_modes()[0][0]
        lean = METRICS[name](**settings.get(name, {}))
        sizes = {"n_params": n, "n_samples": 24}
        # just below the fast mode's fixed part (measured activations are a few KiB here)
        budget = MemoryBudget(max_bytes=lean.memory_modes()[0][1].bytes_needed(P, 0, 0, **sizes) - 1)
        assert dict(lean.memory_modes())[lean_mode].bytes_needed(P, 2**16, 8, **sizes) < budget.max_bytes
        lean_result = compute_within_budget(lean, model, batches, loss_fn, budget)
        assert lean_result.meta["memory_mode"] == lean_mode, name
        for key, value in fast_result.scalars.items():
            assert lean_result.scalars[key] == pytest.approx(value, rel=rel[name], abs=1e-9), (name, key)
        for key, value in fast_result.arrays.items():
            if key == "gram_eigenvalues":  # all N eigenvalues: only the Gram method has them
                continue
            assert lean_result.arrays[key] == pytest.approx(value, rel=rel[name], abs=1e-9), (name, key)


def test_impossible_budget_skips_with_the_reason_and_training_goes_on(tmp_path):
    from tests.trainer_cases import run_trainer, tiny_lm_dataset
    from uma_callbacks import UMACallback

    cb = UMACallback(
        metrics=["gradient_flow", "landscape"],
        probe=tiny_lm_dataset(n=8, seed=1),
        probe_size=8,
        memory_budget=MemoryBudget(max_bytes=4096),
    )
    trainer, losses = run_trainer(tmp_path / "out", callbacks=[cb], max_steps=3, save_steps=3)
    assert trainer.state.global_step == 3 and len(losses) == 3
    assert [(r.metric, r.status) for r in cb.records] == [("gradient_flow", "skipped"), ("landscape", "skipped")]
    assert all("memory budget 0.0 MiB is too small" in r.error["message"] for r in cb.records)
    assert {r.metric for r in Journal(tmp_path / "out" / "uma").records() if r.status == "skipped"} == {
        "gradient_flow", "landscape"
    }


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
    from uma_callbacks.engine.budget import is_out_of_memory

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


#: fewer stochastic draws where they only repeat the chunked products (the Hessian's 50
#: Hutchinson probes, the density's 4 x 16 Lanczos steps): the chunking is the same in each
CHUNK_SETTINGS = {
    "hessian": {"top_k": 2, "hutchinson_samples": 4},
    "hessian_density": {"n_vectors": 2, "n_steps": 8},
}


def _chunk_build(name, model):
    return METRICS[name](**CHUNK_SETTINGS[name]) if name in CHUNK_SETTINGS else _build(name, model)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_results_identical_whatever_the_chunk(name):
    from tests.cases import qwen2_case
    from tests.metrics.test_contract import _history, _optimizer

    model, batches, loss_fn = qwen2_case(dtype=torch.float64)
    history, optimizer = _history(model), _optimizer(name, model)
    whole = _chunk_build(name, model).compute(model, batches, loss_fn, history=history, **optimizer)
    chunked = _chunk_build(name, model).compute(model, batches, loss_fn, chunk_size=1, history=history, **optimizer)
    assert chunked.meta["chunk_size"] == 1
    # an iterative spectrum agrees to its solver's accuracy (the Hessian's Lanczos stops at a
    # relative residual of ~1e-4 here, so its eigenvalues move by ~1e-6 with the summation order)
    spectral = {"top_eigenvalue", "top_k_effective_rank", "top_k_condition_number"} if name == "hessian" else set()
    for key, value in whole.scalars.items():
        rel = 1e-4 if key in spectral else 1e-6
        assert chunked.scalars[key] == pytest.approx(value, rel=rel, abs=1e-12, nan_ok=True), key


def test_peak_memory_meter_sees_an_allocation():
    # a tensor, as metrics allocate, still held when the meter stops (it reads once more
    # then): counted whether glibc hands out fresh pages or pages kept from an earlier test
    with PeakMemory("cpu") as meter:
        block = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB
    del block
    assert meter.peak_bytes >= 32 * 2**20


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_gb": 0}, "max_gb"), ({"max_bytes": -1}, "max_bytes"), ({"margin": 1.5}, "margin"),
     ({"min_batch_size": 0}, "min_batch_size"), ({"min_batch_size": 8, "max_batch_size": 4}, "max_batch_size")],
)
def test_bad_budget(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MemoryBudget(**kwargs)


def test_unified_config_maps_onto_the_budget():
    from uma_callbacks import UnifiedConfig

    budget = UnifiedConfig(max_memory_gb=2, min_batch_size=2, max_batch_size=16, adaptive_batch_sizing=False).to_uma()[
        "memory_budget"
    ]
    assert (budget.max_bytes, budget.min_batch_size, budget.max_batch_size) == (2 * 2**30, 2, 16)
    assert budget.adaptive_batch_sizing is False
    with pytest.raises(ValueError, match="UnifiedConfig.max_batch_size"):
        UnifiedConfig(min_batch_size=8, max_batch_size=4)


def test_probe_batch_below_min_batch_size_runs_whole():
    plan = MemoryBudget(max_gb=1, min_batch_size=4).plan(GradientFlow(), 10**4, 100, largest_chunk=2)
    assert plan.chunk_size == 2


def test_budget_below_one_whole_gradient_picks_grouped_fisher(monkeypatch):
    """When not even one sample's gradient of the whole model fits beside the rest, the plan
    picks Fisher's per-parameter-group mode, which gives the same numbers."""
    monkeypatch.setattr("uma_callbacks.metrics.fisher.GRAM_MAX_ROWS", 0)  # the Lanczos path's accounting
    model, batches, loss_fn = wide_case(n=12)
    n = sum(p.numel() for p in model.parameters())
    P = param_bytes(model)
    sizes = {"n_params": n, "n_samples": 12}
    fisher = METRICS["fisher"](top_k=2)
    modes = dict(fisher.memory_modes())
    limit = modes["grouped"].bytes_needed(P, 0, 2, **sizes) + 2**10  # grouped fits 2 samples, no other mode 1
    assert all(modes[m].bytes_needed(P, 0, 1, **sizes) > limit for m in modes if m != "grouped")
    plan = MemoryBudget(max_bytes=limit).plan(fisher, P, 0, largest_chunk=12, n_params=n, n_samples=12)
    assert (plan.mode, plan.chunk_size) == ("grouped", 2)
    fisher.use_memory_mode(plan.mode)
    grouped = fisher.compute(model, batches, loss_fn, chunk_size=plan.chunk_size)
    assert grouped.meta["memory_mode"] == "grouped"
    fast = METRICS["fisher"](top_k=2).compute(model, batches, loss_fn)
    for key, value in fast.scalars.items():
        assert grouped.scalars[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert grouped.arrays["top_eigenvalues"] == pytest.approx(fast.arrays["top_eigenvalues"], rel=1e-5)


# ---------------------------------------------------------------------------- per-rank (FSDP2)
def _tiny_qwen():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return Qwen2ForCausalLM(config).double()


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo process group (FSDP2 needs one), torn down after the test."""
    dist = pytest.importorskip("torch.distributed")
    pytest.importorskip("torch.distributed.fsdp")
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_rank_param_bytes_of_a_plain_model_is_the_whole_model():
    from uma_callbacks.engine.budget import rank_param_bytes

    model = Wide()
    sizes = rank_param_bytes(model)
    assert sizes.held == sizes.full == param_bytes(model) and sizes.gathered == 0 and not sizes.sharded
    assert sizes.held_entries == sizes.full_entries == sum(p.numel() for p in model.parameters())


def test_rank_param_bytes_of_fully_shard_is_the_shard_plus_the_largest_unit(one_rank_group):
    """On a model wrapped per decoder layer and at the root, the gathered block is the largest
    unit's full parameters: a decoder layer, or the root's own (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    from uma_callbacks.engine.budget import rank_param_bytes

    plain = _tiny_qwen()
    layer = sum(p.numel() * 8 for p in plain.model.layers[0].parameters())
    root = param_bytes(plain) - sum(p.numel() * 8 for p in plain.model.layers.parameters())
    model = _tiny_qwen()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    sizes = rank_param_bytes(model)
    assert sizes.sharded and sizes.full == param_bytes(plain)
    assert sizes.held == sizes.full  # one rank holds every shard
    assert sizes.gathered == max(layer, root)


def test_planned_fixed_bytes_count_the_shard_and_one_gathered_block():
    """A fake plan: 2 ranks each hold half the parameters; FSDP gathers a block of 1/4.
    Copies and vectors are priced on the shard, plus the block once; the extra (a
    Lanczos-like basis, replicated on the sharded path today) and the per-sample term stay
    on the full parameters."""
    from uma_callbacks.engine.budget import RankParamBytes, planned_bytes
    from uma_callbacks.metrics.base import Cost

    full, entries, sample = 8_000, 2_000, 100
    cost = Cost(per_sample_grads=True, param_copies=2.0, vectors=1.0, vector_itemsize=8, fixed_bytes=7,
                extra_bytes=lambda n, itemsize, n_samples: int(3 * n * itemsize))  # fmt: skip
    sizes = {"n_params": entries, "n_samples": 4, "on_host": True}
    one = RankParamBytes(held=full, held_entries=entries, full=full, full_entries=entries, gathered=full // 4)
    two = RankParamBytes(held=full // 2, held_entries=entries // 2, full=full, full_entries=entries, gathered=full // 4)
    plain_fixed, plain_per_sample = planned_bytes(cost, full, sample, sizes)
    assert plain_fixed == 2 * full + entries * 8 + 3 * full + 7  # copies + a float64 vector + the extra + fixed
    fixed = {}
    for ranks in (one, two):
        fixed[ranks.held], per_sample = planned_bytes(cost, full, sample, sizes, ranks)
        assert fixed[ranks.held] == 2 * ranks.held + ranks.held_entries * 8 + 3 * full + 7 + full // 4
        assert per_sample == plain_per_sample == full + 2 * sample
    assert fixed[full // 2] < fixed[full] and fixed[full] == plain_fixed + full // 4
    plan = MemoryBudget(max_bytes=10**9).plan(GradientFlow(), full, sample, 8, n_params=entries, sharding=two)
    assert plan.fixed_bytes < MemoryBudget(max_bytes=10**9).plan(GradientFlow(), full, sample, 8, n_params=entries).fixed_bytes


def test_budget_plans_a_sharded_model_and_leaves_it_untouched(one_rank_group):
    """compute_within_budget on a fully_shard-ed model: the sample bytes are measured through
    FSDP's forward/backward, the plan's meta names the shard and the gathered block, the
    value equals the plain model's and no gradient is left on the shards."""
    from torch.distributed.fsdp import fully_shard

    plain = _tiny_qwen()
    model = _tiny_qwen()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids}]
    budget = MemoryBudget(max_bytes=2**30)
    sharded = compute_within_budget(GradientFlow(), model, batches, None, budget)
    want = compute_within_budget(GradientFlow(), plain, batches, None, budget)
    assert sharded.meta["planned_shard_bytes"] == param_bytes(plain)
    assert 0 < sharded.meta["planned_gathered_bytes"] < param_bytes(plain)
    assert sharded.meta["measured_sample_bytes"] > 0
    assert sharded.scalars["total_norm"] == pytest.approx(want.scalars["total_norm"], rel=1e-10)
    assert all(p.grad is None for p in model.parameters())
