"""Per-block Hessian curvature (``HessianSpectrum(blocks=...)``) against the dense float64 Hessian.

Each block's top eigenvalue is lambda_max of the principal submatrix H[S, S] of the dense
Hessian (to 1e-5), its product differentiates only the block's parameters, every block
shares the one first backward, and the block traces of a partition add up to the whole
trace probe by probe.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cases import mlp_case, qwen2_case
from tests.metrics.test_hessian import dense_hessian
from tests.oracles import oracle_hessian, param_slices
from uma_callbacks.core.records import log_key
from uma_callbacks.linalg.hvp import HessianOperator
from uma_callbacks.metrics import HessianSpectrum
from uma_callbacks.metrics.base import ComputeContext, module_of

# Qwen2: only decoder layer 0 trains (about 2k parameters), so the dense oracle stays cheap;
# the gradient still flows through layer 1, the norm and the head.
QWEN2_TRAINABLE = "model.layers.0."


def _qwen2():
    model, batches, loss_fn = qwen2_case(torch.float64)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(QWEN2_TRAINABLE))
    return model, batches, loss_fn


def _block_hessians(model, H, blocks):
    """``{module: H[S, S]}`` for ``{module: [parameter names]}``."""
    slices = param_slices(model)
    out = {}
    for module, names in blocks.items():
        index = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
        out[module] = H[index][:, index]
    return out


def _modules(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out.setdefault(module_of(name), []).append(name)
    return out


@pytest.fixture(scope="module")
def qwen2_dense():
    return dense_hessian(*_qwen2())


@pytest.mark.parametrize("case", ["mlp", "qwen2"])
def test_each_layer_block_matches_the_dense_block(case, request):
    model, batches, loss_fn = mlp_case() if case == "mlp" else _qwen2()
    H = oracle_hessian(model, batches, loss_fn) if case == "mlp" else request.getfixturevalue("qwen2_dense")
    blocks = _block_hessians(model, H, _modules(model))
    r = HessianSpectrum(top_k=1, hutchinson_samples=8, tol=1e-10, max_iter=200, blocks="layers").compute(
        model, batches, loss_fn
    )
    assert "block" not in r.meta.get("partial_reason", ""), r.meta["partial_reason"]
    assert set(r.meta["blocks"]) == set(blocks)
    for module, Hb in blocks.items():
        want = torch.linalg.eigvalsh(Hb)[-1].item()
        got = r.scalars[f"layers/{module}/top_eigenvalue"]
        assert abs(got - want) <= 1e-5 * abs(want), (module, got, want)
        assert r.meta["blocks"][module]["n_params"] == Hb.shape[0]
    # a partition's block traces add up to the whole-model trace, probe by probe
    total = sum(r.scalars[f"layers/{m}/trace"] for m in blocks)
    assert total == pytest.approx(r.scalars["trace"], rel=1e-9)
    # the whole-model result is the one without blocks
    plain = HessianSpectrum(top_k=1, hutchinson_samples=8, tol=1e-10, max_iter=200).compute(model, batches, loss_fn)
    assert np.array_equal(plain.arrays["top_eigenvalues"], r.arrays["top_eigenvalues"])
    assert plain.scalars["trace"] == r.scalars["trace"]


def test_block_traces_are_unbiased_for_the_block_trace():
    model, batches, loss_fn = mlp_case()
    H = oracle_hessian(model, batches, loss_fn)
    blocks = _block_hessians(model, H, _modules(model))
    r = HessianSpectrum(top_k=1, hutchinson_samples=200, max_iter=4, blocks="layers").compute(model, batches, loss_fn)
    for module, Hb in blocks.items():
        stderr = r.scalars[f"layers/{module}/trace_stderr"]
        assert abs(r.scalars[f"layers/{module}/trace"] - Hb.trace().item()) < 3 * stderr


def test_named_modules_take_every_parameter_under_them(qwen2_dense):
    model, batches, loss_fn = _qwen2()
    H = qwen2_dense
    names = {
        "model.layers.0.mlp": [n for n in param_slices(model) if n.startswith("model.layers.0.mlp.")],
        "model.layers.0.self_attn.q_proj": ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"],
    }
    blocks = _block_hessians(model, H, names)
    r = HessianSpectrum(top_k=1, hutchinson_samples=0, tol=1e-10, max_iter=200, blocks=list(names)).compute(
        model, batches, loss_fn
    )
    for module, Hb in blocks.items():
        want = torch.linalg.eigvalsh(Hb)[-1].item()
        assert abs(r.scalars[f"layers/{module}/top_eigenvalue"] - want) <= 1e-5 * abs(want)
    assert not any(k.endswith("/trace") for k in r.scalars)  # no probes, no block traces
    assert log_key("hessian", "layers/model.layers.0.mlp/top_eigenvalue") == "uma/hessian/layers/model.layers.0.mlp/top_eigenvalue"


def test_a_block_product_differentiates_only_the_block_and_shares_the_first_backward():
    model, batches, loss_fn = mlp_case()
    H = oracle_hessian(model, batches, loss_fn)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    params = dict(model.named_parameters())
    op = HessianOperator(model, loss_fn, batches, params, sum(int(b["x"].shape[0]) for b in batches), cache_graph=True)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole = op.matvec(v)
    after_first = len(forwards)
    touched: set[str] = set()
    for name, p in params.items():
        p.register_hook(lambda g, name=name: touched.add(name))
    slices = param_slices(model)
    for module, names in _modules(model).items():
        touched.clear()
        blk = op.restrict(names)
        vb = blk.flat_slice(v)
        index = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
        torch.testing.assert_close(blk.matvec(vb), H[index][:, index] @ vb, rtol=1e-9, atol=1e-12)
        assert touched == set(names)  # no other parameter's gradient was formed
    assert len(forwards) == after_first  # every block reused the cached first backward
    assert op.block_matvecs == len(_modules(model)) and op.matvecs == 1
    torch.testing.assert_close(whole, H @ v, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="restrict"):
        op.restrict(["nope.weight"])


@pytest.mark.parametrize(
    "blocks", ["modules", [], ["fc1", "fc1"], [1], "fc1", {"fc1": 1}]
)
def test_bad_blocks_name_the_field_and_the_allowed_values(blocks):
    with pytest.raises(ValueError, match=r'HessianSpectrum\.blocks must be "layers", a non-empty list'):
        HessianSpectrum(blocks=blocks)


def test_a_module_the_model_does_not_have_is_refused_at_compute():
    model, batches, loss_fn = mlp_case()
    with pytest.raises(ValueError, match=r"HessianSpectrum\.blocks .*'fc9'.*closest: .*'fc1'"):
        HessianSpectrum(top_k=1, hutchinson_samples=0, blocks=["fc9"]).compute(model, batches, loss_fn)
    model.fc1.weight.requires_grad_(False)
    model.fc1.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianSpectrum(top_k=1, hutchinson_samples=0, blocks=["fc1"]).compute(model, batches, loss_fn)


def test_a_stop_in_the_blocks_keeps_the_whole_spectrum_and_the_finished_blocks(monkeypatch):
    model, batches, loss_fn = mlp_case()
    kwargs = {"top_k": 2, "hutchinson_samples": 4, "block_size": 1, "max_iter": 12, "blocks": "layers"}
    full = HessianSpectrum(**kwargs).compute(model, batches, loss_fn)
    first = next(iter(full.meta["blocks"]))
    stop = full.meta["lanczos_matvecs"] + full.meta["blocks"][first]["matvecs"] + 1
    original = ComputeContext.check_time

    def check_time(self, **progress):
        if progress.get("matvecs", 0) >= stop:
            self.deadline = 0.0
        return original(self, **progress)

    monkeypatch.setattr(ComputeContext, "check_time", check_time)
    part = HessianSpectrum(**kwargs).compute(model, batches, loss_fn, timeout_seconds=3600)
    assert part.status == "partial" and "blocks not reached" in part.meta["partial_reason"]
    assert np.array_equal(part.arrays["top_eigenvalues"], full.arrays["top_eigenvalues"])
    key = f"layers/{first}/top_eigenvalue"
    assert part.scalars[key] == full.scalars[key]
    assert [k for k in part.scalars if k.endswith("/top_eigenvalue")] == [key]  # the first block's only


def test_the_drawer_draws_a_bar_per_module(tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.plots import draw_result

    model, batches, loss_fn = mlp_case()
    r = HessianSpectrum(top_k=2, hutchinson_samples=4, max_iter=12, blocks="layers").compute(model, batches, loss_fn)
    paths = draw_result(r, tmp_path)
    assert {p.name for p in paths} == {"hessian-spectrum.png", "hessian-layers.png"}
    assert all(p.stat().st_size > 1000 for p in paths)



def test_the_time_cost_prices_the_blocks():
    from uma_callbacks.metrics.time_cost import UnitCosts

    units = UnitCosts(forward=1.0, backward=2.0, hvp=5.0, n_batches=1)
    plain = HessianSpectrum(top_k=1).time_cost(units)
    layers = HessianSpectrum(top_k=1, blocks="layers").time_cost(units)
    named = HessianSpectrum(top_k=1, blocks=["a", "b"]).time_cost(units)
    assert layers == pytest.approx(2 * plain) and named == pytest.approx(plain + 24 * 5.0)
