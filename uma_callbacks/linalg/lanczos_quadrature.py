r"""Lanczos tridiagonals for quadrature: the coefficients of T_m, not its top eigenpairs.

Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019)
needs, from each start vector q_1 [P], the m x m tridiagonal T_m = tridiag(beta, alpha,
beta) of m Lanczos steps; its eigenpairs (theta_l, y_l) give the Gauss quadrature
sum_l y_l[0]^2 delta(theta_l) of q_1^T f(A) q_1, exact for polynomials f of degree <= 2m - 1.

Two ways to build T_m:

- :func:`lanczos_tridiagonals` with ``reorthogonalise="none"``: the plain three-term
  recurrence (each new vector kept orthogonal to the two before it only), on b start
  vectors at once (``[b, P]`` blocks, one batched product per step), keeping three
  vectors per start and no basis. In floating point the vectors lose orthogonality once
  a Ritz value converges and the extreme Ritz values come back as near copies ("ghosts"),
  but the quadrature stays accurate: finite-precision Lanczos is exact Lanczos on a
  matrix whose eigenvalues lie in tiny intervals around A's (Greenbaum 1989), so a ghost
  splits its eigenvalue's weight without moving it, and the Gauss-quadrature error of
  the simple Lanczos process stays within the exact one's bounds (Knizhnerman 1996;
  Chen, Trogdon & Ubaru 2021, "Analysis of stochastic Lanczos quadrature for spectrum
  approximation").
- ``reorthogonalise="partial"`` (or ``"full"``): one start at a time through
  :func:`~uma_callbacks.linalg.lanczos.lanczos_top_k` (Simon's partial
  reorthogonalisation), which keeps the m vectors [P] of the basis.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from uma_callbacks.linalg.lanczos import LanczosProgress, lanczos_top_k

#: ways to keep the Lanczos vectors orthogonal (see the module docstring)
REORTHOGONALISE = ("none", "partial", "full")


def lanczos_tridiagonals(
    matmat_rows: Callable[[torch.Tensor], torch.Tensor],
    starts: torch.Tensor,
    steps: int,
    *,
    dtype: torch.dtype = torch.float64,
    reorthogonalise: str = "none",
    breakdown_tol: float = 1e-10,
    on_step: Callable[[int], None] | None = None,
) -> list[tuple[list[float], list[float]]]:
    """The Lanczos tridiagonal T_m of each start vector (rows of ``starts``).

    Args:
        matmat_rows: ``V [b, P] -> (A V^T)^T [b, P]`` for a symmetric A (rows in, rows out);
            with ``reorthogonalise`` other than ``"none"`` it is called with one row at a time.
        starts: ``[b, P]`` start vectors (each normalised here; their device is the products').
        steps: m, the most Lanczos steps per start (at most P).
        dtype: dtype of the vectors and coefficients (products are cast to it).
        reorthogonalise: ``"none"`` (three-term recurrence, all starts at once, three
            vectors each), ``"partial"`` or ``"full"`` (one start at a time, with its basis).
        breakdown_tol: a start's recurrence ends when beta_j < breakdown_tol x its largest
            |alpha| + beta seen (the Krylov space is exhausted: T_j is exact).
        on_step: called with the products taken so far after each step (time checks).

    Returns:
        Per start, ``(alphas [m_i], betas [m_i - 1])``: T's diagonal and off-diagonal
        (m_i < ``steps`` when its Krylov space ended).

    Raises:
        ValueError: ``reorthogonalise`` is not one of :data:`REORTHOGONALISE`, or
            ``starts`` is not ``[b, P]`` with b >= 1.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
        >>> (a, b), = lanczos_tridiagonals(lambda V: V @ A, torch.ones(1, 8, dtype=torch.float64), 4)
        >>> theta, tau = gauss_quadrature(a, b)  # exact up to degree 7 for v = 1 / sqrt(8)
        >>> round(float((tau * theta).sum()), 9), round(float((tau * theta**2).sum()), 9)
        (4.5, 25.5)
    """
    if reorthogonalise not in REORTHOGONALISE:
        raise ValueError(f"lanczos_tridiagonals.reorthogonalise must be one of {REORTHOGONALISE}; got {reorthogonalise!r}")
    if starts.dim() != 2 or starts.shape[0] < 1:
        raise ValueError(f"lanczos_tridiagonals.starts must be [b, P] with b >= 1; got {tuple(starts.shape)}")
    b, dim = starts.shape
    steps = max(1, min(int(steps), dim))
    if reorthogonalise != "none":
        out = []
        done = 0
        for row in starts:
            progress = LanczosProgress()
            lanczos_top_k(
                lambda v: matmat_rows(v.reshape(1, -1))[0],
                dim,
                1,
                max_iter=steps,
                tol=0.0,
                dtype=dtype,
                device=starts.device,
                start=row,
                check_every=steps + 1,  # no convergence test: every step is wanted
                reorthogonalise=reorthogonalise,
                on_step=None,
                progress=progress,
            )
            m = len(progress.alphas)
            out.append((list(progress.alphas), list(progress.betas[: m - 1])))
            done += m
            if on_step is not None:
                on_step(done)
        return out
    return _three_term(matmat_rows, starts.to(dtype), steps, breakdown_tol, on_step)


def _three_term(
    matmat_rows: Callable[[torch.Tensor], torch.Tensor],
    starts: torch.Tensor,
    steps: int,
    breakdown_tol: float,
    on_step: Callable[[int], None] | None,
) -> list[tuple[list[float], list[float]]]:
    """The plain recurrence on every start at once; a start whose space ended leaves the block.

    Each start keeps [q_{j-1}; q_j] in a ring ``[b, 2, P]``. One step: w = A q_j, then
    c = [q_{j-1}; q_j] w (alpha_j = c[j]) and w -= [q_{j-1}; q_j]^T c (both projections
    removed with their measured coefficients: one pass each way over w), beta_j = ||w||,
    q_{j+1} = w / beta_j written over q_{j-1}.
    """
    b, dim = starts.shape
    ring = torch.zeros(b, 2, dim, dtype=starts.dtype, device=starts.device)
    ring[:, 0] = starts / starts.norm(dim=1, keepdim=True)
    cur = 0
    alphas: list[list[float]] = [[] for _ in range(b)]
    betas: list[list[float]] = [[] for _ in range(b)]
    scale = np.zeros(b)
    live = list(range(b))  # the starts still running, in the block's row order
    products = 0
    for step in range(steps):
        w = matmat_rows(ring[:, cur]).detach().to(ring.dtype)
        if w.data_ptr() == ring.data_ptr() or not w.is_contiguous():
            w = w.clone()
        products += len(live)
        coef = torch.bmm(ring, w.unsqueeze(2))  # [b, 2, 1]
        w.unsqueeze(1).baddbmm_(coef.transpose(1, 2), ring, alpha=-1)
        alpha = coef[:, cur, 0].double().cpu()
        beta = w.norm(dim=1).double().cpu()
        keep = []
        for row, start in enumerate(live):
            alphas[start].append(float(alpha[row]))
            scale[start] = max(scale[start], abs(float(alpha[row])) + float(beta[row]))
            if step + 1 < steps and float(beta[row]) > breakdown_tol * max(scale[start], 1e-300):
                betas[start].append(float(beta[row]))
                keep.append(row)
        if on_step is not None:
            on_step(products)
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=ring.device)
            ring, w, beta = ring.index_select(0, index), w.index_select(0, index), beta[keep]
            live = [live[row] for row in keep]
        torch.div(w, beta.to(w.dtype).to(w.device)[:, None], out=ring[:, 1 - cur])
        cur = 1 - cur
        del w
    return [(alphas[i], betas[i]) for i in range(b)]


def gauss_quadrature(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Nodes theta_l and weights tau_l = y_l[0]^2 of the Lanczos tridiagonal T_m (float64).

    Args:
        alphas: T's diagonal [m].
        betas: its off-diagonal; the first m - 1 are used (a run that stopped at its step
            limit may also hold the residual's beta_m).

    Returns:
        ``(theta [m], tau [m])``, theta ascending, tau summing to 1.

    Example:
        >>> theta, tau = gauss_quadrature([2.0, 2.0], [1.0])
        >>> theta.round(6).tolist(), tau.round(6).tolist()
        ([1.0, 3.0], [0.5, 0.5])
    """
    m = len(alphas)
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if m > 1:
        off = np.asarray(betas[: m - 1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    theta, vecs = np.linalg.eigh(t)
    tau = vecs[0, :] ** 2
    return theta, tau / tau.sum()
