r"""Hutchinson's stochastic trace estimator with Rademacher probes, and its standard error.

For a symmetric operator A [P, P] and m probe vectors z_j [P] with i.i.d. entries +-1
(Rademacher), E[z^T A z] = tr(A) (Hutchinson 1989, "A stochastic estimator of the trace
of the influence matrix for Laplacian smoothing splines"). The estimate and its standard
error are

    t_j = z_j^T A z_j,   trace = (1/m) sum_j t_j,
    stderr = sqrt( (1/(m-1)) sum_j (t_j - trace)^2 / m ),

and Var[t_j] = 2 (||A||_F^2 - sum_i A_ii^2), the smallest of any i.i.d. probe
distribution with unit variance. The probes come from a local ``torch.Generator`` seeded
with a recorded seed: the global RNG is never touched, and every rank draws the same
probes (needed when ``A v`` is all-reduced across ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from uma_callbacks.core.numerics import dot64


@dataclass
class HutchinsonResult:
    """Output of :func:`hutchinson_trace`.

    Attributes:
        trace: the estimate (1/m) sum_j z_j^T A z_j.
        stderr: its standard error (NaN for m < 2).
        samples: ``[m]`` float64, the individual t_j = z_j^T A z_j.
        matvecs: products taken (m).
        seed: the seed of the probe generator.
    """

    trace: float
    stderr: float
    samples: torch.Tensor
    matvecs: int
    seed: int


def rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A vector ``[dim]`` of i.i.d. +-1 entries drawn from ``generator`` (CPU).

    Args:
        dim: length P.
        generator: a CPU ``torch.Generator``.
        dtype: floating dtype of the result.

    Returns:
        ``[dim]`` with entries in {-1, +1}.
    """
    # 64 signs per drawn word (the bits of random int64 words, little-endian by byte):
    # a fifth of the time of one draw per entry on 22.7M entries
    words = torch.randint(-(2**63), 2**63 - 1, ((dim + 63) // 64,), generator=generator, dtype=torch.int64)
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (words.view(torch.uint8)[:, None] >> shifts).bitwise_and_(1).reshape(-1)[:dim]
    return bits.to(dtype).mul_(2).sub_(1)


def hutchinson_trace(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    n_samples: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    matmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
    block_size: int = 1,
    done: list[float] | None = None,
) -> HutchinsonResult:
    """Estimate tr(A) from ``n_samples`` Rademacher probes (see the module docstring).

    Args:
        matvec: ``z [P] -> A z [P]`` for a symmetric A.
        dim: P.
        n_samples: number of probes m (>= 1; the standard error needs m >= 2).
        seed: seeds the local probe generator.
        dtype: dtype of the probes passed to ``matvec``.
        device: device of the probes passed to ``matvec``.
        matmat: ``Z [P, b] -> A Z`` to multiply ``block_size`` probes at once (the same
            probes in the same order, so the same estimate up to rounding).
        block_size: probes per ``matmat`` call.
        done: each t_j is appended here as soon as it is taken: what a run stopped from
            outside (a time limit raised inside a product) finished. The first j probes
            are those of a run with ``n_samples=j`` (the same generator sequence).

    Returns:
        :class:`HutchinsonResult`.

    Raises:
        ValueError: ``n_samples < 1`` or ``dim < 1``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> r = hutchinson_trace(lambda z: A @ z, 10, 5, seed=0)
        >>> r.trace, r.stderr                     # exact for a diagonal A: z_i^2 = 1
        (55.0, 0.0)
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"hutchinson_trace.n_samples must be a positive integer; got {n_samples!r}")
    if dim < 1:
        raise ValueError(f"hutchinson_trace.dim must be >= 1; got {dim!r}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    samples = torch.empty(n_samples, dtype=torch.float64)
    if matmat is not None and block_size > 1:
        for start in range(0, n_samples, block_size):
            count = min(block_size, n_samples - start)
            z = torch.stack([rademacher(dim, generator, dtype) for _ in range(count)], dim=1).to(device)
            az = matmat(z)
            samples[start : start + count] = (z.to(torch.float64) * az.to(torch.float64)).sum(0).cpu()
            if done is not None:
                done.extend(samples[start : start + count].tolist())
    else:
        for j in range(n_samples):
            z = rademacher(dim, generator, dtype).to(device)
            az = matvec(z)
            samples[j] = dot64(z, az)
            if done is not None:
                done.append(float(samples[j]))
    trace, stderr = mean_and_stderr(samples)
    return HutchinsonResult(trace=trace, stderr=stderr, samples=samples, matvecs=n_samples, seed=int(seed))


def mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    """``(mean, std(ddof=1) / sqrt(m))`` of ``samples [m]``; the stderr is NaN for m < 2."""
    m = samples.numel()
    mean = float(samples.to(torch.float64).mean())
    if m < 2:
        return mean, math.nan
    return mean, float(samples.to(torch.float64).std(correction=1)) / math.sqrt(m)


#: A trace is ``partial`` when its standard error exceeds this share of |trace|: beyond
#: it the estimate does not even have a sign one can rely on (two standard errors).
TRACE_STDERR_SHARE = 0.5
#: The share the budget's scaling plans for (:func:`probes_needed`): a third of |trace|,
#: a margin over :data:`TRACE_STDERR_SHARE` for a spread measured on few probes and its
#: drift from one checkpoint to the next.
PLANNED_STDERR_SHARE = 1.0 / 3.0
#: The spread assumed before any was measured: for a positive semi-definite A,
#: Var[t_j] = 2 (||A||_F^2 - sum_i A_ii^2) <= 2 tr(A)^2, so std(t_j) / |tr A| <= sqrt(2).
ASSUMED_SPREAD = math.sqrt(2.0)
#: The fewest probes the scaling ever plans (the standard error needs two; four as before).
MIN_PROBES = 4


def trace_spread(result: HutchinsonResult) -> float:
    """std(t_j) / |trace|: the relative spread of one probe (``inf`` for a zero trace, NaN for m < 2)."""
    if result.samples.numel() < 2:
        return math.nan
    std = float(result.samples.to(torch.float64).std(correction=1))
    return std / abs(result.trace) if result.trace != 0 else (math.inf if std > 0 else 0.0)


def trace_too_uncertain(trace: float, stderr: float) -> bool:
    """Whether ``stderr`` exceeds :data:`TRACE_STDERR_SHARE` of ``|trace|`` (a ``partial`` trace).

    Example:
        >>> trace_too_uncertain(34.0, 41.0), trace_too_uncertain(34.0, 10.0)
        (True, False)
    """
    return math.isfinite(stderr) and stderr > TRACE_STDERR_SHARE * abs(trace)


def probes_needed(spread: float | None) -> int:
    """The probes m whose expected standard error is :data:`PLANNED_STDERR_SHARE` of |trace|.

    The standard error of m probes is about spread * |trace| / sqrt(m), so
    m = ceil((spread / PLANNED_STDERR_SHARE)^2) = ceil(9 spread^2), at least
    :data:`MIN_PROBES`. ``spread``: std(t_j) / |trace| measured on an earlier run
    (:func:`trace_spread`); ``None`` or NaN: :data:`ASSUMED_SPREAD` (18 probes); ``inf``
    (a zero trace): no finite count suffices (a huge number; the caller caps it).

    Example:
        >>> probes_needed(None), probes_needed(2.7), probes_needed(0.1)
        (18, 66, 4)
    """
    if spread is None or math.isnan(spread):
        spread = ASSUMED_SPREAD
    if not math.isfinite(spread):
        return 1 << 30
    return max(MIN_PROBES, math.ceil((spread / PLANNED_STDERR_SHARE) ** 2 - 1e-9))
