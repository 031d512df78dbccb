"""One chunk's per-sample gradient factors and their reductions, one parameter at a time.

:class:`LayerGradients` keeps every parameter's factor (:mod:`.factors`) for later products;
:class:`Reductions` fills what is asked (sum_i g_i^2, ||g_i||^2, sum_i g_i, G G^T) from
factors handed to it one parameter at a time, so a caller that reduces during the backward
never holds every layer's factor at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from uma_callbacks.linalg.layers.factors import Factor


class Reductions:
    """What is asked of per-parameter factors (see :meth:`LayerGradients.reduce`), one parameter at a time.

    Each parameter's sums are handed to ``consume`` or kept, the Gram summed, the norms kept.
    """

    def __init__(
        self,
        n: int,
        device: torch.device,
        want_diag: bool,
        want_sum: bool,
        want_gram: bool,
        consume: Callable[[str, torch.Tensor | None, torch.Tensor | None], None] | None,
    ) -> None:
        self.want = (want_diag, want_sum, want_gram)
        self.device, self.consume = device, consume
        self.diag: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device) if want_gram else None

    def add(self, name: str, factor: Factor) -> None:
        """Reduce ``name``'s factor into what is asked."""
        d, sq, s, g = factor.stats(*self.want)
        if self.consume is not None:
            self.consume(name, d, s)
        else:
            if self.want[0]:
                self.diag[name] = d
            if self.want[1]:
                self.sums[name] = s
        if self.gram is not None:
            self.gram.add_(g.to(self.device))
        self.norms[name] = sq.to(self.device)

    def sq_norms(self, names: Sequence[str]) -> torch.Tensor:
        """``[B, len(names)]`` float64, in the order of ``names``."""
        return torch.stack([self.norms[name] for name in names], dim=1)


class LayerGradients:
    """One chunk's per-sample gradients as per-parameter factors (:mod:`.factors`).

    Implements the ``ChunkGradients`` protocol of :mod:`~uma_callbacks.linalg.fisher_products`.

    Attributes:
        losses: ``[B]`` per-sample losses (detached).
        n: B.
        names: parameter names, model order.
        vmapped: names whose gradients came from ``vmap(grad)``.
    """

    def __init__(self, losses: torch.Tensor, factors: dict[str, Factor], names: list[str], vmapped: list[str]) -> None:
        self.losses = losses
        self.n = int(losses.shape[0])
        self.names = names
        self.factors = factors
        self.vmapped = vmapped

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return sum(f.nbytes() for f in self.factors.values())

    def reduce(
        self,
        want_diag: bool = True,
        want_sum: bool = False,
        want_gram: bool = False,
        consume: Callable[[str, torch.Tensor | None, torch.Tensor | None], None] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Everything asked, one parameter at a time.

        Args:
            want_diag: form sum_i g_i^2 per parameter.
            want_sum: form sum_i g_i per parameter.
            want_gram: form G G^T.
            consume: ``(name, diag or None, sum or None)`` for each parameter in turn, which
                then are not kept: the caller adds them into its accumulators, so a chunk
                holds one parameter's sums at a time instead of the whole model's (P entries).

        Returns:
            ``(diag {name: sum_i g_i^2} (empty unless want_diag and no ``consume``),
            sq_norms [B, n_params] float64, grad_sum {name: sum_i g_i} (empty unless
            want_sum and no ``consume``), gram [B, B] float64 or None)``.
        """
        out = Reductions(self.n, self.losses.device, want_diag, want_sum, want_gram, consume)
        for name in self.names:
            out.add(name, self.factors[name])
        return out.diag, out.sq_norms(self.names), out.sums, out.gram

    def square_stats(self, want_diag: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: sum_i g_{i,p}^2}, sq_norms [B, n_params] float64)``."""
        diag, norms, _, _ = self.reduce(want_diag=want_diag)
        return diag, norms

    def grad_sums(self) -> dict[str, torch.Tensor]:
        """``{name: sum_i g_{i,p}}``."""
        return self.reduce(want_diag=False, want_sum=True)[2]

    def gram(self) -> torch.Tensor:
        """``G G^T [B, B]`` (float64)."""
        return self.reduce(want_diag=False, want_gram=True)[3]

    def cross_gram(self, other: LayerGradients) -> torch.Tensor:
        """``G_self G_other^T [B, B']`` (float64)."""
        total = torch.zeros(self.n, other.n, dtype=torch.float64, device=self.losses.device)
        for name in self.names:
            total += self.factors[name].cross_gram(other.factors[name]).to(total.device)
        return total

    def dot(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u [B]``, u_i = g_i^T v."""
        return sum(self.factors[n].dot(v[n]).to(self.losses.dtype) for n in self.names)

    def weighted_sum(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: sum_i u_i g_{i,p}}``."""
        return {n: self.factors[n].weighted_sum(u) for n in self.names}
