"""Fill a session's checkpoint history with earlier checkpoints, without measuring them.

A process that measures only part of a run (a ``--shard K/N`` backfill, a Ray task, a
``uma watch`` restarted mid-run) still owes its checkpoint-pair metrics (``interpolation``,
``trajectory``, ...) the earlier checkpoints a one-process backfill would have handed them:
the ``depth`` checkpoints just before its first one, and the run's first checkpoint when a
metric :attr:`~uma_callbacks.metrics.base.Metric.needs_first`. :func:`seed_history` loads
exactly those and pushes them into ``session.history`` as the session itself would after
measuring them (same fingerprint, so the same cache keys), but computes and journals nothing.

A checkpoint that cannot be loaded is passed over, as the one-process backfill passes over
it (it never reaches the history there either): the next earlier usable one takes its place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from uma_callbacks.checkpoints import Checkpoint
from uma_callbacks.engine.budget import as_budget
from uma_callbacks.engine.snapshot import weights_fingerprint
from uma_callbacks.session import Session, all_rngs_preserved
from uma_callbacks.triggers.prefetch import ModelLoader, read_checkpoint

logger = logging.getLogger(__name__)

#: What :func:`seed_history` loads checkpoints with: a :class:`ModelLoader`, or any
#: ``load(checkpoint) -> model`` callable (the model may be reused between calls: the
#: history keeps CPU copies).
Loader = ModelLoader | Callable[[Checkpoint], torch.nn.Module]


def seed_history(session: Session, loader: Loader, checkpoints: Sequence[Checkpoint], upto: int) -> list[int]:
    """Push into ``session.history`` the checkpoints before ``checkpoints[upto]`` that its metrics need.

    Call it once, on a session whose history is still empty, before measuring
    ``checkpoints[upto]`` (and then the ones after it, in order). Nothing is measured,
    journalled or delivered; the weights are read, fingerprinted as
    :meth:`Session.measure` does and copied to the CPU.

    Args:
        session: the session (opened or not) about to measure ``checkpoints[upto:]``.
        loader: a :class:`~uma_callbacks.triggers.prefetch.ModelLoader`, or a callable
            ``load(checkpoint) -> nn.Module`` (an exception means the checkpoint is unusable).
        checkpoints: the run's whole list of usable checkpoints, in step order.
        upto: the index of the first checkpoint this process measures (0: nothing to seed).

    Returns:
        The steps pushed, in the order pushed (the first checkpoint, then the ``depth``
        most recent ones before ``upto``).

    Raises:
        ValueError: ``upto`` outside ``0..len(checkpoints)``.
    """
    if not 0 <= upto <= len(checkpoints):
        raise ValueError(f"seed_history: upto must be in 0..{len(checkpoints)} (the checkpoints' indices); got {upto}")
    history = session.history
    if upto == 0 or not history.wanted:
        return []
    budget = as_budget(session.config.memory_budget)
    before = (list(history.previous), history.first)
    unusable: set[int] = set()
    while True:  # again from the start when a checkpoint fails: an earlier one takes its place
        usable = [i for i in range(upto) if i not in unusable]
        recent = usable[-history.depth :] if history.depth else []
        first = usable[:1] if history.keep_first and before[1] is None else []
        wanted = sorted(set(recent) | set(first))  # the first one is pushed first: history.push keeps it as such
        history.previous, history.first = list(before[0]), before[1]
        pushed: list[int] = []
        for i in wanted:
            model = _load(loader, checkpoints[i], budget)
            if model is None:
                unusable.add(i)
                break
            with all_rngs_preserved():
                fingerprint = weights_fingerprint(model) if session.config.use_cache else ""
                history.push(model, checkpoints[i].step, fingerprint)
            pushed.append(checkpoints[i].step)
        else:
            break
    if pushed:
        logger.info("uma: history seeded with step(s) %s (not measured)", pushed)
    return pushed


def _load(loader: Loader, ckpt: Checkpoint, budget: Any) -> torch.nn.Module | None:
    """The model holding ``ckpt``'s weights, or ``None`` (warned) when it cannot be loaded."""
    try:
        if isinstance(loader, ModelLoader):
            return loader.load(read_checkpoint(ckpt, budget))
        return loader(ckpt)
    except Exception as err:  # unusable here as in a one-process backfill: passed over
        logger.warning("uma: checkpoint %s (step %d) not in the history: %s: %s", ckpt.path, ckpt.step, type(err).__name__, err)
        return None


__all__ = ["Loader", "seed_history"]
