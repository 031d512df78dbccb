"""Hutchinson's trace estimator on dense symmetric matrices (exact answers known)."""

from __future__ import annotations

import math

import pytest
import torch

from uma_callbacks.linalg.hutchinson import hutchinson_trace, mean_and_stderr, rademacher


def _sym(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (a + a.T) / 2 + torch.diag(torch.linspace(0.0, 5.0, n, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_within_three_standard_errors(seed):
    A = _sym(40, seed)
    r = hutchinson_trace(lambda z: A @ z, 40, 200, seed=seed)
    assert r.matvecs == 200 and r.samples.shape == (200,)
    assert abs(r.trace - A.trace().item()) < 3 * r.stderr


def test_variance_matches_closed_form():
    """Var[z^T A z] = 2 (||A||_F^2 - sum_i A_ii^2) for Rademacher z."""
    A = _sym(30, 5)
    r = hutchinson_trace(lambda z: A @ z, 30, 4000, seed=7)
    want = 2 * (A.pow(2).sum() - A.diagonal().pow(2).sum()).item()
    assert r.samples.var().item() == pytest.approx(want, rel=0.1)


def test_converges_as_samples_grow():
    """Average until the relative error is below 1%: reached within the budget, and the
    standard error shrinks like 1/sqrt(m)."""
    A = _sym(30, 9) + 10 * torch.eye(30, dtype=torch.float64)
    exact = A.trace().item()
    errors, stderrs = [], []
    for m in (16, 256, 4096):
        r = hutchinson_trace(lambda z: A @ z, 30, m, seed=11)
        errors.append(abs(r.trace - exact) / exact)
        stderrs.append(r.stderr)
    assert errors[-1] < 0.01
    assert stderrs[0] / stderrs[-1] == pytest.approx(16.0, rel=0.35)


def test_diagonal_is_exact_and_probes_are_rademacher():
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    r = hutchinson_trace(lambda z: A @ z, 20, 3, seed=0)
    assert r.trace == 210.0 and r.stderr == 0.0
    z = rademacher(1000, torch.Generator().manual_seed(0))
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    # signs from the bits of random words: balanced, independent of neighbours, any length
    for dim in (1, 63, 65, 100_003):
        z = rademacher(dim, torch.Generator().manual_seed(dim), torch.float32)
        assert z.shape == (dim,) and z.dtype == torch.float32 and bool((z.abs() == 1).all())
    z = rademacher(1_000_000, torch.Generator().manual_seed(1))
    assert abs(float(z.mean())) < 5e-3  # 5 standard deviations of the mean of 1e6 signs
    assert abs(float((z[1:] * z[:-1]).mean())) < 5e-3  # neighbours uncorrelated
    assert abs(float((z[8:] * z[:-8]).mean())) < 5e-3  # nor 8 apart (one byte's bits)


def test_seeded_and_global_rng_untouched():
    A = _sym(10, 0)
    state = torch.random.get_rng_state()
    a = hutchinson_trace(lambda z: A @ z, 10, 5, seed=3)
    b = hutchinson_trace(lambda z: A @ z, 10, 5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.samples, b.samples) and a.seed == 3


def test_bad_sample_count_and_single_sample_stderr():
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson_trace(lambda z: z, 3, 0)
    mean, stderr = mean_and_stderr(torch.tensor([2.0]))
    assert mean == 2.0 and math.isnan(stderr)
