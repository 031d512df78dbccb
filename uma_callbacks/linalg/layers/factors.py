r"""Per-sample gradient *factors*: one parameter's g_i for a chunk of B samples.

A factor holds them in the form a layer rule gives them, and reduces them at once into
what is asked.

Every factor has ``n`` (B) and the same methods (:class:`Factor`): ``stats`` gives
sum_i g_i^2 (diagonal), ||g_i||^2 (norms), sum_i g_i and the Gram G G^T [B, B];
``cross_gram``, ``dot`` (g_i^T v) and ``weighted_sum`` (sum_i u_i g_i) serve the products;
``dense`` is ``[B, *shape]``; ``add`` sums two factors of the same kind (a parameter reached
by several calls sums its per-sample gradients BEFORE squaring).

- :class:`Dense`: ``G [B, *shape]`` whole (biases, norm weights, ``vmap`` output);
- :class:`Outer`: g_i = sum_t L_it R_it^T (Linear, Conv1D weights):

  - T = 1: closed forms, no [B, p0, p1] tensor ((L^2)^T (R^2), ||L_i||^2 ||R_i||^2);
  - ghost norms (Goodfellow 2015; Li et al. 2022 "ghost clipping"): ||g_i||^2 =
    sum_{t,s} (L_it . L_is)(R_it . R_is), a [T, T] kernel per sample instead of [p0, p1],
    used for the norms alone when T (p0 + p1) < p0 p1 (fewer flops, and then T^2 < p0 p1);
  - otherwise one ``bmm`` per layer forms [B, p0, p1] (the largest single layer's
    per-sample gradients is the peak, never [B, P]); it is squared in place;
- :class:`Rows`: an embedding's distinct rows per sample; tied to a linear head it becomes
  an :class:`Outer` with one-hot rows (:func:`merge_factors`);
- :class:`Zero`: a parameter no call reached (nothing stored).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

#: ``"auto"`` picks ghost kernels or per-sample gradients by flops; ``"always"``/``"never"``
#: force one (tests: the results are the same either way).
GHOST = "auto"

#: ``(diag sum_i g_i^2 or None, norms [B] float64, sum_i g_i or None, gram [B, B] float64 or None)``
Stats = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class Factor(Protocol):
    """One parameter's per-sample gradients for a chunk of ``n`` samples, in some held form."""

    n: int

    def nbytes(self) -> int:
        """Bytes held."""
        ...

    def dense(self) -> torch.Tensor:
        """``[B, *shape]``: the per-sample gradients whole."""
        ...

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool) -> Stats:
        """sum_i g_i^2, ||g_i||^2 (always), sum_i g_i and G G^T, each formed only when asked."""
        ...

    def cross_gram(self, other: Any) -> torch.Tensor:
        """``G_self G_other^T [B, B']`` float64."""
        ...

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        """``[B]``: g_i^T v."""
        ...

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        """sum_i u_i g_i, shaped like the parameter."""
        ...


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


