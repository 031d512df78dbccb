"""LossLandscape against direct evaluation of the probe loss at theta + a d1 + b d2."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from tests.cases import TINY_CASES
from tests.linalg.test_hvp import run_ranks
from tests.oracles import oracle_probe_loss
from uma_callbacks.engine.probe import Probe
from uma_callbacks.metrics import METRICS, LossLandscape
from uma_callbacks.metrics.landscape import _RandomDirections, landscape_result


def _random_dirs(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1 for n, p in model.named_parameters()}


def direct_loss(model, batches, loss_fn, coeffs, dirs) -> float:
    """L(theta + sum_k c_k d_k), on a copy of the model, by plain forward passes."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            for c, d in zip(coeffs, dirs):
                p.add_(d[name], alpha=c)
    return oracle_probe_loss(moved, batches, loss_fn)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", TINY_CASES, ids=str)
def test_grid_equals_direct_evaluation_for_given_directions(case):
    model, batches, loss_fn = case.build(dtype=torch.float64)
    d1, d2 = _random_dirs(model, 1), _random_dirs(model, 2)
    before = _snapshot(model)
    r = LossLandscape(n_points=3, span=0.5, directions=[d1, d2]).compute(model, batches, loss_fn)
    grid = r.arrays["grid_losses"]
    assert grid.shape == (3, 3)
    for i, a in enumerate(r.arrays["alphas"]):
        for j, b in enumerate(r.arrays["betas"]):
            assert grid[i, j] == pytest.approx(
                direct_loss(model, batches, loss_fn, (a, b), (d1, d2)), rel=1e-10
            )
    assert r.scalars["center_loss"] == oracle_probe_loss(model, batches, loss_fn)
    assert grid[1, 1] == r.scalars["center_loss"]
    assert _unchanged(model, before)
    want_cos = sum((d1[n] * d2[n]).sum() for n in d1) / math.sqrt(
        sum(d1[n].pow(2).sum() for n in d1) * sum(d2[n].pow(2).sum() for n in d2)
    )
    assert r.scalars["orthogonality"] == pytest.approx(float(want_cos), rel=1e-10)
    assert r.meta["directions"] == "given"


