"""Every registered metric leaves the model exactly as it found it (DESIGN.md's contract)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.cases import qwen2_case
from uma_callbacks.core.optimizer_state import from_optimizer
from uma_callbacks.metrics import METRICS
from uma_callbacks.metrics.base import CheckpointState, History

#: small settings per metric name so the contract check stays fast
SMALL = {
    "fisher": {"top_k": 2},
    "hessian": {"top_k": 2},
    "landscape": {"n_points": 3},
    "interpolation": {"n_points": 3},
}


def _build(name, model):
    return METRICS[name](**SMALL.get(name, {}))


def _optimizer(name, model) -> dict:
    """``{"optimizer_state": ...}`` for a metric that reads one: an AdamW step taken on a copy of the model."""
    if not METRICS[name].needs_optimizer:
        return {}
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad])
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    return {"optimizer_state": from_optimizer(opt, twin)}


def _history(model) -> History:
    """Two earlier checkpoints and a first one, near the model's weights (for every metric that asks)."""
    states = [
        CheckpointState(step, {n: p.detach().clone() + 0.01 * k for n, p in model.named_parameters()}, f"fp{k}")
        for k, step in ((1, 20), (2, 10), (3, 0))
    ]
    return History(previous=tuple(states[:2]), first=states[2])


@pytest.mark.parametrize("name", sorted(METRICS))
def test_model_comes_back_exactly_as_it_went_in(name):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    model.train()
    model.model.layers[0].eval()  # a mixed mode must survive too
    model.lm_head.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    metric = _build(name, model)
    torch.set_rng_state(rng)
    result = metric.compute(model, batches, loss_fn, history=_history(model), **_optimizer(name, model))
    # partial: values kept, short of an accuracy (the Hessian's 2-probe trace here)
    assert result.status in ("ok", "partial"), result.error
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before), "weights changed"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.config._attn_implementation == "sdpa"
    assert result.meta["seconds"] > 0 and "peak_bytes" in result.meta


@pytest.mark.parametrize("name", sorted(METRICS))
def test_existing_grads_survive(name):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    loss_fn(model, batches[0]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _build(name, model).compute(model, batches, loss_fn, history=_history(model), **_optimizer(name, model))
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
