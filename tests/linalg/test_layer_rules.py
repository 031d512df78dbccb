"""A layer rule registered from outside the package (here, in this test file) is picked up by
the hooks and gives the brute-force per-sample gradients (float64, one backward per sample)."""

from __future__ import annotations

import pytest
import torch

from tests.oracles import oracle_per_sample_grads, param_slices
from uma_callbacks.linalg.layer_grads import hook_plan, layer_gradient_sums, layer_gradients, layer_rule
from uma_callbacks.linalg.layers import Dense, Outer, find_layer_rule, register_layer_rule


class Gate(torch.nn.Module):
    """y = x * w + x @ U (w [H], U [H, H]): a layer type with no built-in rule."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, hidden))
        self.u = torch.nn.Parameter(torch.linspace(-0.3, 0.3, hidden * hidden).reshape(hidden, hidden))

    def forward(self, x):
        return x * self.w + x @ self.u


calls: list[str] = []


@register_layer_rule(Gate, name="gate", params=("w", "u"))
def gate_rule(module, x, d, n):
    """g_{i,w} = sum_t d_{it} * x_{it}; g_{i,U} = sum_t x_{it} d_{it}^T."""
    calls.append("gate")
    xs, ds = x.reshape(n, -1, x.shape[-1]), d.reshape(n, -1, d.shape[-1])
    return {"w": Dense((ds * xs).sum(1)), "u": Outer(xs, ds)}


class LoudGate(Gate):
    """Keeps Gate's forward: gets Gate's rule (MRO)."""


class DoubledGate(Gate):
    """Overrides forward: its math is unknown to Gate's rule, so vmap."""

    def forward(self, x):
        return 2 * super().forward(x)


class Net(torch.nn.Module):
    def __init__(self, gate: type[Gate]) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.gate = gate(4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):  # x [B, T, 3]: a sequence dim, so the rule must sum over t
        return self.head(torch.tanh(self.gate(torch.tanh(self.fc(x))))).squeeze(-1).sum(-1)


def _case(gate: type[Gate]):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, generator=gen, dtype=torch.float64)
    batches = [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}]
    return Net(gate).double(), batches, lambda m, b: (m(b["x"]) - b["y"]) ** 2


@pytest.mark.parametrize("gate", [Gate, LoudGate, DoubledGate])
def test_registered_rule_matches_brute_force(gate):
    model, batches, loss_fn = _case(gate)
    names, G = oracle_per_sample_grads(model, batches, loss_fn)
    slices = param_slices(model)
    params = dict(model.named_parameters())
    plan = hook_plan(model, params)
    ruled = gate is not DoubledGate
    assert layer_rule(model.gate) == ("gate" if ruled else None)
    assert plan.leftover == ([] if ruled else ["gate.w", "gate.u"])
    calls.clear()
    start = 0
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for batch in batches:
        g = G[start : start + batch["x"].shape[0]]
        start += g.shape[0]
        scale = float(g.square().sum(1).max())
        rep = layer_gradients(model, loss_fn, batch, params, plan)
        sums = layer_gradient_sums(model, loss_fn, batch, params, plan, want_sum=True, want_gram=True)
        assert rep.vmapped == sums.vmapped == ([] if ruled else ["gate.w", "gate.u"])
        diag, norms, grad_sum, gram = rep.reduce(want_diag=True, want_sum=True, want_gram=True)
        for got_diag, got_norms, got_sum in ((diag, norms, grad_sum), (sums.diag, sums.sq_norms, sums.grad_sum)):
            for i, n_ in enumerate(names):
                gp = g[:, slices[n_]]
                torch.testing.assert_close(got_diag[n_].reshape(-1), gp.square().sum(0), rtol=1e-6, atol=1e-12 * scale)
                torch.testing.assert_close(got_sum[n_].reshape(-1), gp.sum(0), rtol=1e-6, atol=1e-12 * scale)
                torch.testing.assert_close(got_norms[:, i], gp.square().sum(1), rtol=1e-6, atol=1e-12 * scale)
        for got_gram in (gram, sums.gram):
            torch.testing.assert_close(got_gram, g @ g.T, rtol=1e-6, atol=1e-12 * scale)
        parts = {n_: v[slices[n_]].view(params[n_].shape) for n_ in names}
        torch.testing.assert_close(rep.dot(parts), g @ v, rtol=1e-6, atol=1e-10 * scale)
    assert (len(calls) > 0) == ruled  # the hooks ran the registered rule, or vmap did the work


def test_a_rule_that_forgets_a_parameter_is_named():
    class Half(Gate):
        pass

    @register_layer_rule(Half, name="half", params=("w", "u"))
    def half_rule(module, x, d, n):
        return {"w": Dense((d * x).reshape(n, -1, x.shape[-1]).sum(1))}

    model, batches, loss_fn = _case(Half)
    params = dict(model.named_parameters())
    with pytest.raises(KeyError, match="'half' gave no factor for \\['u'\\]"):
        layer_gradients(model, loss_fn, batches[0], params, hook_plan(model, params))


def test_registration_refuses_what_is_not_a_module_class():
    with pytest.raises(ValueError, match="module_type"):
        register_layer_rule("Linear")
    with pytest.raises(ValueError, match="params"):
        register_layer_rule(Gate, params=())(gate_rule)
    assert find_layer_rule(Gate(2)).name == "gate"  # the refused call left the rule alone
