r"""Second derivatives from a few function values: polynomial extrapolation to h -> 0, with error estimates and rounding bounds.

A finite-difference quotient A(u) at step u approaches the derivative a as u -> 0 with an
error series, A(u) = a + c_1 u + c_2 u^2 + ... . Extrapolating the polynomial through
A(u_0), ..., A(u_m) to u = 0 (Neville's scheme) removes the first m terms; on geometric
steps u_k = r^k h this is Richardson extrapolation (Richardson 1911), and on an even series
(A a function of u^2) it is Richardson in h^2. Two quotients of f along a line:

- the central second difference (f(h) - 2 f(0) + f(-h)) / h^2 = f'' + f'''' h^2 / 12 + ...,
  an even series (:func:`central_differences`, on steps h, rh, r^2 h);
- with the slope s = f'(0) known exactly, the one-point quotient
  D(u) = 2 (f(u) - f(0) - u s) / u^2 = f'' + f''' u / 3 + f'''' u^2 / 12 + f^(5) u^3 / 60 + ...
  at any signed u, one function value each (:func:`slope_corrected_differences`).

Each estimate comes with ``error`` = |R - P| (R the last extrapolation, P the one before it
from the two smallest steps: the size of the last term removed, which bounds the truncation
while the series is in its asymptotic regime) plus a bound on what rounding of at most
``noise`` in each f value (and ``slope_noise`` in s) does to R, from R's exact linear weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: Step sizes h, RATIO h, RATIO^2 h of the central scheme.
RATIO = 2.0
#: Largest noise gain of the central Richardson second derivative: with noise delta in each f,
#: D(h_k) is off by at most 4 delta / h_k^2 and R_2 = (64 D(h) - 20 D(2h) + D(4h)) / 45 by
#: (256 + 20 + 1/4) / 45 delta / h^2.
NOISE_GAIN = 276.25 / 45.0
#: Central scheme: in the asymptotic regime (D(h) = f'' + c h^2), (D(2h) - D(h)) / (D(4h) - D(2h)) = 1/4;
#: outside this window the steps are too large (or rounding dominates) and the result is partial.
RATIO_WINDOW = (0.125, 0.5)


def neville(nodes: Sequence[float], values: Sequence[float]) -> tuple[float, float, list[list[float]]]:
    r"""Extrapolation to u = 0 of the polynomial through ``(nodes[k], values[k])`` (Neville's scheme).

    Level j holds P_{k..k+j}(0), the value at 0 of the degree-j polynomial through nodes
    k..k+j: P_{k..k+j} = (u_{k+j} P_{k..k+j-1} - u_k P_{k+1..k+j}) / (u_{k+j} - u_k). For
    A(u) = a + c_1 u + c_2 u^2 + ..., level j removes c_1 .. c_j; on nodes u_k = r^k h it is
    Richardson's table with the error series in h, h^2, h^3, ...

    Args:
        nodes: u_k, distinct, the smallest |u| first (the error estimate compares the last
            level with the previous level's first value, from the first nodes).
        values: A(u_k) (as many as ``nodes``, at least 1).

    Returns:
        ``(estimate, error, table)``: the last level's single value, its distance to the
        level before's first value (``inf`` for one node), and the table of levels.

    Raises:
        ValueError: ``nodes`` and ``values`` differ in length, are empty, or two nodes coincide.

    Example:
        >>> a = lambda u: 3.0 + 2.0 * u - 5.0 * u**2  # A(u) with a = 3
        >>> est, err, _ = neville([-0.1, 0.1, 0.2], [a(-0.1), a(0.1), a(0.2)])
        >>> round(est, 12), round(err, 12)  # exact for a quadratic; error = |c_2 u_0 u_1|
        (3.0, 0.05)
    """
    if len(nodes) != len(values) or not nodes:
        raise ValueError(f"neville needs as many nodes as values, at least one; got {len(nodes)} and {len(values)}")
    if len(set(map(float, nodes))) != len(nodes):
        raise ValueError(f"neville needs distinct nodes; got {list(nodes)}")
    u = [float(x) for x in nodes]
    table = [[float(v) for v in values]]
    while len(table[-1]) > 1:
        j = len(table)
        prev = table[-1]
        table.append([(u[k + j] * prev[k] - u[k] * prev[k + 1]) / (u[k + j] - u[k]) for k in range(len(prev) - 1)])
    estimate = table[-1][0]
    error = abs(estimate - table[-2][0]) if len(table) > 1 else math.inf
    return estimate, error, table


def neville_weights(nodes: Sequence[float]) -> list[list[list[float]]]:
    """The linear weights of every entry of Neville's table: ``weights[j][k][i]`` = d table[j][k] / d values[i].

    The table is linear in the values, so each entry is sum_i w_i A(u_i); the weights give
    exact rounding bounds (sum_i |w_i| delta_i).

    Example:
        >>> neville_weights([-1.0, 1.0, 2.0])[-1][0]  # R = A(-h) / 3 + A(h) - A(2h) / 3
        [0.3333333333333333, 1.0, -0.3333333333333333]
    """
    n = len(nodes)
    columns = [neville(nodes, [1.0 if i == k else 0.0 for i in range(n)])[2] for k in range(n)]
    return [[[columns[i][j][k] for i in range(n)] for k in range(len(columns[0][j]))] for j in range(n)]


def richardson(values: Sequence[float], ratio: float = RATIO) -> tuple[float, float, list[list[float]]]:
    r"""Richardson extrapolation to h -> 0 of a central difference with an even error series.

    ``values[k]`` = A(h_k) at h_k = ratio^k h with A(h) = a + c_1 h^2 + c_2 h^4 + ...; level
    j removes the h^{2j} term: R_j[k] = (r^{2j} R_{j-1}[k] - R_{j-1}[k+1]) / (r^{2j} - 1), R_0 = values.

    Args:
        values: A(h_0), A(h_1), ... (at least 2).
        ratio: h_{k+1} / h_k.

    Returns:
        ``(estimate, error, table)``: the last level's single value, its distance to the
        level before's first value (the error estimate), and the table of levels.

    Example:
        >>> f = lambda h: 3.0 + 2.0 * h**2 + 5.0 * h**4  # A(h) with a = 3
        >>> est, err, _ = richardson([f(0.1), f(0.2), f(0.4)])
        >>> round(est, 12), err < 1e-2
        (3.0, True)
    """
    table = [list(map(float, values))]
    while len(table[-1]) > 1:
        j = len(table)
        w = ratio ** (2 * j)
        prev = table[-1]
        table.append([(w * prev[k] - prev[k + 1]) / (w - 1.0) for k in range(len(prev) - 1)])
    estimate = table[-1][0]
    error = abs(estimate - table[-2][0]) if len(table) > 1 else math.inf
    return estimate, error, table


def central_differences(
    f0: float, plus: Sequence[float], minus: Sequence[float], steps: Sequence[float], noise: float = 0.0
) -> dict[str, Any]:
    r"""First and second derivatives of f at 0 from f(0), f(+h_k), f(-h_k), with Richardson.

    - second differences D(h) = (f(h) - 2 f(0) + f(-h)) / h^2 = f'' + f'''' h^2 / 12 + ...;
    - first differences C(h) = (f(h) - f(-h)) / (2 h) = f' + f''' h^2 / 6 + ...;

    each extrapolated by :func:`richardson` over the step sizes (ratio ``steps[1] / steps[0]``).

    ``curvature_error`` = |R_2 - R_1| + :data:`NOISE_GAIN` x ``noise`` / h^2: the truncation
    estimate plus a bound on what a rounding error of at most ``noise`` in each f does.
    ``asymptotic``: the second differences shrink as h^2 (their ratio
    (D(2h) - D(h)) / (D(4h) - D(2h)) within :data:`RATIO_WINDOW`), or differ by no more
    than rounding; where not, no estimate from these steps is trustworthy.

    Args:
        f0: f(0).
        plus: f(+h_k) for each step.
        minus: f(-h_k) for each step.
        steps: h_k, ascending, in a constant ratio.
        noise: a bound on the rounding error of each f value.

    Returns:
        ``{"curvature", "curvature_error", "slope", "slope_error", "second_differences",
        "first_differences", "ratio", "asymptotic"}``.

    Example:
        >>> f = lambda x: 1.0 + 0.5 * x + 2.0 * x**2 - x**3 + x**4
        >>> hs = [0.01, 0.02, 0.04]
        >>> out = central_differences(f(0.0), [f(h) for h in hs], [f(-h) for h in hs], hs)
        >>> round(out["curvature"], 10), round(out["slope"], 10), out["asymptotic"]
        (4.0, 0.5, True)
    """
    ratio = steps[1] / steps[0] if len(steps) > 1 else RATIO
    second = [(p - 2.0 * f0 + m) / (h * h) for p, m, h in zip(plus, minus, steps)]
    first = [(p - m) / (2.0 * h) for p, m, h in zip(plus, minus, steps)]
    curvature, truncation, _ = richardson(second, ratio)
    slope, slope_error, _ = richardson(first, ratio)
    rounding = NOISE_GAIN * noise / (steps[0] * steps[0])
    q = _shrink_ratio(second)
    asymptotic = True
    if len(second) >= 3:
        within_rounding = abs(second[2] - second[0]) <= 2.0 * rounding
        asymptotic = within_rounding or (RATIO_WINDOW[0] <= q <= RATIO_WINDOW[1])
    return {
        "curvature": curvature,
        "curvature_error": truncation + rounding,
        "slope": slope,
        "slope_error": slope_error,
        "second_differences": second,
        "first_differences": first,
        "ratio": q,
        "asymptotic": asymptotic,
    }


def _rounding_bound(weights: Sequence[float], nodes: Sequence[float], noise: float, slope_noise: float) -> float:
    r"""The largest change of sum_k w_k D(u_k) when each f(u_k) and f(0) moves by at most ``noise`` and s by ``slope_noise``.

    D(u) = 2 (f(u) - f(0) - u s) / u^2: each f(u_k) enters alone (weight 2 w_k / u_k^2), f(0)
    and s once for all (sum_k 2 w_k / u_k^2, sum_k 2 w_k / u_k).
    """
    own = sum(abs(w) * 2.0 / (u * u) for w, u in zip(weights, nodes))
    center = abs(sum(w * 2.0 / (u * u) for w, u in zip(weights, nodes)))
    slope = abs(sum(w * 2.0 / u for w, u in zip(weights, nodes)))
    return (own + center) * noise + slope * slope_noise


def slope_corrected_differences(
    f0: float,
    slope: float,
    offsets: Sequence[float],
    values: Sequence[float],
    noise: float = 0.0,
    slope_noise: float = 0.0,
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    r"""f''(0) from f(0), the exact slope s = f'(0) and one value f(u_k) per signed offset, by Neville extrapolation.

    D(u) = 2 (f(u) - f(0) - u s) / u^2 = f'' + c_1 u + c_2 u^2 + c_3 u^3 + ... with
    c_1 = f'''/3, c_2 = f''''/12, c_3 = f^(5)/60; :func:`neville` through three D(u_k)
    removes c_1 and c_2, leaving the truncation R - f'' = c_3 u_0 u_1 u_2 + ... . On offsets
    (-h, h, 2h), R = D(-h)/3 + D(h) - D(2h)/3 with truncation -2 c_3 h^3; on (h, 2h, 4h)
    (one-sided: Richardson in h, then h^2), R = (8 D(h) - 6 D(2h) + D(4h)) / 3 with 8 c_3 h^3.

    ``curvature_error`` = |R - P_01| (P_01 the line through the two smallest offsets: the
    size of the c_2 term, which bounds R's truncation while the series is in its asymptotic
    regime) plus the rounding bound: with ``noise`` in each f value and ``slope_noise`` in s,
    R moves by at most (sum_k |w_k| 2/u_k^2 + |sum_k w_k 2/u_k^2|) noise
    + |sum_k w_k 2/u_k| slope_noise (w_k R's weights; 5.33 noise / h^2 + slope_noise / h on
    (-h, h, 2h), 10.75 noise / h^2 + 3.5 slope_noise / h on (h, 2h, 4h)).

    ``asymptotic`` (only with a ``window``, else ``None``): the ratio
    q = (D(u_1) - D(u_0)) / (D(u_2) - D(u_1)) lies in ``window``, or D(u_2) and D(u_0)
    differ by no more than rounding can. Three values leave no other check: R fits them
    exactly, so its two level-one values always stand in the ratio u_2 / u_0 around it.

    Args:
        f0: f(0).
        slope: f'(0), exact (from a backward pass).
        offsets: u_k, distinct and non-zero, the smallest |u| first.
        values: f(u_k).
        noise: a bound on the rounding error of each f value (f(0) included).
        slope_noise: a bound on the error of ``slope``.
        window: the range of q where the differences behave as the leading terms of the
            series predict (three offsets), or ``None``.

    Returns:
        ``{"curvature", "curvature_error", "truncation", "rounding", "second_differences"
        (the D(u_k)), "ratio" (q; NaN with fewer than three offsets), "asymptotic"}``.

    Raises:
        ValueError: an offset is zero (and those :func:`neville` raises).

    Example:
        >>> f = lambda x: 1.0 + 0.5 * x + 2.0 * x**2 - x**3 + x**4  # f''(0) = 4
        >>> us = [-0.01, 0.01, 0.02]
        >>> out = slope_corrected_differences(f(0.0), 0.5, us, [f(u) for u in us])
        >>> round(out["curvature"], 10), out["truncation"] < 1e-3, out["asymptotic"]
        (4.0, True, None)
    """
    if any(u == 0.0 for u in offsets):
        raise ValueError(f"slope_corrected_differences needs non-zero offsets; got {list(offsets)}")
    nodes = [float(u) for u in offsets]
    second = [2.0 * (v - f0 - u * slope) / (u * u) for u, v in zip(nodes, values)]
    curvature, truncation, _ = neville(nodes, second)
    rounding = _rounding_bound(neville_weights(nodes)[-1][0], nodes, noise, slope_noise)
    q = _shrink_ratio(second)
    asymptotic: bool | None = None
    if len(second) >= 3:
        if window is not None:
            spread = [-1.0, 0.0, 1.0] + [0.0] * (len(nodes) - 3)  # D(u_2) - D(u_0)
            within_rounding = abs(second[2] - second[0]) <= _rounding_bound(spread, nodes, noise, slope_noise)
            asymptotic = within_rounding or (window[0] <= q <= window[1])
    return {
        "curvature": curvature,
        "curvature_error": truncation + rounding,
        "truncation": truncation,
        "rounding": rounding,
        "second_differences": second,
        "ratio": q,
        "asymptotic": asymptotic,
    }


def _shrink_ratio(second: Sequence[float]) -> float:
    """(D_1 - D_0) / (D_2 - D_1) of the first three differences: how fast they settle (NaN with fewer, or a zero step)."""
    if len(second) < 3:
        return math.nan
    near, far = second[1] - second[0], second[2] - second[1]
    return near / far if far != 0.0 else math.nan
