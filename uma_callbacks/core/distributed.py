"""Sums across ranks, probe sharding, and rank-0-only logging.

Every metric keeps sufficient statistics (sums and counts) and reduces them with
:meth:`Collective.sum_`, so that a probe split over R ranks gives the same numbers as one
process on all of it: sum_r sum_{i in shard r} x_i = sum_i x_i.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch


class Collective:
    """Cross-rank reductions used by metrics. The base class is one process (identity)."""

    rank: int = 0
    world_size: int = 1

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place sum of each tensor over ranks (identity here)."""

    def sum_scalar(self, value: float) -> float:
        """Sum of a Python float over ranks, as float64."""
        t = torch.tensor([value], dtype=torch.float64)
        self.sum_([t])
        return float(t.item())

    def agree(self) -> None:
        """Check that every rank is still healthy (no-op unless agreeing on failures)."""

    def any_(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (used to agree on failures)."""
        return self.sum_scalar(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        """Wait for every rank (no-op here)."""

    def sum_scatter_dim0(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's dim-0 chunk of the sum of ``full`` over ranks: a reduce-scatter.

        The chunks have ``torch.chunk`` sizes (FSDP2's ``Shard(0)``). One process: ``full`` itself.
        """
        return full

    def sum_scatter_dim0_many(self, fulls: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`sum_scatter_dim0` of each of ``fulls``, in one reduce-scatter where ranks communicate.

        The same pieces as one call per tensor. One process: ``fulls`` themselves.
        """
        return [self.sum_scatter_dim0(full) for full in fulls]


class LocalCollective(Collective):
    """One process: every reduction is the identity."""


class TorchDistributedCollective(Collective):
    """``torch.distributed`` all-reduce (SUM) on the default process group.

    Tensors are reduced on the device the group's backend needs (gloo: CPU) and copied back.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self._device = torch.device("cpu") if backend == "gloo" else None

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place all-reduce (SUM) of each tensor, through the backend's device."""
        for t in tensors:
            if self._device is not None and t.device != self._device:
                buf = t.to(self._device)
                self._dist.all_reduce(buf)
                t.copy_(buf)
            else:
                self._dist.all_reduce(t)

    def barrier(self) -> None:
        """Wait for every rank (``torch.distributed.barrier``)."""
        self._dist.barrier()

    def sum_scatter_dim0(self, full: torch.Tensor) -> torch.Tensor:
        """Reduce-scatter of ``full`` [d0, ...] (padded to R * ceil(d0 / R) rows)."""
        return scatter_dim0_many([full], self.rank, self.world_size, self._dist, self._device)[0]

    def sum_scatter_dim0_many(self, fulls: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One reduce-scatter per dtype and device for all of ``fulls`` (see :func:`scatter_dim0_many`)."""
        return scatter_dim0_many(fulls, self.rank, self.world_size, self._dist, self._device)


def current_collective() -> Collective:
    """A :class:`TorchDistributedCollective` when a process group with >1 rank is up, else local."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return TorchDistributedCollective()
    return LocalCollective()


def world_rank() -> int:
    """This process's world rank (0 without distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only world rank 0 logs and writes the journal."""
    return world_rank() == 0


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item from ``rank`` on."""
    return list(items[rank::world_size])


def scatter_dim0_many(
    fulls: Sequence[torch.Tensor], rank: int, world: int, dist: Any, device: torch.device | None
) -> list[torch.Tensor]:
    """Sum over ranks of each of ``fulls``, cut to rank ``rank``'s ``torch.chunk`` piece along dim 0.

    A tensor ``[d0, ...]`` is padded to ``world * ceil(d0 / world)`` rows so every rank
    sends equal pieces; its returned rows are the first ``len(chunk)`` of the rank's padded
    piece (empty past d0; a 0-d tensor counts as ``[1]``). The tensors of one dtype and
    device go in one reduce-scatter: row ``q`` of the send buffer ``[world, W]`` holds every
    tensor's rank-``q`` piece, flattened, one after the other (FSDP2's layout), so rank
    ``q`` receives the sums of its pieces. A collective costs about a millisecond on gloo
    whatever its size; the sums are those of one call per tensor, entry by entry.

    Args:
        fulls: full-size tensors, the same shapes in the same order on every rank.
        rank: this rank.
        world: the number of ranks.
        dist: ``torch.distributed``.
        device: where the backend needs the buffers (gloo: CPU; None: where they are).

    Returns:
        this rank's pieces, in ``fulls``' order, each on its tensor's device.
    """
    xs = [full.reshape(1) if full.dim() == 0 else full for full in fulls]
    out: list[torch.Tensor | None] = [None] * len(xs)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.dtype, x.device), []).append(i)
    for (dtype, home), members in groups.items():
        steps = [-(-xs[i].shape[0] // world) for i in members]
        inners = [math.prod(xs[i].shape[1:]) for i in members]
        width = sum(step * inner for step, inner in zip(steps, inners))
        send = torch.zeros(world, width, dtype=dtype, device=device if device is not None else home)
        col = 0
        for i, step, inner in zip(members, steps, inners):
            rows = xs[i].reshape(xs[i].shape[0], inner)
            block = send[:, col : col + step * inner].view(world, step, inner)
            for q in range(world):
                part = rows[q * step : (q + 1) * step]
                block[q, : part.shape[0]].copy_(part)
            col += step * inner
        received = send.new_empty(width)
        dist.reduce_scatter_tensor(received, send.view(-1))
        del send
        col = 0
        for i, step, inner in zip(members, steps, inners):
            d0 = xs[i].shape[0]
            kept = max(0, min(step, d0 - rank * step))
            piece = received[col : col + step * inner].view(step, inner)[:kept]
            out[i] = piece.reshape(kept, *xs[i].shape[1:]).to(home)
            col += step * inner
    return [piece for piece in out if piece is not None]


class PeerFailure(RuntimeError):
    """Raised inside a metric on a healthy rank when another rank's metric has failed."""


#: Header slots of :class:`AgreeingCollective` (one float64 each, summed over ranks).
_CONTINUE, _FAILED, _DONE, _NUMEL, _NUMEL_SQ = range(5)


class AgreeingCollective(Collective):
    """A collective that lets every rank agree on a metric's failure without hanging.

    The problem: a metric calls :meth:`sum_` a few times (once for gradient flow, once per
    Lanczos matvec for spectra). If rank 1 raises *before* a call that rank 0 makes, rank 0
    blocks in that all-reduce; a later "did anyone fail?" all-reduce from rank 1 would be
    matched against rank 0's pending data reduction (silently wrong sums, or a hang).

    The protocol: every data reduction is preceded by a header all-reduce of 5 float64
    ``[continue, failed, done, numel, numel^2]``, and every rank ends the metric with one
    *terminal* header: ``done`` after a normal return, ``failed`` after an exception.
    Each rank therefore issues the same kind of call (a 5-element header) at every position
    of its sequence, so headers always pair up, and every rank reads the *same* summed
    header:

    - all ``continue`` with equal ``numel`` (``R * sum n^2 == (sum n)^2``): reduce the data;
    - all ``done``: the metric succeeded everywhere;
    - anything else (a ``failed``, a mix of ``done`` and ``continue`` -- ranks disagree on
      the number of reductions -- or unequal sizes): the metric failed everywhere. Ranks
      still inside the metric get :class:`PeerFailure` from :meth:`sum_` (and from any later
      call, without communicating), and nobody sends another header.

    The first non-unanimous header ends the protocol on all ranks at once, so no rank waits
    for a reduction that will never come. On failure, :meth:`conclude` also shares the
    first failing rank's error (type and message, as UTF-8 bytes in an integer tensor; no
    pickle) so rank 0 can journal it. Cost: one 40-byte all-reduce per data reduction, plus
    one per metric.

    What it cannot cover: a rank that never returns (an infinite loop, a dead peer). Metrics
    check their ``timeout_seconds`` between chunks (a :class:`MetricTimeout` is a failure
    like any other); beyond that the process group's own timeout applies
    (``init_process_group(timeout=...)``; ``torchrun`` then tears the job down).

    Args:
        inner: the real collective (e.g. :class:`TorchDistributedCollective`).
    """

    def __init__(self, inner: Collective) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.concluded = False
        self.failed_anywhere = False
        self.reductions = 0

    def _header(self, slot: int, numel: int = 0) -> torch.Tensor:
        header = torch.zeros(5, dtype=torch.float64)
        header[slot] = 1.0
        header[_NUMEL] = float(numel)
        header[_NUMEL_SQ] = float(numel) ** 2
        self.inner.sum_([header])
        return header

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks, after agreeing that every rank is still healthy.

        Raises:
            PeerFailure: another rank failed, or the ranks disagree on what to reduce.
        """  # noqa: DOC502 (from _agree)
        self._agree(sum(int(t.numel()) for t in tensors))
        self.inner.sum_(tensors)

    def _agree(self, numel: int) -> None:
        """One ``continue`` header; returns when every rank continues with ``numel`` entries.

        Raises:
            PeerFailure: the metric already failed here or on another rank, or the ranks disagree
                on the size or the number of reductions.
        """
        if self.concluded:
            raise PeerFailure("the metric already failed on another rank")
        header = self._header(_CONTINUE, numel)
        world = float(self.world_size)
        same_size = abs(world * header[_NUMEL_SQ].item() - header[_NUMEL].item() ** 2) < 0.5
        if header[_CONTINUE].item() == world and same_size:
            self.reductions += 1
            return
        self.concluded, self.failed_anywhere = True, True
        if header[_CONTINUE].item() == world:
            raise PeerFailure(f"ranks reduce tensors of different sizes at reduction {self.reductions + 1}")
        if header[_FAILED].item() > 0:
            raise PeerFailure(f"the metric failed on {int(header[_FAILED].item())} other rank(s)")
        raise PeerFailure(f"ranks disagree on the number of reductions (this rank made {self.reductions + 1})")

    def barrier(self) -> None:
        """Wait for every rank."""
        self.inner.barrier()

    def sum_scatter_dim0(self, full: torch.Tensor) -> torch.Tensor:
        """:meth:`Collective.sum_scatter_dim0` after the same header as :meth:`sum_`.

        Raises:
            PeerFailure: another rank failed, or the ranks disagree on what to reduce.
        """  # noqa: DOC502 (from _agree)
        self._agree(int(full.numel()))
        return self.inner.sum_scatter_dim0(full)

    def sum_scatter_dim0_many(self, fulls: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`Collective.sum_scatter_dim0_many` after one header for all of ``fulls``.

        Raises:
            PeerFailure: another rank failed, or the ranks disagree on what to reduce.
        """  # noqa: DOC502 (from _agree)
        self._agree(sum(int(full.numel()) for full in fulls))
        return self.inner.sum_scatter_dim0_many(fulls)

    def agree(self) -> None:
        """A header alone: every rank is still healthy (before FSDP's own collectives).

        Raises:
            PeerFailure: another rank failed, or the ranks disagree on what to reduce.
        """  # noqa: DOC502 (from _agree)
        self._agree(0)

    def conclude(self, failed: bool) -> bool:
        """End the protocol for this metric; True when it failed on any rank."""
        if not self.concluded:
            header = self._header(_FAILED if failed else _DONE)
            self.concluded = True
            self.failed_anywhere = header[_DONE].item() != float(self.world_size)
        return self.failed_anywhere

    def share_failure(self, error: BaseException | None, limit: int = 2000) -> tuple[int, str]:
        """After :meth:`conclude` returned True: ``(rank, "Type: message")`` of the first rank's own failure.

        That is the lowest rank whose metric raised on its own (not :class:`PeerFailure`);
        ``(-1, "")`` if none. Every rank must call it (two all-reduces).
        """
        own = error is not None and not isinstance(error, PeerFailure)
        flags = torch.zeros(self.world_size, dtype=torch.float64)
        flags[self.rank] = 1.0 if own else 0.0
        self.inner.sum_([flags])
        culprits = [r for r in range(self.world_size) if flags[r].item() > 0]
        if not culprits:
            return -1, ""
        first = culprits[0]
        text = torch.zeros(limit, dtype=torch.int32)
        if self.rank == first and error is not None:
            raw = f"{type(error).__name__}: {error}".encode("utf-8", errors="replace")[:limit]
            text[: len(raw)] = torch.tensor(list(raw), dtype=torch.int32)
        self.inner.sum_([text])
        raw_bytes = bytes(int(v) for v in text.tolist() if v > 0)
        return first, raw_bytes.decode("utf-8", errors="replace")