class Dense:
    """Per-sample gradients held whole: ``G [B, *shape]`` (small tensors, vmap output).

    A :class:`Factor`, as are the classes below (their methods are documented there).
    """

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g
        self.n = g.shape[0]

    def add(self, other: Dense) -> Dense:
        """The factor of this one's per-sample gradients plus ``other``'s (same kind)."""
        return Dense(self.g + other.g)

    def flat(self) -> torch.Tensor:
        """``[B, numel]``: the per-sample gradients, one row each."""
        return self.g.reshape(self.n, -1)

    def nbytes(self) -> int:
        """Bytes held."""
        return self.g.numel() * self.g.element_size()

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool) -> Stats:
        """See :meth:`Factor.stats`."""
        f = self.flat()
        gsum = self.g.sum(0) if want_sum else None
        gram = _f64(f @ f.T) if want_gram else None
        sq = f.square()
        diag = sq.sum(0).reshape(self.g.shape[1:]) if want_diag else None
        return diag, sq.sum(1).double(), gsum, gram

    def cross_gram(self, other: Any) -> torch.Tensor:
        """See :meth:`Factor.cross_gram`."""
        return _f64(self.flat() @ other.dense().reshape(other.n, -1).T)

    def dense(self) -> torch.Tensor:
        """See :meth:`Factor.dense`."""
        return self.g

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.dot`."""
        return self.flat() @ v.reshape(-1).to(self.g.dtype)

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.weighted_sum`."""
        return torch.tensordot(u.to(self.g.dtype), self.g, dims=1)


class Outer:
    """g_i = sum_t L[i, t] R[i, t]^T of shape ``[p0, p1]``; L ``[B, T, p0]``, R ``[B, T, p1]``."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.left, self.right = left, right
        self.n, self.t = left.shape[0], left.shape[1]
        self.p0, self.p1 = left.shape[2], right.shape[2]

    def add(self, other: Outer) -> Outer:
        """The factor of this one's per-sample gradients plus ``other``'s (same kind)."""
        return Outer(torch.cat([self.left, other.left], 1), torch.cat([self.right, other.right], 1))

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in (self.left, self.right))

    def dense(self) -> torch.Tensor:
        """``[B, p0, p1]`` (one bmm; the same flops as a weight gradient)."""
        if self.t == 1:
            return self.left[:, 0, :, None] * self.right[:, 0, None, :]
        return torch.bmm(self.left.transpose(1, 2), self.right)

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool) -> Stats:
        """See :meth:`Factor.stats`."""
        L, R = self.left, self.right
        if self.t == 1:
            l0, r0 = L[:, 0], R[:, 0]
            l2, r2 = l0.square(), r0.square()
            diag = l2.T @ r2 if want_diag else None
            norms = l2.sum(1).double() * r2.sum(1).double()
            gsum = l0.T @ r0 if want_sum else None
            gram = _f64((l0 @ l0.T) * (r0 @ r0.T)) if want_gram else None
            return diag, norms, gsum, gram
        if not want_diag and self._ghost_wins(want_sum, want_gram):
            lf, rf = L.flatten(0, 1), R.flatten(0, 1)
            gram = None
            if want_gram:  # [BT, BT] kernel, summed over each pair of samples' token blocks
                kernel = (lf @ lf.T).mul_(rf @ rf.T)
                gram = _f64(kernel.reshape(self.n, self.t, self.n, self.t).sum((1, 3)))
                norms = gram.diagonal().clone()
            else:
                kernel = torch.bmm(L, L.transpose(1, 2)).mul_(torch.bmm(R, R.transpose(1, 2)))
                norms = kernel.sum((1, 2)).double()
            gsum = lf.T @ rf if want_sum else None
            return None, norms, gsum, gram
        g = self.dense()
        gsum = g.sum(0) if want_sum else None
        gram = None
        if want_gram:
            f = g.reshape(self.n, -1)
            gram = _f64(f @ f.T)
        g.square_()
        diag = g.sum(0) if want_diag else None
        norms = g.sum((1, 2)).double()
        return diag, norms, gsum, gram

    def _ghost_wins(self, want_sum: bool, want_gram: bool) -> bool:
        """Whether ghost kernels take fewer flops (and no more memory) than the per-sample gradients.

        Per sample T^2 (p0 + p1) against T p0 p1 (the Gram: (BT)^2 (p0 + p1) against
        B T p0 p1 + B^2 p0 p1); the grad sum costs B T p0 p1 either way (:data:`GHOST`).
        """
        if GHOST != "auto":
            return GHOST == "always" and (not want_gram or (self.n * self.t) ** 2 <= self.n * self.p0 * self.p1)
        n, t, size, width = self.n, self.t, self.p0 * self.p1, self.p0 + self.p1
        if want_gram:
            if (n * t) ** 2 > n * size:
                return False
            ghost, mat = (n * t) ** 2 * width, n * t * size + n * n * size
        else:
            ghost, mat = n * t * t * width, n * t * size + n * size
        if want_sum:
            ghost += n * t * size
        return ghost < mat

    def cross_gram(self, other: Any) -> torch.Tensor:
        """See :meth:`Factor.cross_gram`."""
        if isinstance(other, Outer) and self.t == 1 and other.t == 1:
            return _f64((self.left[:, 0] @ other.left[:, 0].T) * (self.right[:, 0] @ other.right[:, 0].T))
        return _f64(self.dense().reshape(self.n, -1) @ other.dense().reshape(other.n, -1).T)

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.dot`."""
        v = v.reshape(self.p0, self.p1).to(self.left.dtype)
        return ((self.left @ v) * self.right).sum((1, 2))

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.weighted_sum`."""
        lu = self.left * u.to(self.left.dtype)[:, None, None]
        return lu.flatten(0, 1).T @ self.right.flatten(0, 1)


class Rows:
    """Embedding factor: g_i = sum_t e_{id_it} D_it^T ``[V, H]``, kept as each sample's distinct rows.

    ``rows [U, H]`` at (sample ``rb [U]``, vocabulary row ``rv [U]``).
    """

    def __init__(self, ids: torch.Tensor, d: torch.Tensor, vocab: int, n: int) -> None:
        # ids [B, T] (-1: padding, adds nothing), d [B, T, H]
        self.vocab, self.n, self.h = vocab, n, d.shape[-1]
        self.ids, self.d = ids, d  # kept to rebuild one-hot factors for tied weights
        valid = ids >= 0
        b = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
        key = (b * vocab + ids)[valid]
        uniq, inverse = torch.unique(key, return_inverse=True)
        self.rows = torch.zeros(uniq.numel(), self.h, dtype=d.dtype, device=d.device).index_add_(0, inverse, d[valid])
        self.rb, self.rv = uniq // vocab, uniq % vocab

    def add(self, other: Rows) -> Rows:
        """The factor of this one's per-sample gradients plus ``other``'s (same kind)."""
        return Rows(torch.cat([self.ids, other.ids], 1), torch.cat([self.d, other.d], 1), self.vocab, self.n)

    def to_outer(self) -> Outer:
        """The same gradients as an :class:`Outer` with one-hot rows ``[B, T, V]``."""
        onehot = torch.zeros(*self.ids.shape, self.vocab, dtype=self.d.dtype, device=self.d.device)
        valid = self.ids >= 0
        onehot[valid, self.ids[valid]] = 1.0
        return Outer(onehot, self.d)

    def nbytes(self) -> int:
        """Bytes held."""
        return self.rows.numel() * self.rows.element_size() + 2 * self.rb.numel() * 8

    def _compact(self, vocab_rows: torch.Tensor) -> torch.Tensor:
        """``[B, len(vocab_rows), H]``: the per-sample gradients on those vocabulary rows."""
        col = torch.searchsorted(vocab_rows, self.rv)
        out = torch.zeros(self.n, vocab_rows.numel(), self.h, dtype=self.rows.dtype, device=self.rows.device)
        out[self.rb, col] = self.rows
        return out

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool) -> Stats:
        """See :meth:`Factor.stats`."""
        sq = self.rows.square()
        norms = torch.zeros(self.n, dtype=torch.float64, device=sq.device).index_add_(0, self.rb, sq.sum(1).double())
        shape = (self.vocab, self.h)
        diag = torch.zeros(shape, dtype=sq.dtype, device=sq.device).index_add_(0, self.rv, sq) if want_diag else None
        gsum = torch.zeros(shape, dtype=sq.dtype, device=sq.device).index_add_(0, self.rv, self.rows) if want_sum else None
        gram = None
        if want_gram:
            m = self._compact(torch.unique(self.rv)).reshape(self.n, -1)
            gram = _f64(m @ m.T)
        return diag, norms, gsum, gram

    def cross_gram(self, other: Any) -> torch.Tensor:
        """See :meth:`Factor.cross_gram`."""
        if isinstance(other, Rows):
            vocab_rows = torch.unique(torch.cat([self.rv, other.rv]))
            a, b = self._compact(vocab_rows), other._compact(vocab_rows)
            return _f64(a.reshape(self.n, -1) @ b.reshape(other.n, -1).T)
        return _f64(self.dense().reshape(self.n, -1) @ other.dense().reshape(other.n, -1).T)

    def dense(self) -> torch.Tensor:
        """See :meth:`Factor.dense`."""
        out = torch.zeros(self.n, self.vocab, self.h, dtype=self.rows.dtype, device=self.rows.device)
        out[self.rb, self.rv] = self.rows
        return out

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.dot`."""
        v = v.reshape(self.vocab, self.h).to(self.rows.dtype)
        per_row = (self.rows * v[self.rv]).sum(1)
        return torch.zeros(self.n, dtype=per_row.dtype, device=per_row.device).index_add_(0, self.rb, per_row)

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.weighted_sum`."""
        scaled = self.rows * u.to(self.rows.dtype)[self.rb, None]
        return torch.zeros(self.vocab, self.h, dtype=scaled.dtype, device=scaled.device).index_add_(0, self.rv, scaled)


class Zero(Dense):
    """A parameter no call reached this chunk: zero per-sample gradients, nothing stored."""

    def __init__(self, n: int, like: torch.Tensor) -> None:
        self.n, self.like = n, like

    def nbytes(self) -> int:
        """Bytes held."""
        return 0

    def dense(self) -> torch.Tensor:
        """See :meth:`Factor.dense`."""
        return torch.zeros(self.n, *self.like.shape, dtype=self.like.dtype, device=self.like.device)

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool) -> Stats:
        """See :meth:`Factor.stats`."""
        zeros = torch.zeros_like(self.like)
        norms = torch.zeros(self.n, dtype=torch.float64, device=self.like.device)
        gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.like.device) if want_gram else None
        return (zeros if want_diag else None), norms, (zeros.clone() if want_sum else None), gram

    def cross_gram(self, other: Any) -> torch.Tensor:
        """See :meth:`Factor.cross_gram`."""
        return torch.zeros(self.n, other.n, dtype=torch.float64, device=self.like.device)

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.dot`."""
        return torch.zeros(self.n, dtype=self.like.dtype, device=self.like.device)

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        """See :meth:`Factor.weighted_sum`."""
        return torch.zeros_like(self.like)


def merge_factors(factors: list[Any]) -> Any:
    """One factor holding the sum of the per-sample gradients of several calls/modules."""
    if len(factors) == 1:
        return factors[0]
    kinds = {type(f) for f in factors}
    if kinds == {Outer} or kinds == {Rows}:
        out = factors[0]
        for f in factors[1:]:
            out = out.add(f)
        return out
    if kinds <= {Outer, Rows}:  # an embedding tied to a linear head: the head's bmm, the rows added in place
        outer = merge_factors([f for f in factors if isinstance(f, Outer)])
        total = outer.dense()
        for rows in (f for f in factors if isinstance(f, Rows)):
            total.index_put_((rows.rb, rows.rv), rows.rows.to(total.dtype), accumulate=True)
        return Dense(total)
    total = factors[0].dense()
    for f in factors[1:]:
        total = total + f.dense()
    return Dense(total)
