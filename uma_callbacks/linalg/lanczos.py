"""Top eigenvalues of a symmetric operator by Lanczos with reorthogonalisation.

Given a matrix-free product ``v -> A v`` on vectors ``[P]``, m Lanczos steps build an
orthonormal basis Q [P, m] of the Krylov space and the tridiagonal T = Q^T A Q [m, m];
the eigenvalues of T (Ritz values) approximate the extreme eigenvalues of A, the
largest first (Lanczos 1950; used for network spectra by Ghorbani et al. 2019 and
Papyan 2020). :func:`lanczos_top_k` applies the three-term recurrence, then
reorthogonalises against the whole basis (classical Gram-Schmidt, a second pass only when
the first cancelled most of the vector) whenever Simon's estimate of the lost
orthogonality passes sqrt(eps) (partial reorthogonalisation; ``reorthogonalise="full"``:
at every step), which keeps the Ritz values free of spurious copies. The block variant
reorthogonalises every block.

Convergence: the residual of Ritz pair (theta_j, y_j) is |beta_m * y_j[m]|; we stop when
every one of the top-k residuals is below ``tol * max(|theta_1|, tiny)``, or when the
Krylov space is exhausted (beta ~ 0: A has rank < m on the start vector's span).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class LanczosResult:
    """What a Lanczos run found: the top Ritz values, their residuals and the work it took.

    Attributes:
        eigenvalues: ``[k']`` Ritz values, descending (k' <= k when the space ran out).
        eigenvectors: ``[P, k']`` Ritz vectors (None unless asked for).
        matvecs: products taken.
        converged: whether the residual criterion was met (or the space was exhausted).
        residuals: ``[k']`` Ritz residual bounds |beta_m y_j[m]|.
        reorthogonalised: steps whose vector was reorthogonalised against the whole basis
            (:func:`lanczos_top_k`; ``None`` elsewhere).
        basis_rows_read: basis rows those passes read (each pass reads its rows twice), the
            cost that dominates when P is large (:func:`lanczos_top_k`; ``None`` elsewhere).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    matvecs: int
    converged: bool
    residuals: torch.Tensor
    reorthogonalised: int | None = None
    basis_rows_read: int | None = None


@dataclass
class LanczosProgress:
    """What a Lanczos run has built so far, for a caller that stops it from outside.

    Pass one to :func:`lanczos_top_k` or :func:`block_lanczos_top_k` (``progress=``); the
    run fills it as it goes. When the run is stopped mid-way (a time limit raised inside a
    product), :meth:`result` gives the Ritz values and residuals of the steps it completed:
    exactly what a run with ``max_iter`` (``max_matvecs``) equal to those steps' products
    returns, without vectors.

    Attributes:
        k: eigenvalues wanted.
        dtype: the run's dtype.
        alphas: the tridiagonal's diagonal, one per completed step (classical Lanczos).
        betas: its off-diagonal, beta_j of each completed step (beta_m last: the residual's).
        ritz: ``(values, residuals, matvecs)`` of the last completed block step (block Lanczos).
    """

    k: int = 0
    dtype: torch.dtype = torch.float64
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    ritz: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def result(self) -> LanczosResult | None:
        """The top-k Ritz values and residuals of the completed steps; ``None`` before the first.

        ``converged`` is False: the run was stopped, whatever the residuals say (compare them
        with :func:`within_tolerance`).
        """
        if self.ritz is not None:
            vals, residuals, matvecs = self.ritz
            kk = min(self.k, vals.numel())
            return LanczosResult(vals[:kk].to(self.dtype).clone(), None, matvecs, False, residuals[:kk].to(self.dtype).clone())
        m = min(len(self.alphas), len(self.betas))
        if m == 0:
            return None
        vals, vecs = _tridiag_eigh(self.alphas[:m], self.betas[: m - 1], self.dtype)
        residuals = (self.betas[m - 1] * vecs[-1, : self.k]).abs()
        kk = min(self.k, vals.numel())
        return LanczosResult(vals[:kk].clone(), None, m, False, residuals[:kk].clone())


def relative_residuals(result: LanczosResult) -> torch.Tensor:
    """``[k']`` float64: each Ritz residual divided by max(|theta_1|, tiny), the measure ``tol`` is compared with.

    theta_1 is the largest magnitude among the returned Ritz values.
    """
    res = result.residuals.to(torch.float64).cpu()
    if result.eigenvalues.numel() == 0:
        return res
    scale = max(float(result.eigenvalues.to(torch.float64).abs().max()), 1e-300)
    return res / scale


def within_tolerance(result: LanczosResult, residual_tol: float) -> bool:
    """Whether every relative residual (:func:`relative_residuals`) is <= ``residual_tol``.

    An exhausted Krylov space leaves residuals ~0: the Ritz values are then exact. A metric
    reports ``status="partial"`` when this is False (values kept, residuals in meta).

    Example:
        >>> r = LanczosResult(torch.tensor([2.0, 1.0]), None, 4, False, torch.tensor([1e-3, 0.1]))
        >>> within_tolerance(r, 1e-2), within_tolerance(r, 0.1)
        (False, True)
    """
    rel = relative_residuals(result)
    return bool((rel <= residual_tol).all())


def lanczos_top_k(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    basis_device: torch.device | str | None = None,
    return_vectors: bool = False,
    check_every: int = 2,
    breakdown_tol: float = 1e-10,
    start: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    total_dim: int | None = None,
    reorthogonalise: str = "partial",
    product_is_scratch: bool = False,
    progress: LanczosProgress | None = None,
) -> LanczosResult:
    """The ``k`` largest (algebraic) eigenvalues of a symmetric operator.

    Sharded vectors (``reduce_sum`` given): each process holds its piece ``[dim]`` of every
    vector (the pieces of all processes, concatenated, are the full vector of ``total_dim``
    entries), ``matvec`` maps pieces to pieces, and every inner product is a local partial
    sum completed by ``reduce_sum`` (a sum over processes): the dot products
    alpha = w^T v, the projection coefficients Q w [m] and the squared norms (of the start
    vector, of w before and after each Gram-Schmidt pass, beta^2). T, the Ritz values and
    the stopping decisions are then the same on every process, and each one holds only
    its piece of the basis (``max_iter x dim`` entries).

    Args:
        matvec: ``v [P] -> A v [P]``, symmetric A.
        dim: P.
        k: eigenvalues wanted (capped at ``dim``).
        max_iter: the most Lanczos steps (default ``min(dim, max(3k, k + 30))``).
        tol: relative residual tolerance on each of the top-k Ritz values.
        seed: seeds the Gaussian start vector (a local generator; global RNG untouched).
        dtype: dtype of the basis and of T (products are cast to it).
        device: device of the vectors passed to ``matvec``.
        basis_device: where the basis Q is stored (default ``device``; ``"cpu"`` saves
            accelerator memory at the cost of transfers).
        return_vectors: also return the Ritz vectors ``[P, k]``.
        check_every: test convergence every this many steps.
        breakdown_tol: stop when beta < breakdown_tol * ||T|| (invariant subspace found).
        start: the start vector ``[P]`` (normalised here; default Gaussian from ``seed``).
        on_step: called with ``(products, top-k Ritz residuals)`` at each convergence check.
        reduce_sum: sums a tensor of local partial inner products over processes (returns
            the sum); ``None``: one process, the vectors are whole.
        total_dim: the full vectors' entries when sharded (caps ``k`` and ``max_iter``;
            the same on every process); default ``dim``.
        reorthogonalise: ``"partial"`` (default): a new vector is reorthogonalised against
            the whole basis only when the estimated loss of orthogonality max_k |q_{j+1}^T q_k|
            exceeds a quarter of sqrt(max(eps, delta)), then for two consecutive vectors
            (Simon 1984, "The Lanczos algorithm with partial reorthogonalization": the
            estimates follow the omega recurrence on alpha and beta alone, so they cost
            nothing next to a pass over the basis). delta is the working precision, measured
            each step as |q_{j-1}^T A q_j - beta_{j-1}| / ||A||: the operator's asymmetry plus
            the rounding of float32 inner products over millions of entries (about 3e-4 for the
            MiniLM's Hessian-vector products, and as much for an exactly symmetric float32
            diagonal operator of 2M entries); orthogonality finer than the square root of that
            buys nothing the rounding does not undo. Each pass reads the whole basis twice,
            which dominates when the products are cheap and P large; the Ritz values match
            full reorthogonalisation's (tested). ``"full"``: every new vector.
        product_is_scratch: ``matvec``'s result may be written over (a buffer the caller
            reuses, or a fresh tensor): it becomes the work vector instead of being copied
            into one (a pass over [P] each step). Ignored for a result that shares memory
            with the vector passed in or the basis, or is not a contiguous ``[P]`` of ``dtype``.
        progress: filled step by step (:class:`LanczosProgress`): what a stopped run finished.

    Returns:
        :class:`LanczosResult` (``eigenvectors`` are this process's pieces when sharded).

    Raises:
        ValueError: ``reorthogonalise`` is neither ``"full"`` nor ``"partial"``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> r = lanczos_top_k(lambda v: A @ v, 50, 3, tol=1e-10, max_iter=50)
        >>> [round(x, 6) for x in r.eigenvalues.tolist()], r.converged
        ([50.0, 49.0, 48.0], True)

        An evenly spaced spectrum is Lanczos's hardest case: with the default
        ``max_iter`` (33 here) the third value is 47.95 and ``converged`` is False.
    """
    full = dim if total_dim is None else total_dim
    k = min(k, full)
    if max_iter is None:
        max_iter = min(full, max(3 * k, k + 30))
    max_iter = max(min(max_iter, full), k)
    basis_device = torch.device(basis_device or device)
    if start is not None and start.shape == (dim,) and _norm(start.detach().to(dtype), reduce_sum) > 0:
        v = start.detach().to(device=device, dtype=dtype)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    basis = torch.empty(max_iter, dim, dtype=dtype, device=basis_device)
    # v is written where it is kept: a row of the basis when the basis lives with the products,
    # else a two-row ring on the product device ([q_{j-1}; q_j] in some order) copied to the
    # basis. Writing the new vector straight into fresh basis memory by the division costs its
    # page faults once, in parallel, instead of a division and a copy.
    on_basis = _same_device(basis_device, torch.device(device))
    ring = None if on_basis else torch.empty(2, dim, dtype=dtype, device=device)
    first = basis[0] if on_basis else ring[0]
    torch.div(v, _norm(v, reduce_sum), out=first)
    if not on_basis:
        basis[0].copy_(first)
    v = first
    work: torch.Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []
    if progress is not None:  # the same lists: a completed step is one alpha and one beta
        progress.k, progress.dtype, progress.alphas, progress.betas, progress.ritz = k, dtype, alphas, betas, None
    matvecs = 0
    converged = False
    beta = 0.0
    ritz_vals = torch.zeros(0, dtype=dtype)
    ritz_vecs_t = torch.zeros(0, 0, dtype=dtype)
    residuals = torch.zeros(0, dtype=dtype)
    if reorthogonalise not in ("full", "partial"):
        raise ValueError(f"lanczos_top_k.reorthogonalise must be 'full' or 'partial'; got {reorthogonalise!r}")
    partial = reorthogonalise == "partial"
    eps = float(torch.finfo(dtype).eps)
    omega_prev = torch.zeros(0, dtype=torch.float64)  # estimates of q_{j-1}^T q_k, k < j
    omega = torch.ones(1, dtype=torch.float64)  # estimates of q_j^T q_k, k <= j
    again = False
    passes, rows_read, anorm, delta = 0, 0, 0.0, eps
    for step in range(max_iter):
        # [q_{j-1}; q_j] as two contiguous rows (one row at the first step), q_j at index cur
        if on_basis:
            pair, cur = basis[max(step - 1, 0) : step + 1], min(step, 1)
        else:
            pair, cur = (ring, step % 2) if step > 0 else (ring[:1], 0)
        product = matvec(v).detach()
        matvecs += 1
        if product_is_scratch and _is_private(product, dim, dtype, v, basis, ring):
            w = product  # the caller's buffer, written over in place
        else:  # reused (a fresh P-sized vector costs its page faults); a graph is read as numbers
            work = torch.empty(dim, dtype=dtype, device=device) if work is None else work
            w = work.copy_(product)
        del product
        # the three-term recurrence with measured coefficients, one pass each way over w:
        # c = [q_{j-1}; q_j] w gives alpha = q_j^T A q_j and q_{j-1}^T A q_j (beta_{j-1} up to
        # the operator's asymmetry and rounding); w -= [q_{j-1}; q_j]^T c removes both (local
        # reorthogonalisation against q_{j-1}: what beta_{j-1} misses is not left in w)
        coef = _reduced(pair @ w, reduce_sum)
        alpha = float(coef[cur])
        alphas.append(alpha)
        w.addmv_(pair.T, coef, alpha=-1)
        if partial:
            beta = _norm(w, reduce_sum)
            anorm = max(anorm, abs(alpha) + (betas[-1] if betas else 0.0) + beta)
            if step > 0:
                # the operator's asymmetry plus rounding: the error each step feeds into all the
                # estimates (for an exactly symmetric product it is the inner products' rounding)
                delta = max(delta, abs(float(coef[1 - cur]) - betas[-1]) / max(anorm, 1e-300))
            new = _next_omega(omega, omega_prev, alphas, betas, beta, delta * anorm)
            # what the float rounding of that step left along q_j and q_{j-1} is measured (one
            # more pass over w): the local loss of orthogonality the estimates start from
            local = _reduced(pair @ w, reduce_sum).abs() / max(beta, 1e-300)
            new[step] = max(eps, float(local[cur]))
            if step > 0:
                new[step - 1] = max(float(new[step - 1].abs()), float(local[1 - cur]))
            # semi-orthogonality at sqrt of the working precision: float32 inner products over
            # 22.7M entries are good to ~3e-4, so orthogonality below ~sqrt(3e-4) buys nothing
            omega_tol = max(math.sqrt(eps), math.sqrt(delta)) / 4
            if again or bool(new[:-1].abs().max() > omega_tol):
                w, beta, read = _orthogonalise(w, basis[: step + 1], device, reduce_sum, beta)
                new[:-1] = eps  # orthogonal to working precision again
                passes += 1
                rows_read += read
                again = not again  # the vector after a triggered one is reorthogonalised too
            omega_prev, omega = omega, new
        else:
            w, beta, read = _orthogonalise(w, basis[: step + 1], device, reduce_sum, _norm(w, reduce_sum))
            passes += 1
            rows_read += read
        m = step + 1
        scale = max(abs(a) for a in alphas) if alphas else 1.0
        exhausted = beta < breakdown_tol * max(scale, 1e-300) or m == full
        if m >= k and (m % check_every == 0 or exhausted or m == max_iter):
            ritz_vals, ritz_vecs_t = _tridiag_eigh(alphas, betas, dtype)
            residuals = (beta * ritz_vecs_t[-1, :k]).abs()
            if on_step is not None:
                on_step(matvecs, residuals)
            ref = max(float(ritz_vals[0].abs()), 1e-300)
            if exhausted or bool((residuals <= tol * ref).all()):
                converged = True
                break
        if exhausted:
            converged = True
            break
        betas.append(beta)
        if m == max_iter:
            break
        if on_basis:
            v = torch.div(w, beta, out=basis[step + 1])
        else:
            v = torch.div(w, beta, out=ring[(step + 1) % 2])
            basis[step + 1].copy_(v)
    if ritz_vals.numel() == 0 or ritz_vecs_t.shape[0] != len(alphas):
        ritz_vals, ritz_vecs_t = _tridiag_eigh(alphas, betas[: len(alphas) - 1], dtype)
        residuals = (beta * ritz_vecs_t[-1, :k]).abs()
    kk = min(k, ritz_vals.numel())
    vectors = None
    if return_vectors:
        q = basis[: ritz_vecs_t.shape[0]].T
        vectors = (q @ ritz_vecs_t[:, :kk].to(basis_device)).to(device)
    return LanczosResult(
        eigenvalues=ritz_vals[:kk].clone(),
        eigenvectors=vectors,
        matvecs=matvecs,
        converged=converged,
        residuals=residuals[:kk].clone(),
        reorthogonalised=passes,
        basis_rows_read=rows_read,
    )


def _next_omega(
    omega: torch.Tensor,
    omega_prev: torch.Tensor,
    alphas: list[float],
    betas: list[float],
    beta: float,
    noise: float,
) -> torch.Tensor:
    """Estimates of q_{j+1}^T q_k for k = 0..j+1 (float64 ``[j + 2]``), by Simon's recurrence.

    With A q_j = beta_{j-1} q_{j-1} + alpha_j q_j + beta_j q_{j+1} (``betas[i]`` couples q_i
    and q_{i+1}, ``beta`` = beta_j the new one), for k < j:
    beta_j w_{j+1,k} = beta_k w_{j,k+1} + (alpha_k - alpha_j) w_{j,k} + beta_{k-1} w_{j,k-1}
    - beta_{j-1} w_{j-1,k} + theta, theta = ``noise`` with the sum's sign: the error each
    product and step adds (the caller measures it, so an operator that is symmetric only to
    a few digits, like a float32 Hessian-vector product, is tracked too); w_{j+1,j+1} = 1.
    The caller overwrites w_{j+1,j} and w_{j+1,j-1} with measured values.
    """
    j = len(alphas) - 1
    new = torch.zeros(j + 2, dtype=torch.float64)
    new[j + 1] = 1.0
    if j == 0:
        return new
    b_new = max(beta, 1e-300)
    a = torch.tensor(alphas, dtype=torch.float64)
    b = torch.tensor(betas[:j], dtype=torch.float64)
    val = b * omega[1 : j + 1] + (a[:j] - a[j]) * omega[:j] - b[j - 1] * omega_prev[:j]
    val[1:] += b[: j - 1] * omega[: j - 1]
    val += torch.sign(val) * noise
    new[:j] = val / b_new
    return new


#: a second Gram-Schmidt pass runs when the first keeps less than this fraction of ||w||
#: (Daniel, Gragg, Kaufman & Stewart 1976, "twice is enough" with eta = 1/sqrt(2))
TWICE_IS_ENOUGH = 0.7071


def _norm(w: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> float:
    """||w|| (sharded: the square root of the squared pieces' norms summed by ``reduce_sum``)."""
    if reduce_sum is None:
        return float(w.norm())
    return math.sqrt(max(float(_reduced(torch.dot(w, w).reshape(1), reduce_sum)[0]), 0.0))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether the basis lives where the products are taken.

    Its rows then serve as the vectors passed to ``matvec``.
    """
    return a == b


def _reduced(local: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Local partial inner products completed over processes (as they are on one)."""
    return local if reduce_sum is None else reduce_sum(local)


def _is_private(product: torch.Tensor, dim: int, dtype: torch.dtype, *kept: torch.Tensor | None) -> bool:
    """Whether a product the caller gave as scratch can be written over.

    It can when it is a contiguous ``[dim]`` vector of the basis dtype that shares no memory
    with what Lanczos keeps (``kept``).
    """
    if product.shape != (dim,) or product.dtype != dtype or not product.is_contiguous() or product.requires_grad:
        return False
    start = product.data_ptr()
    stop = start + product.numel() * product.element_size()
    for t in kept:
        if t is None or t.device != product.device:
            continue
        lo = t.untyped_storage().data_ptr()
        if start < lo + t.untyped_storage().nbytes() and lo < stop:
            return False
    return True


def _orthogonalise(
    w: torch.Tensor,
    basis: torch.Tensor,
    device: torch.device | str,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None,
    before: float,
) -> tuple[torch.Tensor, float, int]:
    """The vector w minus its projection on the rows of ``basis [m, P]``.

    By block classical Gram-Schmidt: c = Q w, then w -= Q^T c, two matrix-vector products
    per pass instead of 2m vector ops, in place when w lives with the basis (the caller's
    work vector; no P-sized temporaries), with a second pass only when the first cancelled
    most of w (||w|| fell
    below :data:`TWICE_IS_ENOUGH` of ``before``, its norm on entry): then rounding in the
    first left w measurably out of the span's complement. The caller applies the
    three-term recurrence first, so the pass removes only the lost orthogonality and a
    second pass is rare. Each pass reads the whole basis twice, the cost that dominates
    once the basis is large.

    The projection runs where the basis lives (a CPU basis is never copied to the
    accelerator: w travels instead, [P] each way).

    Sharded (``reduce_sum`` given): the coefficients ``basis @ w`` and both norms are the
    global ones (local partial sums added over processes), so every process takes the same
    decision about the second pass.

    Returns:
        (w, ||w||, basis rows read).
    """
    w = w.to(basis.device)
    w = w if w.is_contiguous() else w.contiguous()
    read, after = 0, before
    for _ in range(2):
        w.addmv_(basis.T, _reduced(basis @ w, reduce_sum), alpha=-1)  # in place
        read += 2 * basis.shape[0]
        after = _norm(w, reduce_sum)
        if after >= TWICE_IS_ENOUGH * before:
            break
        before = after
    return w.to(device), after, read


def _tridiag_eigh(alphas: list[float], betas: list[float], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the tridiagonal T, eigenvalues descending, vectors as columns."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(t)
    order = torch.argsort(vals, descending=True)
    return vals[order].to(dtype), vecs[:, order].to(dtype)


def block_lanczos_top_k(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    *,
    block_size: int | None = None,
    max_matvecs: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    basis_device: torch.device | str | None = None,
    return_vectors: bool = False,
    reorth_ratio: float = 0.7,
    rows: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    start: torch.Tensor | None = None,
    progress: LanczosProgress | None = None,
) -> LanczosResult:
    r"""The ``k`` largest eigenvalues of a symmetric operator by block Lanczos.

    With a block of b orthonormal vectors Q_1 [P, b], each step multiplies the whole block
    at once (``matmat``: b products in one call, e.g. one batched double backward):

        W = A Q_j - Q_j A_j - Q_{j-1} B_{j-1}^T,   A_j = Q_j^T A Q_j,   Q_{j+1} B_j = W,

    building the block-tridiagonal T = Q^T A Q [mb, mb] (Golub & Underwood 1977). W is
    reorthogonalised against the whole basis by one block Gram-Schmidt pass (a [mb, P] x
    [P, b] product, BLAS-3), and a second pass only when the pass removed most of W
    (a column's norm fell below ``reorth_ratio`` of what it was: the DGKS criterion,
    Daniel et al. 1976; "twice is enough"); the norms after the pass come from
    ||w||^2 - ||Q^T w||^2, without another sweep over W. Q_{j+1} and B_j come from the
    thin SVD of W. The residual of Ritz pair (theta_i, y_i) is ||B_m y_i[last block]||;
    it stops when every top-k residual is below ``tol * max(|theta_1|, tiny)``, when
    ``max_matvecs`` products are spent, or when the Krylov space is exhausted.

    The basis is stored as rows ``[mb, P]`` (one contiguous row per vector): each block
    handed to ``matmat`` is a slice of it, and each new block is written into it in place.

    Args:
        matmat: ``V [P, b] -> A V [P, b]``; with ``rows=True``, ``V^T [b, P] -> (A V)^T
            [b, P]`` (rows in, rows out: no transposes; the result may be a buffer the
            caller reuses, it is consumed before the next call).
        dim: P.
        k: eigenvalues wanted (capped at ``dim``).
        block_size: b (default ``min(k, 8)``, at least 2 when k > 1).
        max_matvecs: the most products (default ``max(4k, k + 40)``, at most P).
        tol: relative residual tolerance.
        seed: seeds the Gaussian start block (a local generator).
        dtype: dtype of the basis and of T.
        device: device of the blocks passed to ``matmat``.
        basis_device: where the basis lives (default ``device``).
        return_vectors: also return the Ritz vectors ``[P, k]``.
        reorth_ratio: the DGKS threshold for the second pass.
        rows: ``matmat`` takes and returns rows (see above).
        on_step: called after each block step with ``(matvecs, residuals [k'])``.
        start: ``[b, P]`` start block (rows; orthonormalised here, a dependent row
            replaced by a random direction); default Gaussian from ``seed``.
        progress: filled after each block step (:class:`LanczosProgress`): what a stopped
            run finished.

    Returns:
        :class:`LanczosResult` (``residuals`` are the absolute Ritz residual norms).

    Raises:
        ValueError: ``start`` is given but is not ``[b, P]``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 61.0, dtype=torch.float64))
        >>> r = block_lanczos_top_k(lambda V: A @ V, 60, 3, tol=1e-10, max_matvecs=60)
        >>> [round(x, 6) for x in r.eigenvalues.tolist()], r.converged
        ([60.0, 59.0, 58.0], True)
    """
    k = min(k, dim)
    b = block_size or (min(k, 8) if k > 1 else 1)
    b = max(1, min(b, dim))
    if max_matvecs is None:
        max_matvecs = max(4 * k, k + 40)
    max_matvecs = max(min(max_matvecs, dim), k, b)
    steps = max(1, -(-max_matvecs // b))
    size = min(dim, steps * b)
    basis_device = torch.device(basis_device or device)
    product = matmat if rows else (lambda v: matmat(v.T).T)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.empty(min(dim, size + b), dim, dtype=dtype, device=basis_device)
    if start is None:
        q, _ = torch.linalg.qr(torch.randn(dim, b, generator=gen, dtype=torch.float64))
        basis[:b] = q.T.to(dtype)
    else:
        if start.shape != (b, dim):
            raise ValueError(f"block_lanczos_top_k.start must be [{b}, {dim}]; got {tuple(start.shape)}")
        q, c = _svd_rows(start.to(dtype).to(basis_device))
        basis[:b] = q
        del q
        _replace_lost_rows(basis, 0, b, c, gen, 1e-6 * max(float(c.abs().max()), 1e-300))
    t = torch.zeros(size, size, dtype=torch.float64)
    matvecs, used, converged, nb = 0, 0, False, b
    vals = torch.zeros(0, dtype=torch.float64)
    vecs = torch.zeros(0, 0, dtype=torch.float64)
    residuals = torch.zeros(0, dtype=torch.float64)
    while True:
        lo, hi = used, used + nb
        w = product(basis[lo:hi].to(device)).to(dtype)
        matvecs += nb
        # projections on the whole basis: T's column block Q^T A Q_j exactly (no tridiagonal
        # assumption, so directions injected when the Krylov space runs out are handled too)
        coef, w = _block_reorthogonalise_rows(w, basis[:hi], reorth_ratio)
        coef = coef.double().cpu()
        coef[lo:hi] = (coef[lo:hi] + coef[lo:hi].T) / 2
        t[:hi, lo:hi] = coef
        t[lo:hi, :hi] = coef.T
        used = hi
        room = min(nb, basis.shape[0] - used)  # the next block's rows that fit (all but at the end)
        q, beta = _svd_rows(w)
        del w
        basis[used : used + room] = q[:room]
        del q
        scale = max(float(t[:used, :used].abs().max()), 1e-300)
        beta = _replace_lost_rows(basis, used, room, beta, gen, 1e-10 * scale)
        vals, vecs = torch.linalg.eigh(t[:used, :used])
        order = torch.argsort(vals, descending=True)
        vals, vecs = vals[order], vecs[:, order]
        kk = min(k, used)
        last = vecs[lo:hi, :kk]  # the last block's rows of the Ritz vectors
        residuals = (beta.double().cpu() @ last).norm(dim=0)
        if progress is not None:
            progress.k, progress.dtype, progress.ritz = k, dtype, (vals, residuals, matvecs)
        if on_step is not None:
            on_step(matvecs, residuals.clone())
        scale = max(float(vals[0].abs()), 1e-300)
        if kk == k and (used == dim or bool((residuals <= tol * scale).all())):
            converged = True
            break
        nxt = min(b, size - used, max_matvecs - matvecs, room)
        if nxt <= 0 or (nxt < b and used + nxt < dim):  # a smaller block only to fill the space
            break
        nb = nxt
    kk = min(k, vals.numel())
    vectors = None
    if return_vectors:
        vectors = (basis[:used].T @ vecs[:, :kk].to(dtype).to(basis_device)).to(device)
    return LanczosResult(
        eigenvalues=vals[:kk].to(dtype).clone(),
        eigenvectors=vectors,
        matvecs=matvecs,
        converged=converged,
        residuals=residuals[:kk].to(dtype).clone(),
    )


def _block_reorthogonalise_rows(w: torch.Tensor, basis: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(basis @ w^T [m, b], w minus its projection on the rows of basis [m, P])`` for ``w [b, P]``.

    In place where w allows: one block pass, a second only when some row lost more than
    ``1 - ratio`` of its norm (DGKS), judged from ||w||^2 - ||coef||^2 (exact for an
    orthonormal basis; cancellation only makes it smaller, i.e. errs towards the second
    pass). The coefficients of both passes are summed.
    """
    w = w.to(basis.device)
    before = (w.double() if w.numel() < 1 << 16 else w).norm(dim=1).double() ** 2
    coef = basis @ w.T
    w = w.addmm_(coef.T, basis, alpha=-1) if w.is_contiguous() else w - coef.T @ basis
    after = before - (coef.double() ** 2).sum(dim=0)
    if bool((after < ratio**2 * before).any()):
        again = basis @ w.T
        w.addmm_(again.T, basis, alpha=-1)
        coef = coef + again
    return coef, w


def _svd_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q [b, P], C [b, b])`` with W^T = Q^T C for ``w [b, P]``, Q's rows orthonormal.

    Well-conditioned W (singular values within ``sqrt(eps) * 30`` of each other's ratio):
    from the Gram matrix twice (W W^T = U S^2 U^T, Q_1 = S^-1 U^T W, then the same on Q_1:
    "CholeskyQR2" with eigh; two [b, P] passes each, BLAS-3), which on P = 22.7M costs
    0.1 s where LAPACK's SVD of the wide matrix costs 2.6 s. Otherwise the thin SVD in
    float64, W = U S V^T: Q = V^T, C = S U^T (a row of Q with a zero singular value is a
    free direction, and C's row there is zero).
    """
    eps = torch.finfo(w.dtype).eps
    gram = (w @ w.T).double()
    s2, u = torch.linalg.eigh((gram + gram.T) / 2)
    if float(s2.min()) > (30.0 * eps**0.5) ** 2 * float(s2.max()) > 0:
        c = torch.eye(w.shape[0], dtype=torch.float64)
        q = w
        for _ in range(2):
            sv = s2.clamp_min(0).sqrt()
            q = (u.T / sv[:, None]).to(q.dtype) @ q
            c = (sv[:, None] * u.T) @ c
            gram = (q @ q.T).double()
            s2, u = torch.linalg.eigh((gram + gram.T) / 2)
        return q, c.to(w.dtype)
    # LAPACK's float32 SVD of a wide ill-conditioned block loses orthogonality (1e-1 at
    # P = 22.7M, cond 1e2), so it runs in float64 (a temporary [b, P] float64 copy)
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return vh.to(w.dtype), (sv[:, None] * u.T).to(w.dtype)


def _replace_lost_rows(
    basis: torch.Tensor, start: int, nb: int, c: torch.Tensor, gen: torch.Generator, tiny: float
) -> torch.Tensor:
    """Replace the rows of Q that carry nothing of W by random directions; returns the new C.

    After W^T = Q^T C with Q's first ``nb`` rows in ``basis[start : start + nb]``: a row of
    Q whose row of C is ~0 carries nothing of W (the Krylov space ran out along it) and need
    not be orthogonal to the basis; replace it (when stored) by a random direction orthogonal
    to the basis and the other rows, with a zero row of C.
    """
    lost = (c.norm(dim=1) <= tiny).nonzero().reshape(-1).tolist()
    if not lost:
        return c
    c = c.clone()
    c[lost, :] = 0.0
    lost = [j for j in lost if j < nb]
    good = [start + i for i in range(nb) if i not in lost]
    for j in lost:  # against the basis, the kept rows and the rows already replaced
        v = torch.randn(basis.shape[1], generator=gen, dtype=torch.float64).to(basis.dtype).to(basis.device)
        others = torch.cat([basis[:start], basis[good]], dim=0)
        for _ in range(2):
            v = v - others.T @ (others @ v)
        basis[start + j] = v / v.norm()
        good.append(start + j)
    return c
