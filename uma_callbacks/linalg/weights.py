r"""Move weights in place and put them back bit for bit (landscape, interpolation).

A :class:`WeightMover` saves ONE copy theta of the given parameters and sets each
evaluation point from it, never from the previous point (no accumulated drift):

- :meth:`WeightMover.set_combination`: p <- theta + sum_k c_k d_k (``torch._foreach_*``;
  terms with c_k == 0 are skipped, so the centre is theta exactly);
- :meth:`WeightMover.set_lerp`: p <- lerp(start, theta, t) = start + t (theta - start),
  exactly ``start`` at t = 0 and exactly theta at t = 1 (``torch.lerp`` switches formula
  at t = 0.5 to keep both endpoints exact);
- :meth:`WeightMover.set_per_tensor`: p_i <- theta_i, then a callback adds to p_i
  (directions regenerated on the fly, one tensor at a time);
- :meth:`WeightMover.restore`: p <- theta.

:func:`moved_weights` is the context manager: it restores in a ``finally``, also when a
forward pass raises midway, and frees the saved copy. All writes run under
``torch.no_grad()``; no deep copy of the model is ever made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch


class WeightMover:
    """One saved copy of ``params`` and in-place setters (see the module docstring).

    Args:
        params: the parameter tensors to move (the model's own, not copies).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> with moved_weights([w]) as mover:
        ...     mover.set_combination([0.5], [[torch.tensor([2.0, 0.0])]])
        ...     w.tolist()
        [2.0, 2.0]
        >>> w.tolist()
        [1.0, 2.0]
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.params]

    @property
    def theta(self) -> list[torch.Tensor]:
        """The saved copy (read only by convention)."""
        return self.saved

    def set_combination(self, coeffs: Sequence[float], directions: Sequence[Sequence[torch.Tensor]]) -> None:
        """Set ``p <- theta + sum_k coeffs[k] * directions[k]`` (one list of tensors per k).

        Args:
            coeffs: c_k, one per direction.
            directions: d_k, each a list of tensors shaped like ``params``.
        """
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved)
            for c, d in zip(coeffs, directions):
                if c != 0.0:
                    torch._foreach_add_(self.params, list(d), alpha=float(c))

    def set_lerp(self, start: Sequence[torch.Tensor], weight: float) -> None:
        """Set ``p <- start + weight * (theta - start)``, by ``torch.lerp`` (exact at 0 and 1).

        Args:
            start: tensors shaped like ``params`` (same dtype and device).
            weight: t; any real (t < 0 or t > 1 extrapolates).
        """
        with torch.no_grad():
            torch._foreach_copy_(self.params, list(start))
            if weight != 0.0:
                torch._foreach_lerp_(self.params, self.saved, float(weight))

    def set_per_tensor(self, add: Callable[[int, torch.Tensor], None]) -> None:
        """For each i: p_i <- theta_i, then ``add(i, p_i)`` adds its perturbation in place."""
        with torch.no_grad():
            for i, (p, theta) in enumerate(zip(self.params, self.saved)):
                p.copy_(theta)
                add(i, p)

    def restore(self) -> None:
        """Set ``p <- theta``, bit for bit."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved)


@contextlib.contextmanager
def moved_weights(params: Sequence[torch.Tensor]) -> Iterator[WeightMover]:
    """A :class:`WeightMover` for the block; the weights are restored on exit, also on error.

    Args:
        params: the parameter tensors to move.

    Yields:
        The mover.
    """
    mover = WeightMover(params)
    try:
        yield mover
    finally:
        mover.restore()
        mover.saved = []


def flat_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """sum_i <a_i, b_i> over paired tensors, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        total += torch.dot(x.reshape(-1).to(torch.float64), y.reshape(-1).to(torch.float64)).cpu()
    return float(total)


def flat_norm(a: Sequence[torch.Tensor]) -> float:
    """||a|| over all tensors, in float64."""
    return flat_dot(a, a) ** 0.5
