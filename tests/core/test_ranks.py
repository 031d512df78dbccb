"""Average ranks and Spearman's rho against scipy, ties included."""

from __future__ import annotations

import math

import pytest
import torch

from uma_callbacks.core.ranks import average_ranks, spearman

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_and_rho_equal_scipy_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 7, (200,), generator=gen).double()  # many ties
    y = x + torch.randint(0, 3, (200,), generator=gen).double()
    torch.testing.assert_close(average_ranks(x), torch.from_numpy(stats.rankdata(x.numpy())), rtol=0, atol=0)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, rel=1e-13)
    z = torch.randn(200, generator=gen, dtype=torch.float64)
    assert spearman(z, z.exp()) == pytest.approx(1.0, abs=1e-15)
    assert spearman(z, -z) == pytest.approx(-1.0, abs=1e-15)


def test_a_constant_sample_gives_nan_and_sizes_must_agree():
    assert math.isnan(spearman(torch.ones(5), torch.arange(5.0)))
    assert math.isnan(spearman(torch.ones(1), torch.ones(1)))
    with pytest.raises(ValueError, match="as many entries"):
        spearman(torch.ones(3), torch.ones(4))
