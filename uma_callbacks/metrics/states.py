"""Declared metric states and their reduction across ranks (torchmetrics' ``add_state``).

A metric that sums statistics over the probe samples declares each sum once, with how it
is reduced across ranks::

    self.add_state("loss_sums", dist_reduce_fx="sum")
    self.add_state("n_samples", dist_reduce_fx="sum")

and hands the local values to :func:`reduce_states` once, at the end of its computation:
every declared state in one collective call, in declaration order, so every rank reduces
the same tensors in the same order (the agreeing collective checks the sizes). A probe
sharded over ranks then gives the single-process numbers.

Only ``"sum"`` is offered: metrics keep sums and counts, never means, until the end
(a mean of per-rank means is wrong when the ranks hold different numbers of samples), and
the maxima and concatenations some metrics need are not uniform reductions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from uma_callbacks.core.distributed import Collective

#: The reductions a state may declare.
DIST_REDUCE_FXS = ("sum",)


def declare_state(states: dict[str, str], owner: str, name: str, dist_reduce_fx: str) -> None:
    """Add ``name`` to ``states`` (``{name: reduction}``), checked.

    Raises:
        ValueError: ``name`` is not an identifier or is declared already, or
            ``dist_reduce_fx`` is not one of :data:`DIST_REDUCE_FXS`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{owner}.add_state: name must be an identifier; got {name!r:.80}")
    if name in states:
        raise ValueError(f"{owner}.add_state: state {name!r} is declared already")
    if dist_reduce_fx not in DIST_REDUCE_FXS:
        raise ValueError(f"{owner}.add_state: dist_reduce_fx must be one of {list(DIST_REDUCE_FXS)}; got {dist_reduce_fx!r:.80}")
    states[name] = dist_reduce_fx


def reduce_states(
    states: Mapping[str, str], owner: str, collective: Collective, values: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Reduce every declared state over ranks, in place, with one collective call.

    Args:
        states: ``{name: reduction}`` as declared.
        owner: the metric's class name (for errors).
        collective: the ranks' reductions (one process: the identity).
        values: ``{name: local tensor}``, exactly the declared names.

    Returns:
        ``values`` reduced, as a dict in declaration order.

    Raises:
        ValueError: a value for an undeclared state, or a declared state without a value.
    """
    extra = sorted(set(values) - set(states))
    missing = [name for name in states if name not in values]
    if extra or missing:
        raise ValueError(
            f"{owner}.reduce_states: pass exactly the declared states {list(states)}; undeclared {extra}, missing {missing}"
        )
    ordered = {name: values[name] for name in states}
    sums = [t for name, t in ordered.items() if states[name] == "sum"]
    if sums:
        collective.sum_(sums)
    return ordered


__all__ = ["DIST_REDUCE_FXS", "declare_state", "reduce_states"]
