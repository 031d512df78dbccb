"""The weight history a session keeps for metrics that compare checkpoints.

A metric declares how many earlier checkpoints it needs (:attr:`Metric.history_needed`)
and whether it needs the first one (:attr:`Metric.needs_first`); the session keeps the
most any enabled metric asks for, as CPU copies, when host memory allows. Every trigger
(Trainer callback, Accelerate hook, backfill) feeds the same object, so checkpoint-pair
metrics (``interpolation``, ``trajectory``, CKA drift, mask distance, task vectors) give the
same values whichever way the checkpoints came in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from uma_callbacks.core.sharding import local
from uma_callbacks.engine.budget import as_budget
from uma_callbacks.metrics.base import CheckpointState, History, Metric

logger = logging.getLogger(__name__)


class CheckpointHistory:
    """The first checkpoint and the last ``depth`` ones, as CPU copies of their parameters.

    Args:
        metrics: the enabled metrics (their needs size the history).
        host_limit_bytes: the most host memory the copies may take; ``None``: what the
            host has free, minus the memory budget's margin.

    Attributes:
        depth: earlier checkpoints kept (the largest ``history_needed``).
        keep_first: whether the first checkpoint is kept.
        dropped: why the history is incomplete (not enough host memory), or ``""``.
    """

    def __init__(self, metrics: Sequence[Metric], host_limit_bytes: int | None = None) -> None:
        self.depth = max((m.history_needed for m in metrics), default=0)
        self.keep_first = any(m.needs_first for m in metrics)
        self.host_limit_bytes = host_limit_bytes
        self.previous: list[CheckpointState] = []
        self.first: CheckpointState | None = None
        self.dropped = ""

    @property
    def wanted(self) -> bool:
        """Whether any enabled metric compares checkpoints."""
        return self.depth > 0 or self.keep_first

    def view(self, metric: Metric) -> History:
        """What ``metric`` asked for: its ``history_needed`` most recent checkpoints, and the first one.

        The recent ones come most recent first; the first checkpoint only if the metric needs it.
        """
        previous = tuple(reversed(self.previous[-metric.history_needed :])) if metric.history_needed else ()
        first = self.first if metric.needs_first else None
        return History(previous=previous, first=first)

    def push(self, model: torch.nn.Module, step: int, fingerprint: str) -> None:
        """Keep ``model``'s parameters as the latest checkpoint (and as the first, if it is).

        When the copies would not fit in host memory, the history is cleared and
        :attr:`dropped` says why (the metrics that need it are then skipped with that reason).
        """
        if not self.wanted:
            return
        # one new CPU copy (the oldest one is released after); the copies already kept are
        # not free memory any more, so the new one is compared with what is free now
        # a sharded model's copy holds this rank's shards (DTensor.numel() is the full size)
        needed = sum(local(p).numel() * p.element_size() for p in model.parameters())
        limit = self.host_limit_bytes if self.host_limit_bytes is not None else as_budget(None).limit_bytes("cpu")
        if needed > limit:
            self.previous, self.dropped = [], (
                f"earlier checkpoints not kept: a CPU copy of the weights needs "
                f"{needed / 2**20:.0f} MiB, {limit / 2**20:.0f} MiB of host memory is free"
            )
            logger.warning("uma: %s", self.dropped)
            return
        self.dropped = ""
        state = CheckpointState(
            step=int(step),
            weights={n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()},
            fingerprint=fingerprint,
        )
        if self.keep_first and self.first is None:
            self.first = state
        if self.depth:
            self.previous = (self.previous + [state])[-self.depth :]
