"""Finite-difference extrapolation on closed forms: exact on polynomials, the truncation and rounding it states, the one-sided check."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from uma_callbacks.core.finite_differences import (
    central_differences,
    neville,
    neville_weights,
    richardson,
    slope_corrected_differences,
)

TWO_SIDED = (-1.0, 1.0, 2.0)
ONE_SIDED = (1.0, 2.0, 4.0)


def test_neville_is_exact_on_polynomials_of_its_degree_and_richardson_is_neville_in_h_squared():
    coeffs = [0.7, -2.0, 3.5, 1.25]
    poly = np.polynomial.Polynomial(coeffs)
    nodes = [-0.3, 0.1, 0.25, 0.5]
    est, err, table = neville(nodes, [poly(u) for u in nodes])
    assert est == pytest.approx(coeffs[0], abs=1e-13) and [len(level) for level in table] == [4, 3, 2, 1]
    assert err == pytest.approx(abs(est - table[-2][0]))
    hs = [0.1, 0.2, 0.4]
    values = [1.0 + 0.3 * h**2 + 0.2 * h**4 + 0.05 * h**6 for h in hs]
    r_est, r_err, _ = richardson(values)
    n_est, n_err, _ = neville([h * h for h in hs], values)
    assert r_est == pytest.approx(n_est, rel=1e-14) and r_err == pytest.approx(n_err, rel=1e-12)
    with pytest.raises(ValueError, match="distinct"):
        neville([0.1, 0.1], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many"):
        neville([0.1], [1.0, 2.0])


def test_neville_weights_reproduce_every_entry_of_the_table():
    nodes = [-0.2, 0.2, 0.4]
    values = [0.3, -1.1, 2.5]
    _, _, table = neville(nodes, values)
    weights = neville_weights(nodes)
    for level, wlevel in zip(table, weights):
        for entry, w in zip(level, wlevel):
            assert entry == pytest.approx(sum(a * b for a, b in zip(w, values)), abs=1e-14)
    assert weights[-1][0] == pytest.approx([1 / 3, 1.0, -1 / 3])  # R = D(-h)/3 + D(h) - D(2h)/3
    assert neville_weights([0.1, 0.2, 0.4])[-1][0] == pytest.approx([8 / 3, -2.0, 1 / 3])  # R = (8 D(h) - 6 D(2h) + D(4h)) / 3


@pytest.mark.parametrize(("offsets", "constant"), [(TWO_SIDED, -1 / 30), (ONE_SIDED, 8 / 60)])
def test_slope_corrected_truncation_is_the_fifth_derivative_term_it_states(offsets, constant):
    """f = quintic: D(u) = f'' + f''' u/3 + f'''' u^2/12 + f^(5) u^3/60 exactly, so R - f'' = (f^(5)/60) u_0 u_1 u_2."""
    h = 0.05
    f2, f3, f4, f5 = 1.5, -40.0, 300.0, 2000.0
    f = lambda t: 2.0 + 0.7 * t + f2 * t**2 / 2 + f3 * t**3 / 6 + f4 * t**4 / 24 + f5 * t**5 / 120  # noqa: E731
    us = [h * m for m in offsets]
    out = slope_corrected_differences(f(0.0), 0.7, us, [f(u) for u in us])
    assert out["curvature"] - f2 == pytest.approx(constant * f5 * h**3, rel=1e-9)
    assert out["second_differences"] == pytest.approx([f2 + f3 * u / 3 + f4 * u * u / 12 + f5 * u**3 / 60 for u in us], rel=1e-9)
    quartic = slope_corrected_differences(f(0.0) * 0, 0.0, us, [f2 * u * u / 2 + f3 * u**3 / 6 + f4 * u**4 / 24 for u in us])
    assert quartic["curvature"] == pytest.approx(f2, rel=1e-12)  # f''' and f'''' removed exactly


@pytest.mark.parametrize(("offsets", "gain", "slope_gain"), [(TWO_SIDED, 16 / 3, 1.0), (ONE_SIDED, 10.75, 3.5)])
def test_rounding_bound_is_attained_by_the_worst_signs(offsets, gain, slope_gain):
    """The bound is the largest change of R over every sign pattern of the f errors (and of the slope's)."""
    h, delta, sigma = 0.01, 1e-7, 1e-5
    us = [h * m for m in offsets]
    f = lambda t: 1.0 + 0.2 * t + 0.5 * t * t  # noqa: E731
    base = slope_corrected_differences(f(0.0), 0.2, us, [f(u) for u in us], delta, sigma)
    assert base["rounding"] == pytest.approx(gain * delta / h**2 + slope_gain * sigma / h, rel=1e-12)
    worst = 0.0
    for signs in itertools.product((-1.0, 1.0), repeat=len(us) + 2):
        values = [f(u) + s * delta for u, s in zip(us, signs)]
        moved = slope_corrected_differences(f(0.0) + signs[-2] * delta, 0.2 + signs[-1] * sigma, us, values)
        worst = max(worst, abs(moved["curvature"] - base["curvature"]))
    assert worst == pytest.approx(base["rounding"], rel=1e-6)


def test_one_sided_window_flags_steps_outside_the_asymptotic_regime_and_passes_rounding():
    from uma_callbacks.metrics.sharpness import ONE_SIDED_WINDOW as window

    hs = [0.01 * m for m in ONE_SIDED]
    smooth = lambda t: math.exp(t)  # noqa: E731  D(u) = 1 + u/3 + ...: ratio 1/2
    out = slope_corrected_differences(1.0, 1.0, hs, [smooth(u) for u in hs], window=window)
    assert out["asymptotic"] is True and out["ratio"] == pytest.approx(0.5, rel=0.05)
    assert out["curvature"] - 1.0 == pytest.approx(8 / 60 * 0.01**3, rel=0.05)  # f^(5) = 1: 8 c_3 h^3
    pole = lambda t: 1.0 / (1.0 + 100.0 * t)  # noqa: E731  f'' = 2e4; h = 0.01 is a pole's distance
    out = slope_corrected_differences(1.0, -100.0, hs, [pole(u) for u in hs], window=window)
    assert out["asymptotic"] is False and out["ratio"] == pytest.approx(1.25, rel=0.01)
    assert abs(out["curvature"] - 2e4) > 3 * out["curvature_error"]  # where the check fires, the estimate fails
    noisy = [smooth(u) + (1e-9 if k == 0 else 0.0) for k, u in enumerate(hs)]  # noise beyond the curvature's change
    flat = slope_corrected_differences(1.0, 1.0, hs, noisy, noise=1e-9, window=window)
    assert flat["asymptotic"] is True  # the differences are within what rounding can do
    assert slope_corrected_differences(1.0, 1.0, hs, [smooth(u) for u in hs])["asymptotic"] is None  # no window: no check
    with pytest.raises(ValueError, match="non-zero"):
        slope_corrected_differences(1.0, 1.0, [0.0, 0.1, 0.2], [1.0, 1.0, 1.0])


def test_central_differences_on_closed_forms():
    est, err, table = richardson([1.0 + 0.3 * h**2 + 0.2 * h**4 for h in (0.1, 0.2, 0.4)])
    assert est == pytest.approx(1.0, abs=1e-14) and len(table) == 3 and err > 0
    f = np.cosh  # f''(0) = 1, f'(0) = 0
    hs = [0.05, 0.1, 0.2]
    out = central_differences(f(0.0), [f(h) for h in hs], [f(-h) for h in hs], hs)
    assert out["curvature"] == pytest.approx(1.0, rel=1e-9) and out["asymptotic"]
    assert out["ratio"] == pytest.approx(0.25, rel=0.05)
