"""The planner's per-sample bytes: a backward's own activations (A_b), tied gradients, one tensor's per-sample gradient.

On a GPT-2 (tied word embedding and LM head) the old cost model counted a sample's
activations twice for a backward, the tied gradients' second copy as activations, and half
of P for a per-sample gradient the hooks hold one tensor at a time; at 124M it planned
gradient_flow at about twice its measured peak (bench/scale.py).
"""

from __future__ import annotations

import pytest
import torch

from uma_callbacks.core.losses import resolve_loss_fn
from uma_callbacks.engine.budget import (
    MemoryBudget,
    gradient_bytes,
    largest_param_bytes,
    measure_sample,
    measure_sample_bytes,
    param_bytes,
)
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.metrics.base import Cost


def tied_gpt2():
    """A 2-layer GPT-2 with the real vocabulary (its tied 50257 x 64 embedding is most of P), 8 samples x 32 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64))
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": ids, "labels": ids}]


def test_a_tied_parameter_has_one_gradient_per_use():
    model, _ = tied_gpt2()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    assert gradient_bytes(model) == param_bytes(model) + wte.numel() * wte.element_size()
    assert largest_param_bytes(model) == wte.numel() * wte.element_size()


def test_the_sample_measurement_splits_forward_and_backward():
    model, batches = tied_gpt2()
    loss = resolve_loss_fn(model, None)
    sample = measure_sample(model, loss, batches[0], eager=True)
    assert sample.forward > 0 and sample.backward >= 0
    assert sample.activations == max(sample.forward, sample.backward)
    # the tied embedding's second gradient (12 MiB) is not taken for activations
    assert sample.backward < largest_param_bytes(model)
    assert measure_sample_bytes(model, loss, batches[0], eager=True) > 0


def test_cost_counts_the_backward_measured_and_the_largest_tensor():
    cost = Cost(per_sample_grads=True, per_sample_grad_fraction=0.5, per_sample_grad_by_tensor=True, param_copies=1.0)
    # unknown A_b and tensor sizes: the old reading, 0.5 P + 2 A
    assert cost.bytes_needed(1000, 100, 2) - cost.bytes_needed(1000, 100, 0) == 2 * (500 + 200)
    known = {"backward_sample_bytes": 30, "largest_param_bytes": 200}
    assert cost.bytes_needed(1000, 100, 2, **known) - cost.bytes_needed(1000, 100, 0, **known) == 2 * (200 + 100 + 30)
    forward_only = Cost(forward_only=True)
    assert forward_only.bytes_needed(1000, 100, 1, **known) == 100  # no backward: A_b does not count
    hvp = Cost(hvp=True)
    assert hvp.bytes_needed(1000, 100, 1, **known) == 100 + 100 + 30  # the kept graph still counts A


def test_plan_reads_the_backward_bytes_and_the_largest_tensor():
    budget = MemoryBudget(max_bytes=10_000)
    plan = budget.plan(GradientFlow(), 1000, 100, 64, "cpu", n_params=250, backward_sample_bytes=0, largest_param_bytes=300)
    assert plan.per_sample_bytes == 300 + 100
    assert plan.fixed_bytes == 2000  # grad_sum and the chunk's per-tensor sums
    assert plan.chunk_size == (10_000 - 2000) // 400


_PLAN_RATIO = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.engine.test_budget_per_sample import tied_gpt2
from uma_callbacks.engine.budget import MemoryBudget, compute_within_budget
from uma_callbacks.metrics import GradientFlow
model, batches = tied_gpt2()
ratios = []
for _ in range({calls}):
    meta = compute_within_budget(GradientFlow(), model, batches, None, MemoryBudget(max_gb=6, max_batch_size={chunk})).meta
    ratios.append([meta["chunk_size"], meta["planned_peak_bytes"] / meta["peak_bytes"]])
print(json.dumps(ratios))
"""


def _plan_ratios(chunk: int, calls: int) -> list[list[float]]:
    """``[[chunk, planned / measured peak]]`` of ``calls`` plans in a fresh process (the first plan
    a training makes: no allocation of an earlier computation in this process to reuse)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    code = _PLAN_RATIO.format(repo=repo, chunk=chunk, calls=calls)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("chunk", [2, 8])
def test_gradient_flow_plan_on_a_tied_gpt2_is_within_a_quarter_of_its_peak(chunk):
    [[planned_chunk, ratio]] = _plan_ratios(chunk, calls=1)
    assert planned_chunk == chunk
    assert 0.8 <= ratio <= 1.25, ratio


@pytest.mark.xfail(
    reason="known: in a process that has computed before, the calibration measures a sample's "
    "forward at about 7 MB instead of 17 MB and the plan falls to 0.65-0.83 of the peak (the "
    "memory budget's margin covers it); the cost model needs the steady-state bytes",
    strict=False,
)
def test_gradient_flow_plan_stays_within_a_quarter_at_the_next_save():
    ratios = _plan_ratios(8, calls=2)
    assert all(0.8 <= ratio <= 1.25 for _, ratio in ratios), ratios
