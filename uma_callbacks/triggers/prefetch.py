"""Checkpoints read ahead on a thread, and one model refilled with each one's weights."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.checkpoints import (
    Checkpoint,
    architecture_of,
    build_model,
    load_into,
    read_config,
    read_weights,
)


@dataclass
class Loaded:
    """One checkpoint as read from disk (or the error that reading it raised)."""

    checkpoint: Checkpoint
    config: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(checkpoint: Checkpoint, budget: Any = None) -> Loaded:
    """Read a checkpoint's config and weights; an error is kept, not raised.

    ``budget`` (a ``MemoryBudget``) bounds what a sharded checkpoint may take once gathered
    (its host-memory limit now); ``meta`` says how the weights were read (shards gathered).
    """
    started = time.perf_counter()
    try:
        max_bytes = budget.limit_bytes(torch.device("cpu")) if budget is not None else None
        config = read_config(checkpoint.path)
        weights, meta = read_weights(checkpoint.path, max_bytes)
        return Loaded(checkpoint, config, weights, seconds=time.perf_counter() - started, meta=meta)
    except Exception as err:  # reported as the checkpoint's error record
        return Loaded(checkpoint, error=err, seconds=time.perf_counter() - started)


def prefetched(checkpoints: Sequence[Checkpoint], enabled: bool = True, budget: Any = None) -> Iterator[tuple[Loaded, float]]:
    """``(loaded checkpoint, seconds waited for it)`` in order.

    The next one is read on a background thread while the caller works on the current one
    (``budget``: see :func:`read_checkpoint`).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="uma-prefetch") as pool:
        pending: Future[Loaded] | None = pool.submit(read_checkpoint, checkpoints[0], budget) if enabled and checkpoints else None
        for i, ckpt in enumerate(checkpoints):
            waited = time.perf_counter()
            loaded = pending.result() if pending is not None else read_checkpoint(ckpt, budget)
            waited = time.perf_counter() - waited
            pending = pool.submit(read_checkpoint, checkpoints[i + 1], budget) if enabled and i + 1 < len(checkpoints) else None
            yield loaded, waited
            loaded.weights = None


class ModelLoader:
    """One model, built from the first usable checkpoint's config, refilled with each one's weights."""

    def __init__(self, factory: Callable[[Path, dict[str, Any]], torch.nn.Module] | None, device: torch.device) -> None:
        self.factory, self.device = factory, device
        self.model: torch.nn.Module | None = None
        self.config: dict[str, Any] | None = None
        self.arch: str | None = None

    def load(self, loaded: Loaded) -> torch.nn.Module:
        """The model holding ``loaded``'s weights.

        Raises:
            ValueError: the checkpoint is of another architecture than the run's.
            Exception: the checkpoint could not be read (the error its reading raised).
        """  # noqa: DOC502 (Exception: read_checkpoint's, re-raised)
        if loaded.error is not None:
            raise loaded.error
        assert loaded.config is not None and loaded.weights is not None
        arch = architecture_of(loaded.config)
        if self.arch is not None and arch != self.arch:
            raise ValueError(f"architecture {arch} differs from the run's {self.arch}; checkpoint skipped")
        if self.model is None or loaded.config != self.config:
            path = loaded.checkpoint.path
            model = self.factory(path, loaded.config) if self.factory else build_model(path, loaded.config)
            dtype = _weights_dtype(loaded.weights)
            self.model = (model.to(dtype) if dtype is not None else model).to(self.device).eval()
            self.config = loaded.config
        load_into(self.model, loaded.weights)
        self.arch = arch
        return self.model


def _weights_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None
