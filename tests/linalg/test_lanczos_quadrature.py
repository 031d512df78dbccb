"""Lanczos tridiagonals for quadrature: the Gauss rule of T_m against v^T A^k v of a dense matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uma_callbacks.linalg.lanczos_quadrature import gauss_quadrature, lanczos_tridiagonals


def _matrix(n: int = 120, seed: int = 0) -> torch.Tensor:
    """A symmetric float64 matrix with a bulk and two outliers (where orthogonality is lost first)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.cat(
        [torch.linspace(-0.5, 1.0, n - 2, dtype=torch.float64), torch.tensor([8.0, 20.0], dtype=torch.float64)]
    )
    return (q * eigenvalues) @ q.T


def _exact_moment(a: torch.Tensor, v: torch.Tensor, k: int) -> float:
    v = v / v.norm()
    return float(v @ torch.linalg.matrix_power(a, k) @ v)


@pytest.mark.parametrize("reorthogonalise", ["none", "partial", "full"])
def test_gauss_rule_is_exact_up_to_degree_2m_minus_1(reorthogonalise):
    a = _matrix()
    starts = torch.randn(3, a.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = 6
    out = lanczos_tridiagonals(lambda rows: rows @ a, starts, m, reorthogonalise=reorthogonalise)
    assert [len(alphas) for alphas, _ in out] == [m] * 3
    for (alphas, betas), v in zip(out, starts):
        theta, tau = gauss_quadrature(alphas, betas)
        assert tau.sum() == pytest.approx(1.0)
        for k in range(1, 2 * m):
            assert float((tau * theta**k).sum()) == pytest.approx(_exact_moment(a, v, k), rel=1e-9)


def test_without_reorthogonalisation_the_rule_survives_lost_orthogonality():
    """60 steps on 120 dimensions: the outliers' Ritz values converge and come back as ghosts,
    yet the low moments stay those of v^T A^k v and the top node is lambda_max (Greenbaum 1989)."""
    a = _matrix()
    v = torch.randn(1, a.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ((alphas, betas),) = lanczos_tridiagonals(lambda rows: rows @ a, v, 60)
    theta, tau = gauss_quadrature(alphas, betas)
    for k in range(1, 9):
        assert float((tau * theta**k).sum()) == pytest.approx(_exact_moment(a, v[0], k), rel=1e-8)
    assert theta.max() == pytest.approx(20.0, rel=1e-10)
    near_top = tau[np.abs(theta - 20.0) < 1e-6].sum()  # the ghosts share the outlier's one weight
    exact_top = float((torch.linalg.eigh(a).eigenvectors[:, -1] @ (v[0] / v[0].norm())) ** 2)
    assert near_top == pytest.approx(exact_top, rel=1e-6)


def test_starts_run_together_give_what_each_gives_alone():
    a = _matrix(60, seed=3)
    starts = torch.randn(4, 60, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    together = lanczos_tridiagonals(lambda rows: rows @ a, starts, 10)
    for row, (alphas, betas) in zip(starts, together):
        ((alone_a, alone_b),) = lanczos_tridiagonals(lambda rows: rows @ a, row[None], 10)
        assert len(alphas) == len(alone_a) == 10
        # the same rule up to the rounding of a batched product (another summation order,
        # amplified in the coefficients once the outlier's Ritz value has converged)
        theta, tau = gauss_quadrature(alphas, betas)
        theta_alone, tau_alone = gauss_quadrature(alone_a, alone_b)
        for k in range(1, 20):
            assert float((tau * theta**k).sum()) == pytest.approx(float((tau_alone * theta_alone**k).sum()), rel=1e-9)


def test_a_start_whose_krylov_space_ends_leaves_the_block_exactly():
    """A start in a 3-dimensional invariant subspace stops after 3 steps with the exact rule; the other goes on."""
    a = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    short = torch.zeros(20, dtype=torch.float64)
    short[[2, 7, 11]] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    full = torch.ones(20, dtype=torch.float64)
    seen = []
    out = lanczos_tridiagonals(lambda rows: rows @ a, torch.stack([short, full]), 8, on_step=seen.append)
    (a_short, b_short), (a_full, b_full) = out
    assert len(a_short) == 3 and len(b_short) == 2 and len(a_full) == 8 and len(b_full) == 7
    theta, tau = gauss_quadrature(a_short, b_short)
    assert np.allclose(theta, [3.0, 8.0, 12.0]) and np.allclose(tau, np.array([1.0, 4.0, 9.0]) / 14.0)
    assert seen == [2, 4, 6, 7, 8, 9, 10, 11]  # products: two per step, then one


def test_float32_products_keep_the_low_moments():
    a = _matrix(200, seed=5)
    a32 = a.float()
    v = torch.randn(2, 200, generator=torch.Generator().manual_seed(6))
    out = lanczos_tridiagonals(lambda rows: rows @ a32, v, 16, dtype=torch.float32)
    for (alphas, betas), row in zip(out, v):
        theta, tau = gauss_quadrature(alphas, betas)
        for k in range(1, 5):
            assert float((tau * theta**k).sum()) == pytest.approx(_exact_moment(a, row.double(), k), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, match", [({"reorthogonalise": "some"}, "reorthogonalise"), ({"starts": torch.ones(4)}, "starts")]
)
def test_bad_arguments_name_the_field(kwargs, match):
    args = {"starts": torch.ones(1, 4, dtype=torch.float64), **kwargs}
    with pytest.raises(ValueError, match=match):
        lanczos_tridiagonals(lambda rows: rows, args.pop("starts"), 3, **args)
