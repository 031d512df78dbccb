"""Model safety: after any metric, also one that fails midway, the model is as it was.

Weights bit for bit, ``requires_grad``, ``.grad``, forward hooks and pre-hooks (the user's
still there, none added), ``training`` flags, attention implementation and the global RNG
state. ``tests/metrics/test_contract.py`` covers the success path without hooks.
"""

from __future__ import annotations

import pytest
import torch

from tests.cases import qwen2_case
from tests.metrics import test_contract

#: cheap settings (the failure path needs only a few products)
SMALL = {**test_contract.SMALL, "hessian": {"top_k": 1, "hutchinson_samples": 2, "max_iter": 4}}


def _build(name, model):
    metric = test_contract._build(name, model)
    if name in SMALL:
        metric = type(metric)(**SMALL[name])
        if name == "interpolation":
            metric.set_previous({n: p.detach().clone() + 0.01 for n, p in model.named_parameters()})
    return metric
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import METRICS


class Boom(RuntimeError):
    """The injected failure."""


class CountingLoss:
    """The per-sample loss, raising :class:`Boom` on call number ``fail_at`` (1-based)."""

    def __init__(self, loss_fn, fail_at: int | None = None) -> None:
        self.loss_fn, self.fail_at, self.calls = loss_fn, fail_at, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Boom(f"injected failure at loss call {self.calls}")
        return self.loss_fn(model, batch)


def _snapshot(model):
    return {
        "weights": {n: p.detach().clone() for n, p in model.state_dict().items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "hooks": {
            n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "attn": model.config._attn_implementation,
        "rng": torch.get_rng_state(),
    }


def _assert_same(model, before):
    after = _snapshot(model)
    changed = [n for n in before["weights"] if not torch.equal(before["weights"][n], after["weights"][n])]
    assert not changed, f"weights changed: {changed[:5]}"
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    assert all(after["grads"][n] is g for n, g in before["grads"].items()), ".grad replaced"
    assert after["hooks"] == before["hooks"], "hooks added or removed"
    assert after["attn"] == before["attn"]
    assert torch.equal(after["rng"], before["rng"])


def _prepared_model():
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    model.train()
    model.model.layers[0].eval()  # a mixed mode must survive
    model.lm_head.weight.requires_grad_(False)
    loss_fn(model, batches[0]).sum().backward()  # a trainer's accumulated grads
    seen = []
    model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append("hook"))
    model.model.layers[1].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    return model, batches, loss_fn


@pytest.mark.parametrize("name", sorted(METRICS))
def test_model_restored_after_success_with_user_hooks(name):
    model, batches, loss_fn = _prepared_model()
    metric = _build(name, model)
    before = _snapshot(model)
    optimizer = test_contract._optimizer(name, model)
    status = metric.compute(model, batches, loss_fn, history=test_contract._history(model), **optimizer).status
    assert status in ("ok", "partial")  # partial: a Lanczos capped at a few products here
    _assert_same(model, before)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_model_restored_after_a_failure_midway(name):
    model, batches, loss_fn = _prepared_model()
    counting = CountingLoss(loss_fn)
    history = test_contract._history(model)
    optimizer = test_contract._optimizer(name, model)
    _build(name, model).compute(model, batches, counting, history=history, **optimizer)  # how many loss calls a full run takes
    total = counting.calls
    if total < 2:
        pytest.skip(f"{name} calls the loss {total} time(s): it reads weights (or one forward) only")
    failing = CountingLoss(loss_fn, fail_at=total // 2 + 1)  # past the first chunk, before the end
    metric = _build(name, model)
    before = _snapshot(model)
    with pytest.raises(Boom):
        metric.compute(model, batches, failing, history=history, **optimizer)
    _assert_same(model, before)


def test_suite_turns_a_midway_failure_into_an_error_record_and_restores_the_model(tmp_path):
    from uma_callbacks.engine.journal import Journal

    model, batches, loss_fn = _prepared_model()
    metrics = [_build(n, model) for n in ("gradient_flow", "landscape", "fisher")]
    before = _snapshot(model)
    suite = MetricSuite(metrics, journal=Journal(tmp_path), loss_fn=CountingLoss(loss_fn, fail_at=2), draw_figures=False)
    records = suite.run(model, Probe(batches), step=1)
    statuses = {r.metric: r.status for r in records}
    assert list(statuses.values()).count("error") == 1  # the first metric hit the 2nd call
    assert next(r for r in records if r.status == "error").error["type"] == "Boom"
    _assert_same(model, before)
