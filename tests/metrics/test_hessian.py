"""HessianSpectrum against the dense float64 Hessian and torch.linalg.eigvalsh."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, jacrev

from tests.cases import TINY_CASES
from tests.linalg.test_hvp import run_ranks
from tests.oracles import oracle_hessian
from uma_callbacks.core.model_state import eager_attention
from uma_callbacks.engine.probe import Probe
from uma_callbacks.metrics import METRICS, HessianSpectrum
from uma_callbacks.metrics.hessian import eigenvector_directions, spectrum_scalars

# Qwen2: only decoder layer 0 is trainable (~2k parameters), so the dense oracle stays
# affordable; the gradient still flows through layer 1, the norm and the head, and the
# restricted Hessian is a principal block of the full one. The MLP case uses all parameters.
QWEN2_TRAINABLE = "model.layers.0."


def _build(case_name: str, attn: str = "sdpa"):
    if case_name == "mlp_custom_loss":
        return TINY_CASES[0].build(dtype=torch.float64)
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64, attn=attn)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(QWEN2_TRAINABLE))
    return model, batches, loss_fn


def dense_hessian(model, batches, loss_fn) -> torch.Tensor:
    """H [P, P] of L over the trainable parameters by jacrev(grad) (reverse over reverse:
    torch.func.hessian's forward mode has no rule for SDPA or silu_backward), float64."""
    model = copy.deepcopy(model).double().eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    n = sum(int(b[next(iter(b))].shape[0]) for b in batches)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, batch):
            return loss_fn(self.m, batch)

    wrap = Wrap(model)

    def total(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[f"m.{name}"] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return sum(functional_call(wrap, params, (b,), strict=False).sum() for b in batches) / n

    with eager_attention(model):
        return jacrev(grad(total), chunk_size=512)(flat0)


@pytest.fixture(scope="module")
def dense():
    out = {}
    model, batches, loss_fn = _build("mlp_custom_loss")
    out["mlp_custom_loss"] = oracle_hessian(model, batches, loss_fn)
    out["qwen2_ragged"] = dense_hessian(*_build("qwen2_ragged"))
    return out


CASES = ["mlp_custom_loss", "qwen2_ragged"]


@pytest.mark.parametrize("case", CASES)
def test_top_k_matches_eigvalsh(case, dense):
    model, batches, loss_fn = _build(case)
    H = dense[case]
    want = torch.linalg.eigvalsh(H).flip(0)[:5].numpy()
    r = HessianSpectrum(top_k=5, hutchinson_samples=0, tol=1e-9, max_iter=150, cache_graph=True).compute(
        model, batches, loss_fn
    )
    got = r.arrays["top_eigenvalues"]
    assert r.meta["lanczos_converged"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert list(got) == sorted(got, reverse=True)
    s = spectrum_scalars(want)
    assert r.scalars["top_k_effective_rank"] == pytest.approx(s["top_k_effective_rank"], rel=1e-6)
    assert r.scalars["top_k_condition_number"] == pytest.approx(want[0] / want[-1], rel=1e-6)
    assert r.meta["matvecs"] == r.meta["lanczos_matvecs"]


def test_previous_checkpoint_start_gives_the_eigvalsh_values_in_fewer_products():
    """start="previous": the first checkpoint starts from the gradients, the next from the sum of
    the first's top-k Ritz vectors; both match eigvalsh of their own dense Hessian."""
    model, batches, loss_fn = _build("mlp_custom_loss")
    metric = HessianSpectrum(top_k=5, hutchinson_samples=0, tol=1e-8, max_iter=150, start="previous")
    first = metric.compute(model, batches, loss_fn)
    assert first.meta["lanczos_start"] == "gradients" and not first.tensors
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the next checkpoint: a small step away
        for p in model.parameters():
            p.add_(1e-2 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    want = torch.linalg.eigvalsh(oracle_hessian(model, batches, loss_fn)).flip(0)[:5].numpy()
    warm = metric.compute(model, batches, loss_fn)
    cold = HessianSpectrum(top_k=5, hutchinson_samples=0, tol=1e-8, max_iter=150).compute(model, batches, loss_fn)
    assert warm.meta["lanczos_start"] == "previous" and not warm.tensors
    np.testing.assert_allclose(warm.arrays["top_eigenvalues"], want, rtol=1e-6)
    np.testing.assert_allclose(cold.arrays["top_eigenvalues"], want, rtol=1e-6)
    assert warm.meta["lanczos_matvecs"] < cold.meta["lanczos_matvecs"], (warm.meta["lanczos_matvecs"], cold.meta["lanczos_matvecs"])
    # other parameters (a frozen layer): no previous vector of that shape, the gradients again
    next(model.parameters()).requires_grad_(False)
    assert metric.compute(model, batches, loss_fn).meta["lanczos_start"] == "gradients"


@pytest.mark.parametrize("case", CASES)
def test_hutchinson_trace_within_three_stderr(case, dense):
    model, batches, loss_fn = _build(case)
    exact = dense[case].trace().item()
    r = HessianSpectrum(top_k=1, hutchinson_samples=60, max_iter=4, cache_graph=True).compute(
        model, batches, loss_fn
    )
    assert abs(r.scalars["trace"] - exact) < 3 * r.scalars["trace_stderr"]
    assert r.meta["hutchinson_matvecs"] == 60
    assert r.meta["seeds"] == {"lanczos": 42, "hutchinson": 43}  # the run's seed (42) when none is given


def test_sdpa_gives_the_eager_eigenvalues():
    kwargs = {"top_k": 3, "hutchinson_samples": 4, "tol": 1e-9, "max_iter": 60, "cache_graph": True}
    sdpa_model, batches, loss_fn = _build("qwen2_ragged", attn="sdpa")
    eager_model, _, _ = _build("qwen2_ragged", attn="eager")
    a = HessianSpectrum(**kwargs).compute(sdpa_model, batches, loss_fn)
    b = HessianSpectrum(**kwargs).compute(eager_model, batches, loss_fn)
    np.testing.assert_allclose(a.arrays["top_eigenvalues"], b.arrays["top_eigenvalues"], rtol=1e-9)
    assert a.scalars["trace"] == pytest.approx(b.scalars["trace"], rel=1e-9)
    assert a.meta["attn_implementation"] == "sdpa -> eager"
    assert sdpa_model.config._attn_implementation == "sdpa"


def test_eigenvectors_satisfy_hv_equals_lambda_v(dense):
    model, batches, loss_fn = _build("mlp_custom_loss")
    r = HessianSpectrum(top_k=2, hutchinson_samples=0, tol=1e-10, return_eigenvectors=True).compute(
        model, batches, loss_fn
    )
    H = dense["mlp_custom_loss"]
    for j, d in enumerate(eigenvector_directions(r, 2)):
        assert list(d) == [n for n, _ in model.named_parameters()]
        v = torch.cat([t.reshape(-1) for t in d.values()])
        assert v.norm().item() == pytest.approx(1.0, rel=1e-9)
        torch.testing.assert_close(H @ v, r.arrays["top_eigenvalues"][j] * v, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="return_eigenvectors"):
        eigenvector_directions(r, 3)


def test_model_comes_back_unchanged():
    model, batches, loss_fn = _build("qwen2_ragged")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.random.get_rng_state()
    HessianSpectrum(top_k=2, hutchinson_samples=2, max_iter=6).compute(model, batches, loss_fn)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.config._attn_implementation == "sdpa"


def test_probe_sharded_over_two_ranks_equals_one_process():
    kwargs = {"top_k": 3, "hutchinson_samples": 6, "tol": 1e-9, "max_iter": 30}
    model, batches, loss_fn = _build("mlp_custom_loss")
    single = HessianSpectrum(**kwargs).compute(model, batches, loss_fn)
    probe = Probe(batches)
    models = [_build("mlp_custom_loss")[0] for _ in range(2)]
    out = run_ranks(
        2,
        lambda rank, coll: HessianSpectrum(**kwargs).compute(
            models[rank], probe.shard(rank, 2), loss_fn, collective=coll
        ),
    )
    for r in out:
        np.testing.assert_allclose(r.arrays["top_eigenvalues"], single.arrays["top_eigenvalues"], rtol=1e-9)
        assert r.scalars["trace"] == pytest.approx(single.scalars["trace"], rel=1e-9)
        assert r.meta["n_samples"] == 10


def test_unconverged_lanczos_is_partial_with_residuals(dense):
    model, batches, loss_fn = _build("mlp_custom_loss")
    want = torch.linalg.eigvalsh(dense["mlp_custom_loss"]).flip(0)[:4].numpy()
    short = HessianSpectrum(top_k=4, hutchinson_samples=0, max_iter=4, tol=1e-9).compute(model, batches, loss_fn)
    rel = short.meta["lanczos_relative_residuals"]
    assert short.status == "partial" and short.ok and not short.meta["lanczos_converged"]
    assert len(rel) == 4 and max(rel) > 1e-2 == short.meta["lanczos_residual_tol"]
    assert "residual_tol" in short.meta["partial_reason"] and short.arrays["top_eigenvalues"].shape == (4,)
    assert short.meta["lanczos_history"][-1] == [4, pytest.approx(max(rel))]
    # the same run vouching for less is ok; a converged run is ok and exact
    loose = HessianSpectrum(top_k=4, hutchinson_samples=0, max_iter=4, tol=1e-9, residual_tol=2 * max(rel))
    assert loose.compute(model, batches, loss_fn).status == "ok"
    full = HessianSpectrum(top_k=4, hutchinson_samples=0, max_iter=80, tol=1e-9).compute(model, batches, loss_fn)
    assert full.status == "ok" and max(full.meta["lanczos_relative_residuals"]) <= 1e-9
    np.testing.assert_allclose(full.arrays["top_eigenvalues"], want, rtol=1e-6)


def test_spectrum_scalars_with_negative_and_degenerate_values():
    s = spectrum_scalars([3.0, 1.0, -1.0])
    p = np.array([0.6, 0.2, 0.2])
    assert s["top_k_effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert s["top_k_condition_number"] == math.inf and s["top_eigenvalue"] == 3.0
    assert spectrum_scalars([2.0])["top_k_condition_number"] == 1.0
    assert math.isnan(spectrum_scalars([0.0, 0.0])["top_k_effective_rank"])


def test_registered_by_name():
    assert METRICS["hessian"] is HessianSpectrum


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"hutchinson_samples": 1}, "hutchinson_samples"),
        ({"hutchinson_samples": -3}, "hutchinson_samples"),
        ({"tol": 0}, "tol"),
        ({"residual_tol": -1.0}, "residual_tol"),
        ({"start": "ones"}, "start"),
        ({"max_iter": 0}, "max_iter"),
        ({"seed": "a"}, "seed"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"HessianSpectrum.{field}"):
        HessianSpectrum(**kwargs)