@pytest.mark.parametrize("normalization", ["filter", "layer", "global"])
def test_random_directions_stored_and_lean_agree_and_match_direct(normalization):
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    kwargs = {"n_points": 5, "span": 1.0, "normalization": normalization, "seed": 4}
    stored = LossLandscape(mode="stored", **kwargs).compute(model, batches, loss_fn)
    lean = LossLandscape(mode="lean", **kwargs).compute(model, batches, loss_fn)
    np.testing.assert_allclose(lean.arrays["grid_losses"], stored.arrays["grid_losses"], rtol=1e-12)
    assert lean.scalars["orthogonality"] == pytest.approx(stored.scalars["orthogonality"], rel=1e-12)
    # the same directions, rebuilt, give the same grid by direct evaluation
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    theta = [dict(model.named_parameters())[n].detach() for n in names]
    d = _RandomDirections(theta, 2, 4, normalization).materialise()
    full = [{n: torch.zeros_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    for k in range(2):
        full[k].update(dict(zip(names, d[k])))
    a, b = stored.arrays["alphas"][0], stored.arrays["betas"][3]
    assert stored.arrays["grid_losses"][0, 3] == pytest.approx(
        direct_loss(model, batches, loss_fn, (a, b), full), rel=1e-10
    )
    assert stored.meta["seeds"] == {"d1": 4, "d2": 5}


def test_normalisations():
    model, _, _ = TINY_CASES[0].build(dtype=torch.float64)
    theta = [p.detach() for p in model.parameters() if p.dim() >= 2]
    filt = _RandomDirections(theta, 1, 0, "filter").materialise()[0]
    for t, d in zip(theta, filt):
        torch.testing.assert_close(d.norm(dim=1), t.norm(dim=1), rtol=1e-12, atol=0)
    layer = _RandomDirections(theta, 1, 0, "layer").materialise()[0]
    for t, d in zip(theta, layer):
        assert d.norm().item() == pytest.approx(t.norm().item(), rel=1e-12)
    glob = _RandomDirections(theta, 1, 0, "global").materialise()[0]
    assert math.sqrt(sum(d.pow(2).sum() for d in glob)) == pytest.approx(
        math.sqrt(sum(t.pow(2).sum() for t in theta))
    )
    # the same seed gives the same directions; other seeds others
    again = _RandomDirections(theta, 1, 0, "filter").materialise()[0]
    assert all(torch.equal(x, y) for x, y in zip(filt, again))
    assert not torch.equal(_RandomDirections(theta, 1, 1, "filter").materialise()[0][0], filt[0])


def test_zero_norm_biases_do_not_divide_by_zero():
    """Qwen2's q/k/v biases start at zero: their direction is zero, never NaN."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.cases import ragged_lm_batches
    from uma_callbacks.core.losses import hf_per_sample_loss

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = Qwen2ForCausalLM(cfg).double()
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    biases = [p.detach() for n, p in model.named_parameters() if n.endswith("bias")]
    for norm in ("filter", "layer"):
        dirs = _RandomDirections(biases, 1, 0, norm).materialise()[0]
        assert all(torch.equal(d, torch.zeros_like(d)) for d in dirs)
    r = LossLandscape(n_points=3, include_1d_params=True, mode="lean").compute(
        model, ragged_lm_batches(n_batches=1), hf_per_sample_loss
    )
    assert np.isfinite(r.arrays["grid_losses"]).all()


def test_1d_params_zeroed_unless_asked():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    default = LossLandscape(n_points=3).compute(model, batches, loss_fn)
    included = LossLandscape(n_points=3, include_1d_params=True).compute(model, batches, loss_fn)
    assert default.meta["n_perturbed_params"] == 3 and included.meta["n_perturbed_params"] == 6
    assert default.arrays["grid_losses"][0, 0] != included.arrays["grid_losses"][0, 0]


def test_restored_bit_for_bit_when_a_forward_raises_midway():
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64)
    model.train()
    before = _snapshot(model)
    rng = torch.random.get_rng_state()
    calls = {"n": 0}

    def flaky(m, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected failure")
        return loss_fn(m, batch)

    for mode in ("stored", "lean"):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="injected"):
            LossLandscape(n_points=3, mode=mode, include_1d_params=True).compute(model, batches, flaky)
        assert _unchanged(model, before)
    r = LossLandscape(n_points=3, mode="lean").compute(model, batches, loss_fn)
    assert _unchanged(model, before)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert r.scalars["center_loss"] == oracle_probe_loss(model, batches, loss_fn)


def test_one_dimensional_slice_and_n_batches():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    d1 = _random_dirs(model, 3)
    r = LossLandscape(n_points=5, span=2.0, directions=d1, n_batches=1).compute(model, batches, loss_fn)
    assert r.arrays["grid_losses"].shape == (5,) and r.arrays["betas"].tolist() == [0.0]
    assert "orthogonality" not in r.scalars
    np.testing.assert_array_equal(r.arrays["alphas"], np.linspace(-2, 2, 5))
    assert r.arrays["grid_losses"][4] == pytest.approx(
        direct_loss(model, batches[:1], loss_fn, (2.0,), (d1,)), rel=1e-10
    )
    assert r.meta["n_samples"] == 10  # the probe; the slice used only its first batch


def test_hessian_directions_are_orthogonal():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    r = LossLandscape(n_points=3, span=0.1, directions="hessian").compute(model, batches, loss_fn)
    assert abs(r.scalars["orthogonality"]) < 1e-6
    assert r.meta["directions"] == "hessian" and len(r.meta["hessian_eigenvalues"]) == 2


def test_sharded_over_two_ranks_equals_one_process():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    single = LossLandscape(n_points=3, mode="lean").compute(model, batches, loss_fn)
    probe = Probe(batches)
    models = [TINY_CASES[0].build(dtype=torch.float64)[0] for _ in range(2)]
    out = run_ranks(
        2,
        lambda rank, c: LossLandscape(n_points=3, mode="lean").compute(
            models[rank], probe.shard(rank, 2), loss_fn, collective=c
        ),
    )
    for r in out:
        np.testing.assert_allclose(r.arrays["grid_losses"], single.arrays["grid_losses"], rtol=1e-12)


def test_scalars_from_a_known_grid():
    grid = np.array([[1.0, 2.0, 4.0], [0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    r = landscape_result(grid, np.array([-1.0, 0, 1]), np.array([-1.0, 0, 1]), 0.25)
    diffs = [1, 2, 1, 2, 0, 0, 1, 2, 1, 1, 1, 1]  # horizontal then vertical neighbours
    assert r.scalars["roughness"] == pytest.approx(np.mean(np.abs(diffs)))
    assert r.scalars["center_loss"] == 1.0 and r.scalars["orthogonality"] == 0.25
    assert r.scalars["loss_mean"] == pytest.approx(grid.mean()) and r.scalars["loss_std"] == pytest.approx(
        grid.std()
    )


def test_registered_by_name():
    assert METRICS["landscape"] is LossLandscape


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_points": 4}, "n_points"),
        ({"n_points": 1}, "n_points"),
        ({"span": 0}, "span"),
        ({"span": -1.0}, "span"),
        ({"normalization": "x"}, "normalization"),
        ({"mode": "fast"}, "mode"),
        ({"dims": 3}, "dims"),
        ({"directions": "up"}, "directions"),
        ({"directions": [{}, {}, {}]}, "directions"),
        ({"directions": {"w": 1.0}}, "directions"),
        ({"directions": {"w": torch.zeros(1)}, "dims": 2}, "directions"),
        ({"n_batches": 0}, "n_batches"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LossLandscape.{field}"):
        LossLandscape(**kwargs)


def test_normalization_message_lists_the_choices():
    with pytest.raises(
        ValueError,
        match=r"LossLandscape.normalization must be one of \('filter', 'layer', 'global'\); got 'x'",
    ):
        LossLandscape(normalization="x")


def test_missing_or_misshaped_directions_raise_at_compute():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    d = _random_dirs(model, 0)
    missing = {k: v for k, v in d.items() if k != "fc1.bias"}
    with pytest.raises(ValueError, match=r"LossLandscape.directions\[0\].*missing \['fc1.bias'\]"):
        LossLandscape(directions=missing).compute(model, batches, loss_fn)
    bad = dict(d, **{"fc2.weight": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"LossLandscape.directions\[1\].*mis-shaped.*fc2.weight"):
        LossLandscape(directions=[d, bad]).compute(model, batches, loss_fn)
