"""The planner's per-sample bytes: a backward's own activations (A_b), tied gradients, one tensor's per-sample gradient.

On a GPT-2 (tied word embedding and LM head) the old cost model counted a sample's
activations twice for a backward, the tied gradients' second copy as activations, and half
of P for a per-sample gradient the hooks hold one tensor at a time; at 124M it planned
gradient_flow at about twice its measured peak (bench/scale.py).

A sample is measured by counting its tensors (``TensorBytes``), so a later save plans what
the first did: sampled, the one-sample forward read 17 MB in a fresh process and 7 MB in one
that had computed before (its transients, shorter than the sampling interval, missed), and
the plan fell to 0.65 of the peak. The Fisher's plan counts its per-layer factors (F,
measured), the chunks it keeps only when there are several, its diagonal only when asked.
"""

from __future__ import annotations

import pytest
import torch

from uma_callbacks.core.losses import resolve_loss_fn
from uma_callbacks.engine.budget import (
    MemoryBudget,
    compute_within_budget,
    gradient_bytes,
    largest_param_bytes,
    measure_factors,
    measure_sample,
    measure_sample_bytes,
    param_bytes,
)
from uma_callbacks.metrics import FisherInformation, GradientFlow
from uma_callbacks.metrics.base import Cost, SaveResults
from uma_callbacks.metrics.fisher import WORKSPACE_BYTES


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


_PLAN_RATIOS = """
import json, os, sys
sys.path.insert(0, {repo!r})
from tests.engine.test_budget_per_sample import tied_gpt2  # torch and transformers' GPT-2, imported once
from uma_callbacks.engine.budget import MemoryBudget, compute_within_budget
from uma_callbacks.metrics import METRICS

def saves(metric, chunks):
    model, batches = tied_gpt2()
    out = []
    for chunk in chunks:
        meta = compute_within_budget(METRICS[metric](), model, batches, None, MemoryBudget(max_gb=6, max_batch_size=chunk)).meta
        out.append([meta["chunk_size"], meta["planned_peak_bytes"] / meta["peak_bytes"], meta["measured_sample_bytes"]])
    return out

ratios = {{}}
for metric, chunks in {runs!r}.items():  # each in a child forked before anything was computed
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        with os.fdopen(write, "w") as pipe:
            pipe.write(json.dumps(saves(metric, chunks)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        ratios[metric] = json.loads(pipe.read())
    assert os.waitpid(pid, 0)[1] == 0, metric
print(json.dumps(ratios))
"""

#: The saves of each metric: the most samples a chunk may take at each.
PLAN_RUNS = {"gradient_flow": [8, 8, 8, 2], "fisher": [8, 8, 2, 2, 1, 1]}


@pytest.fixture(scope="module")
def plan_ratios() -> dict[str, list[list[float]]]:
    """``{metric: [[chunk, planned / measured peak, measured sample bytes]]}`` of one save at each
    of :data:`PLAN_RUNS`'s chunks, one after the other in a process that had computed nothing
    before: the first is the first plan a training makes (no allocation of an earlier
    computation to reuse), the next ones are later saves. One interpreter imports torch and
    transformers; each metric runs in a child forked from it before anything was computed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    code = _PLAN_RATIOS.format(repo=repo, runs=PLAN_RUNS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gradient_flow_plan_on_a_tied_gpt2_is_within_a_quarter_of_its_peak_at_every_save(plan_ratios):
    """The first save, and the saves after it, which plan from the same sample bytes (counted,
    not sampled: sampled, they fell to 0.65 of the peak at the second save)."""
    saves = plan_ratios["gradient_flow"]
    assert [chunk for chunk, _, _ in saves] == [8, 8, 8, 2]
    assert len({sample for _, _, sample in saves}) == 1, saves
    assert all(0.8 <= ratio <= 1.25 for _, ratio, _ in saves), saves


def test_fisher_plan_on_a_tied_gpt2_is_within_a_quarter_and_never_under_its_peak(plan_ratios):
    """One chunk of 8 (nothing kept but the chunk) and several (the factors of the chunks kept
    for the Gram's blocks between them), each at a first save and the next."""
    saves = plan_ratios["fisher"]
    assert [chunk for chunk, _, _ in saves] == [8, 8, 2, 2, 1, 1]
    assert all(1.0 <= ratio <= 1.25 for _, ratio, _ in saves), saves


def test_the_sample_bytes_are_the_same_after_a_computation():
    """A forward lasting milliseconds, counted: the same bytes in a process that computed before."""
    model, batches = tied_gpt2()
    loss = resolve_loss_fn(model, None)
    first = measure_sample(model, loss, batches[0], eager=True)
    compute_within_budget(GradientFlow(), model, batches, None, MemoryBudget(max_gb=6))
    assert measure_sample(model, loss, batches[0], eager=True) == first
    # the logits [32, V] and their log-softmax are alive together at the forward's peak
    assert first.forward >= 2 * 32 * model.config.vocab_size * 4


def test_the_factor_bytes_hold_the_tied_embeddings_dense_gradient():
    model, batches = tied_gpt2()
    factors = measure_factors(model, resolve_loss_fn(model, None), batches[0], eager=True)
    assert largest_param_bytes(model) < factors.held < 2 * largest_param_bytes(model)
    assert factors.peak >= factors.held


def test_fisher_plans_its_diagonal_only_when_asked():
    """The diagonal's accumulators count with keep_diagonal, or when a later metric of the save
    asks for it; the top eigenvector's vectors only when asked."""
    model, batches = tied_gpt2()
    budget = MemoryBudget(max_gb=6)

    def fixed(metric, requested=()):
        results = SaveResults(requested=frozenset(requested)) if requested else None
        meta = compute_within_budget(metric, model, batches, None, budget, results=results).meta
        return meta["planned_fixed_bytes"]

    n = sum(p.numel() for p in model.parameters())
    plain = fixed(FisherInformation())
    assert plain == WORKSPACE_BYTES  # one chunk, no accumulator of the parameters' size
    assert fixed(FisherInformation(), ["diagonal"]) == fixed(FisherInformation(keep_diagonal=True)) == plain + 8 * n
    assert fixed(FisherInformation(), ["top_eigenvector"]) == plain + 3 * 4 * n  # G^T u_1 on the Gram path


def test_a_budget_too_small_names_the_leanest_mode():
    class TwoModes(GradientFlow):
        def memory_modes(self):
            return [("fast", Cost(param_copies=10.0)), ("lean", Cost(param_copies=2.0))]

        def use_memory_mode(self, mode):
            pass

    mib = 2**20
    plan = MemoryBudget(max_bytes=50 * mib).plan(TwoModes(), 100 * mib, mib, 4, "cpu")
    assert plan.chunk_size is None and plan.mode == "lean"  # the first mode needs 1000 MiB, this one 200
    assert "its leanest plan (lean) needs 200.0 MiB fixed + 2.00 MiB per sample, 202.0 MiB at 1 sample(s)" in plan.reason
