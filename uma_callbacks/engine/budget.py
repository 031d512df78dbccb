"""Memory: measure the peak of a block, and the budget metrics plan their chunks against.

Peaks are measured, not guessed:

- a metric's peak, without resetting the process's own counters (``VmHWM``, CUDA peak
  stats): the new high-water mark when the block raised it, else the highest level a
  sampling thread saw (see :mod:`uma_callbacks.core.peak_memory`); the peak reported is
  that minus the level at the start;
- one sample's activations, which the plan is made from, by counting the tensors its
  forward and backward create (:class:`~uma_callbacks.core.peak_memory.TensorBytes`): the
  same bytes at every save, where a sampled peak of a forward lasting milliseconds was not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from uma_callbacks.core.devices import model_device
from uma_callbacks.core.model_state import eager_attention, preserved_model_state
from uma_callbacks.core.peak_memory import (  # noqa: F401 (re-exported)
    PeakMemory,
    TensorBytes,
    cpu_peak_rss_bytes,
    cpu_rss_bytes,
    release_memory,
)

logger = logging.getLogger(__name__)


def param_bytes(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Bytes of the (trainable) parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def largest_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the largest trainable parameter tensor (its full size on a sharded model); 0 without one.

    Example:
        >>> largest_param_bytes(torch.nn.Linear(3, 2))
        24
    """
    return max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), default=0)


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameter gradients one backward forms: each trainable parameter once per module holding it.

    A parameter tied across modules (GPT-2's word embedding and LM head) gets a gradient
    from each use, which autograd holds together before it sums them: on GPT-2 124M one
    more [V, d] (154 MB) than :func:`param_bytes`, none of it growing with the samples.

    Example:
        >>> emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> tied = torch.nn.ModuleDict({"emb": emb, "head": head})
        >>> param_bytes(tied), gradient_bytes(tied)
        (160, 320)
    """
    uses = model.named_parameters(remove_duplicate=False)
    return sum(p.numel() * p.element_size() for _, p in uses if p.requires_grad)


@dataclass(frozen=True)
class RankParamBytes:
    """What the planner counts for the trainable parameters on this rank.

    On a plain model every rank holds all of them. Under FSDP2 (``fully_shard``) a rank
    holds its shards, and FSDP all-gathers one unit's full parameters at a time for its
    forward/backward; the metrics keep their accumulators, copies and directions in the
    shard's layout. So a metric's parameter copies are copies of the *shard*, and the
    fixed bytes add the largest gathered block once, never the whole model. A per-sample
    gradient is formed full-size (one layer of the gathered block, from this rank's own
    samples), so the per-sample term keeps the full P (and the metric's declared share of
    it). See :func:`planned_bytes` for which terms are priced on the shard.

    Attributes:
        held: bytes of the trainable parameters this rank holds (its shards; all on a plain model).
        held_entries: their entries.
        full: bytes of the full trainable parameters (the per-sample gradient's P).
        full_entries: their entries.
        gathered: bytes FSDP gathers at once (the largest unit's full parameters); 0 on a
            plain model (the model itself is what training holds).
    """

    held: int
    held_entries: int
    full: int
    full_entries: int
    gathered: int = 0

    @property
    def sharded(self) -> bool:
        """Whether the parameters are sharded (held < full, or FSDP gathers blocks)."""
        return self.gathered > 0


def rank_param_bytes(model: torch.nn.Module) -> RankParamBytes:
    """:class:`RankParamBytes` of ``model`` on this rank (FSDP2 DTensor parameters or plain).

    Example:
        >>> rank_param_bytes(torch.nn.Linear(3, 2))
        RankParamBytes(held=32, held_entries=8, full=32, full_entries=8, gathered=0)
    """
    from uma_callbacks.core.sharding import is_sharded, local, shard_bytes

    trainable = [p for p in model.parameters() if p.requires_grad]
    full_entries = sum(p.numel() for p in trainable)  # a DTensor's numel() is the global count
    if not is_sharded(model):
        total = param_bytes(model)
        return RankParamBytes(held=total, held_entries=full_entries, full=total, full_entries=full_entries)
    sizes = shard_bytes(model)
    held_entries = sum(local(p).numel() for p in trainable)
    return RankParamBytes(
        held=sizes.shard,
        held_entries=held_entries,
        full=sizes.full,
        full_entries=full_entries,
        gathered=max(1, sizes.largest_block),
    )


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device``: CUDA ``mem_get_info``; CPU ``MemAvailable``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class BudgetExceeded(RuntimeError):
    """The metric cannot fit the budget even at ``min_batch_size``: recorded as skipped.

    Attributes:
        budget_meta: the plan's fields (``budget_bytes``, planned bytes, ...) for the
            skipped record's ``meta``.
    """

    uma_skip = True

    def __init__(self, message: str, budget_meta: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.budget_meta = dict(budget_meta or {})


#: Error texts of allocation failures on CPU and accelerators (besides the exception types).
_OOM_TEXTS = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA OOM, ``MemoryError``, CPU allocator)."""
    if isinstance(err, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and any(t in str(err).lower() for t in _OOM_TEXTS)


@dataclass
class Plan:
    """The budget's decision for one metric.

    Attributes:
        chunk_size: samples per chunk (``None``: nothing fits, skip).
        mode: the metric's memory mode (see ``Metric.memory_modes``).
        limit_bytes: the budget.
        fixed_bytes: what the mode holds whatever the chunk (parameter copies).
        per_sample_bytes: what each sample of a chunk adds (gradients, activations).
        reason: why it was skipped, when it was.
        calibration: measured / planned peak of the metric's earlier run (at least 1),
            which ``fixed_bytes`` and ``per_sample_bytes`` include (see :func:`calibrated`).
        calibration_chunk: the chunk that run used.
        base_fixed_bytes: ``fixed_bytes`` before the calibration.
        base_per_sample_bytes: ``per_sample_bytes`` before the calibration.
    """

    chunk_size: int | None
    mode: str
    limit_bytes: int
    fixed_bytes: int
    per_sample_bytes: int
    reason: str = ""
    calibration: float = 1.0
    calibration_chunk: int = 1
    base_fixed_bytes: int = 0
    base_per_sample_bytes: int = 0

    def as_meta(self) -> dict[str, Any]:
        """The plan's fields for ``result.meta``."""
        return {
            "planned_chunk_size": self.chunk_size,
            "memory_mode": self.mode,
            "budget_bytes": self.limit_bytes,
            "planned_fixed_bytes": self.fixed_bytes,
            "planned_per_sample_bytes": self.per_sample_bytes,
            "memory_calibration": round(self.calibration, 4),
            "memory_calibration_chunk": self.calibration_chunk,
            "planned_base_fixed_bytes": self.base_fixed_bytes,
            "planned_base_per_sample_bytes": self.base_per_sample_bytes,
        }


#: The largest budget accepted, in GiB (an exbibyte: beyond it a number is a typo, not a machine).
MAX_GB = 2.0**30


class MemoryBudget:
    """How much memory the diagnostics may take on top of what training holds.

    Each metric states its cost (:class:`~uma_callbacks.metrics.base.Cost`) as fixed bytes
    (copies of the parameters) plus bytes per sample of a chunk (a per-sample gradient,
    activations of one sample's forward and backward, measured once on the model). The
    budget picks the fastest memory mode and the largest chunk with
    ``fixed + per_sample * chunk <= limit``, within [``min_batch_size``, ``max_batch_size``].
    On an allocation failure the chunk is halved and the metric retried, down to
    ``min_batch_size`` (``adaptive_batch_sizing``); then the metric is skipped with the reason.

    Args:
        max_bytes: the budget in bytes.
        max_gb: the budget in GiB (alternative to ``max_bytes``).
        device: the device it applies to (default: the model's).
        margin: fraction of free memory kept back when no explicit budget is given.
        min_batch_size: the smallest chunk worth running.
        max_batch_size: the largest chunk (None: the probe batch).
        adaptive_batch_sizing: halve the chunk and retry on an allocation failure.

    Raises:
        ValueError: both or a non-positive size, a margin outside [0, 1), bad batch sizes.
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        max_gb: float | None = None,
        device: torch.device | str | None = None,
        margin: float = 0.2,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        adaptive_batch_sizing: bool = True,
    ) -> None:
        for field_name, value in (("min_batch_size", min_batch_size), ("max_batch_size", max_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"MemoryBudget.{field_name} must be a positive integer; got {value!r}")
        if max_batch_size is not None and max_batch_size < min_batch_size:
            raise ValueError(
                f"MemoryBudget.max_batch_size must be >= min_batch_size; got {max_batch_size} < {min_batch_size}"
            )
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.adaptive_batch_sizing = bool(adaptive_batch_sizing)
        if max_bytes is not None and max_gb is not None:
            raise ValueError("MemoryBudget takes max_bytes or max_gb, not both")
        sizes: tuple[tuple[str, float | None, float], ...] = (
            ("max_bytes", max_bytes, MAX_GB * 2**30),
            ("max_gb", max_gb, MAX_GB),
        )
        for field_name, size, most in sizes:
            if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size <= most):
                raise ValueError(f"MemoryBudget.{field_name} must be a positive number up to {most:g} or None; got {size!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
            raise ValueError(f"MemoryBudget.margin must be in [0, 1); got {margin!r}")
        self.max_bytes = int(max_bytes) if max_bytes is not None else (int(max_gb * 2**30) if max_gb else None)
        self.device = torch.device(device) if device is not None else None
        self.margin = float(margin)

    def limit_bytes(self, device: torch.device | str | None = None) -> int:
        """The budget in bytes: the explicit one, else free memory minus the margin."""
        if self.max_bytes is not None:
            return self.max_bytes
        return int(available_bytes(device or self.device or "cpu") * (1 - self.margin))

    def __repr__(self) -> str:
        return (
            f"MemoryBudget(max_bytes={self.max_bytes}, device={self.device}, margin={self.margin}, "
            f"min_batch_size={self.min_batch_size}, max_batch_size={self.max_batch_size})"
        )

    def plan(
        self,
        metric: Any,
        param_bytes_: int,
        sample_bytes: int,
        largest_chunk: int,
        device: Any = None,
        *,
        n_params: int | None = None,
        n_samples: int | None = None,
        sharding: RankParamBytes | None = None,
        calibration: float = 1.0,
        calibration_chunk: int = 1,
        backward_sample_bytes: int | None = None,
        largest_param_bytes: int | None = None,
        factor_bytes: int | None = None,
        factor_peak_bytes: int | None = None,
        requested: frozenset[str] = frozenset(),
    ) -> Plan:
        """Pick the memory mode and chunk for ``metric`` (see the class docstring).

        A mode whose cost keeps chunks across chunks (``Cost.kept_chunks``) is priced
        first as one chunk of the whole probe (one batch of ``n_samples``), which keeps
        nothing beyond its own; if that does not fit, as several chunks.

        Args:
            metric: a ``Metric`` (its ``memory_modes()`` are tried in order, fastest first).
            param_bytes_: bytes of the trainable parameters.
            sample_bytes: measured activation bytes of one sample's forward+backward.
            largest_chunk: the most samples a chunk can hold (the largest probe batch).
            device: where it runs (for the free-memory default; host-side copies count
                only when it is the CPU).
            n_params: entries of the trainable parameters (default: bytes / 4).
            n_samples: local probe samples (default: ``largest_chunk``).
            sharding: this rank's parameter bytes on a sharded (FSDP) model: the copies
                and vectors are then priced on the shard, plus the largest gathered block
                (see :func:`planned_bytes`). ``None``: a plain model.
            calibration: what the metric's earlier run measured over its plan (measured /
                planned peak, at least 1): the overrun is added to both terms (see
                :func:`calibrated`).
            calibration_chunk: the chunk that earlier run ran.
            backward_sample_bytes: what one sample's backward holds beyond its forward and
                the parameter gradients (:class:`SampleBytes`); ``None``: unknown
                (``sample_bytes`` counted again for a backward).
            largest_param_bytes: bytes of the largest trainable tensor, for a per-sample
                gradient held a tensor at a time (``Cost.per_sample_grad_by_tensor``).
            factor_bytes: one sample's per-layer factors (``Cost.layer_factors``;
                :class:`FactorBytes`); ``None``: unknown (A taken for it).
            factor_peak_bytes: what one sample's pass through the per-layer hooks peaks at
                (:class:`FactorBytes`); ``None``: unknown (the forward/backward's bytes).
            requested: the outputs later metrics of the save ask of this one
                (``Cost.requested_bytes``).

        Returns:
            The :class:`Plan`; ``chunk_size`` is None when no mode fits ``min_batch_size``.
            Its ``reason`` then names the leanest mode: the least bytes at ``min_batch_size``.
        """
        limit = self.limit_bytes(device)
        top = min(largest_chunk, self.max_batch_size or largest_chunk)
        where = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        local_samples = largest_chunk if n_samples is None else n_samples
        sizes: dict[str, Any] = {
            "n_params": n_params,
            "n_samples": local_samples,
            "on_host": where.type == "cpu",
            "backward_sample_bytes": backward_sample_bytes,
            "largest_param_bytes": largest_param_bytes,
            "factor_bytes": factor_bytes,
            "factor_peak_bytes": factor_peak_bytes,
            "requested": frozenset(requested),
        }
        # one chunk of the whole probe: a batch of every local sample that the chunk may take whole
        whole = local_samples if 0 < local_samples <= top else None
        smallest = min(self.min_batch_size, top)  # a probe batch below min_batch_size runs whole
        best: Plan | None = None
        scale = max(1.0, float(calibration)) if math.isfinite(calibration) else 1.0
        for mode, cost in metric.memory_modes():
            for one_chunk in (True, False) if whole is not None and cost.kept_chunks is not None else (False,):
                base = planned_bytes(cost, param_bytes_, sample_bytes, {**sizes, "one_chunk": one_chunk}, sharding)
                fixed, per_sample = calibrated(*base, scale, calibration_chunk)
                chunk = min(top, (limit - fixed) // per_sample) if limit > fixed else 0
                if one_chunk and chunk != whole:
                    continue  # priced as one chunk, it must run as one
                plan = Plan(
                    int(chunk) if chunk >= smallest else None, mode, limit, fixed, per_sample,
                    calibration=scale, calibration_chunk=max(1, int(calibration_chunk)),
                    base_fixed_bytes=base[0], base_per_sample_bytes=base[1],
                )  # fmt: skip
                if plan.chunk_size is not None:
                    return plan
                if best is None or plan.fixed_bytes + plan.per_sample_bytes * smallest < (
                    best.fixed_bytes + best.per_sample_bytes * smallest
                ):
                    best = plan  # the leanest: the least bytes at the smallest chunk
        assert best is not None
        best.reason = (
            f"memory budget {limit / 2**20:.1f} MiB is too small for {metric.name}: its leanest plan "
            f"({best.mode}) needs {best.fixed_bytes / 2**20:.1f} MiB fixed + {best.per_sample_bytes / 2**20:.2f} MiB "
            f"per sample, {(best.fixed_bytes + best.per_sample_bytes * smallest) / 2**20:.1f} MiB at "
            f"{smallest} sample(s)"
            + (f" (scaled by {scale:.2f}: its earlier run peaked over its plan)" if scale > 1.0 else "")
        )
        return best


def calibrated(fixed: int, per_sample: int, factor: float, chunk: int) -> tuple[int, int]:
    """``(fixed, per_sample)`` raised by an earlier run's overrun.

    That run, at ``chunk`` samples, peaked at ``factor`` times ``fixed + per_sample * chunk``:
    an excess ``E = (factor - 1) * (fixed + per_sample * chunk)`` the cost model missed.
    Whether E grows with the chunk or not is unknown, so both are assumed:
    ``fixed + E`` and ``per_sample + E / chunk``, which at any chunk is at least either
    reading (a smaller chunk keeps a chunk-independent overrun; a larger one scales it).

    Example:
        >>> calibrated(100, 10, 1.0, 4)
        (100, 10)
        >>> calibrated(0, 10, 3.0, 4)  # peaked at 120 where 40 was planned: E = 80
        (80, 30)
    """
    chunk = max(1, int(chunk))
    excess = max(0.0, factor - 1.0) * (fixed + per_sample * chunk)
    return int(math.ceil(fixed + excess)), int(math.ceil(per_sample + excess / chunk))


def planned_bytes(
    cost: Any,
    param_bytes_: int,
    sample_bytes: int,
    sizes: dict[str, Any],
    sharding: RankParamBytes | None = None,
) -> tuple[int, int]:
    """``(fixed, per_sample)`` bytes of one memory mode's ``cost`` on this rank.

    Plain model: ``fixed = cost(P, chunk=0)``, ``per_sample = cost(P, 1) - cost(P, 0)``.

    Sharded (``sharding`` given): what the metrics keep in the shard's layout, the parameter
    copies and flat vectors (accumulators, saved weights, directions), is priced on the shard
    (``P = sharding.held``, ``n = sharding.held_entries``), and FSDP's gathered block is
    added once. An ``extra_bytes`` (``host_extra_bytes``) function that carries
    ``on_shard(n, n_shard, itemsize, N)`` is priced by it instead (the Fisher's Lanczos
    basis, kept as the rank's pieces, on ``n_shard``; its cached per-sample gradients, of
    the rank's own samples, full-size, on ``n``). The rest stays on the full model, as the
    sharded code paths hold it today: other ``extra_bytes`` and ``probe_grads``; so does
    the per-sample term (a per-sample gradient is formed full-size)::

        fixed = cost(P, 0) - kept(P, n) + kept(P_shard, n_shard) + largest_block
                - extra(n) + extra.on_shard(n, n_shard),
        kept(P, n) = param_copies * P + vectors * n * w

    Args:
        cost: a :class:`~uma_callbacks.metrics.base.Cost`.
        param_bytes_: P, the full trainable parameters' bytes.
        sample_bytes: A, one sample's activation bytes.
        sizes: ``n_params`` (full entries), ``n_samples`` (local), ``on_host`` for ``cost``.
        sharding: this rank's :class:`RankParamBytes` on a sharded model, else ``None``.

    Example:
        >>> from uma_callbacks.metrics.base import Cost
        >>> shard = RankParamBytes(held=400, held_entries=100, full=800, full_entries=200, gathered=100)
        >>> cost = Cost(param_copies=2.0, per_sample_grads=True, fixed_bytes=5)
        >>> planned_bytes(cost, 800, 10, {"n_params": 200}, shard)  # 2 * 400 + 5 + 100; 800 + 2 * 10
        (905, 820)
    """
    whole = cost.bytes_needed(param_bytes_, sample_bytes, 0, **sizes)
    per_sample = max(1, cost.bytes_needed(param_bytes_, sample_bytes, 1, **sizes) - whole)
    if sharding is None:
        return whole, per_sample
    kept = type(cost)(
        param_copies=cost.param_copies,
        host_param_copies=cost.host_param_copies,
        vectors=cost.vectors,
        host_vectors=cost.host_vectors,
        vector_itemsize=cost.vector_itemsize,
    )
    held_sizes = {**sizes, "n_params": sharding.held_entries}
    fixed = (
        whole
        - kept.bytes_needed(param_bytes_, sample_bytes, 0, **sizes)
        + kept.bytes_needed(sharding.held, sample_bytes, 0, **held_sizes)
        + sharding.gathered
    )
    n = sizes.get("n_params") or max(1, param_bytes_ // 4)
    itemsize, n_samples = param_bytes_ / n, sizes.get("n_samples", 0)
    for extra in (cost.extra_bytes, cost.host_extra_bytes if sizes.get("on_host", True) else None):
        if extra is None:
            continue
        on_shard = getattr(extra, "on_shard", None)
        if on_shard is not None:  # priced in the shard's layout where the metric keeps it so
            fixed += on_shard(n, sharding.held_entries, itemsize, n_samples) - extra(n, itemsize, n_samples)
    return fixed, per_sample


@dataclass(frozen=True)
class SampleBytes:
    """One sample's activation bytes, as :func:`measure_sample` measures them.

    Attributes:
        forward: A_f, what the forward holds: the peak of the tensors it creates (those it
            saves for the backward among them).
        backward: A_b, what the backward holds beyond the forward's end and the parameter
            gradients (a tied parameter's once per use: :func:`gradient_bytes`); 0 when a
            backward frees activations as fast as it forms their gradients.
    """

    forward: int
    backward: int

    @property
    def activations(self) -> int:
        """A = max(A_f, A_b): what the cost model counts for a forward (and for a backward when A_b is not used)."""
        return max(self.forward, self.backward)


def measure_sample(
    model: torch.nn.Module, loss_fn: Any, batch: Any, *, eager: bool = False, state_held: bool = False
) -> SampleBytes:
    """:class:`SampleBytes` of one sample: its forward's and its backward's activation bytes.

    The first sample of ``batch`` is run once, its tensors counted by
    :class:`~uma_callbacks.core.peak_memory.TensorBytes` (every tensor the forward and the
    backward create, from its creation to its free): the forward (graph kept) peaks at A_f;
    a backward by ``torch.autograd.grad`` follows (no ``.grad`` is written), and its peak
    above the forward's end, less the parameter gradients (the cost model counts per-sample
    gradients apart), is A_b. A metric that back-propagates holds A_f + A_b per sample: on
    GPT-2 124M at 128 tokens A_f is 194 MiB (the logits and their softmax are most of it).

    Counted, not sampled: the same in a fresh process and at a later save. A sampled peak
    (:class:`PeakMemory`) of a forward that lasts milliseconds missed its transients in a
    process that had computed before (a tied 2-layer GPT-2's sample read 7 MB there, 17 MB
    fresh, 13.2 MB counted), and plans made from it fell to 0.65 of the metric's peak.

    Args:
        model: the model, left as found.
        loss_fn: the resolved per-sample loss.
        batch: the batch whose first sample is run: the probe's longest, since a
            sample's activations grow with its length (quadratically in eager attention).
        eager: run in eager attention, as a metric with ``needs_eager_attention`` will:
            its [H, T, T] attention probabilities are most of A at long lengths, and SDPA
            never forms them (planning from SDPA under-counted 4096 tokens about 16 times).
        state_held: the caller holds ``preserved_model_state(model)`` (the engine's one
            guard per metric); ``False``: taken here.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with _one_sample(model, batch, eager=eager, state_held=state_held) as one:
        with TensorBytes() as counted:
            loss = loss_fn(model, one).sum()
            forward = counted.peak_bytes
            forward_end = counted.mark()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            del loss, grads
            backward = counted.peak_bytes - forward_end
    return SampleBytes(forward=max(forward, 0), backward=max(backward - gradient_bytes(model), 0))


def measure_sample_bytes(
    model: torch.nn.Module, loss_fn: Any, batch: Any, *, eager: bool = False, state_held: bool = False
) -> int:
    """A: bytes of one sample's activations, the larger of :func:`measure_sample`'s two.

    The cost model counts A once for a forward-only metric, and A + A_b with a backward
    (twice A when A_b is not given).

    Args:
        model: the model, left as found.
        loss_fn: the resolved per-sample loss.
        batch: the batch whose first sample is run (see :func:`measure_sample`).
        eager: run in eager attention (see :func:`measure_sample`).
        state_held: the caller holds ``preserved_model_state(model)``.
    """
    return measure_sample(model, loss_fn, batch, eager=eager, state_held=state_held).activations


@dataclass(frozen=True)
class FactorBytes:
    """One sample through the per-layer hooks, as :func:`measure_factors` measures it.

    Attributes:
        held: F, what its factors hold once the hooks' backward is done (each layer's inputs
            and output gradients, a tied embedding's dense [V, d] per-sample gradient,
            ``vmap`` gradients of the leftovers).
        peak: what its forward and backward to the layer outputs peak at (the factors
            forming, the activations not yet freed).
    """

    held: int
    peak: int


def measure_factors(
    model: torch.nn.Module, loss_fn: Any, batch: Any, *, eager: bool = False, state_held: bool = False
) -> FactorBytes:
    """:class:`FactorBytes` of one sample: the per-layer factors the hooks keep, and their pass's peak.

    The first sample of ``batch`` is run through
    :func:`~uma_callbacks.linalg.layer_grads.layer_gradients` (one forward, one backward to
    the layer outputs, nothing written to ``.grad``), its tensors counted
    (:class:`TensorBytes`): F is what is still alive when it returns, the factors (an
    embedding's output gradients too, which its factor keeps without counting them in
    ``nbytes()``); the peak is the pass's. On GPT-2 124M at 128 tokens F is about 221 MiB,
    of which the tied embedding's [V, d] is 147, and the pass peaks at about 257 MiB.

    Args:
        model: the model, left as found.
        loss_fn: the resolved per-sample loss.
        batch: the batch whose first sample is run (see :func:`measure_sample`).
        eager: run in eager attention (see :func:`measure_sample`).
        state_held: the caller holds ``preserved_model_state(model)``.
    """
    from uma_callbacks.linalg.layer_grads import hook_plan, layer_gradients

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with _one_sample(model, batch, eager=eager, state_held=state_held) as one:
        plan = hook_plan(model, params)
        with TensorBytes() as counted:
            rep = layer_gradients(model, loss_fn, one, params, plan)
            held = FactorBytes(held=counted.level, peak=counted.peak_bytes)
        del rep
    return held


@contextlib.contextmanager
def _one_sample(model: torch.nn.Module, batch: Any, *, eager: bool, state_held: bool) -> Iterator[Any]:
    """The first sample of ``batch``, the model in eval mode (eager attention with ``eager``), put back after.

    Under the caller's guard (``state_held``), the measurement still puts back what it changes
    itself before the metric runs: the training flags, and FSDP2 groups a forward left
    all-gathered (a root keeps its gathered parameters after a forward; the metric must find
    the shards); otherwise it takes the whole guard.
    """
    from uma_callbacks.engine.probe import select_samples

    guard = _measurement_undone(model) if state_held else preserved_model_state(model)
    with guard, (eager_attention(model) if eager else contextlib.nullcontext()):
        model.eval()
        yield select_samples(batch, [0])


@contextlib.contextmanager
def _measurement_undone(model: torch.nn.Module) -> Iterator[None]:
    """Put back the training flags and reshard the FSDP2 groups that were sharded on entry."""
    from uma_callbacks.core.model_state import fsdp_managed, fsdp_reshard

    modes = [(m, m.training) for m in model.modules()]
    groups, _ = fsdp_managed(model)
    try:
        yield
    finally:
        fsdp_reshard(groups)
        for module, training in modes:
            module.training = training


def _sample_key(model: torch.nn.Module, batch: Any, eager: bool = False) -> Any:
    """What one sample's activation bytes depend on.

    That is the model (object and parameter shapes), the attention implementation it runs in,
    and the batch's tensor shapes and dtypes. Weights changing between checkpoints do not matter.
    """
    from uma_callbacks.core.batches import map_tensors

    shapes: list[Any] = []

    def note_shape(t: torch.Tensor) -> torch.Tensor:
        shapes.append((tuple(t.shape), str(t.dtype)))
        return t

    map_tensors(batch, note_shape)
    params = tuple((tuple(p.shape), str(p.dtype), p.requires_grad) for p in model.parameters())
    config = getattr(model, "config", None)
    attention = "eager" if eager else str(getattr(config, "_attn_implementation", None))
    return (id(model), hash(params), attention, tuple(shapes))


def longest_batch(batches: list[Any]) -> Any:
    """The batch whose samples are longest (tokens per sample; the largest on a tie).

    A sample's activations are measured on it, since they grow with the length.
    """
    from uma_callbacks.core.batches import count_samples, sequence_length

    return max(batches, key=lambda b: (sequence_length(b), count_samples(b)))


def planned_peak_bytes(meta: dict[str, Any]) -> int | None:
    """The peak a plan predicts for the chunk that ran: ``fixed + per_sample * chunk``.

    Calibration included, from a result's ``meta``; ``None`` when nothing was planned.
    """
    fixed, per, chunk = (meta.get(k) for k in ("planned_fixed_bytes", "planned_per_sample_bytes", "chunk_size"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (fixed, per, chunk)):
        return None
    return int(cast(int, fixed) + cast(int, per) * cast(int, chunk))


def check_within_budget(result: Any, limit: int | None) -> None:
    """Flag ``result.meta`` when its measured peak passed the budget.

    Sets ``budget_bytes``, ``over_budget`` (bool) and, when a plan was made,
    ``planned_peak_bytes``; an overrun also logs a warning naming the metric, the peak and
    the budget. The suite turns ``over_budget`` into the dashboard's ``over_budget`` scalar.
    """
    peak = result.meta.get("peak_bytes")
    if limit is None or not isinstance(peak, int):
        return
    result.meta["budget_bytes"] = int(limit)
    planned = planned_peak_bytes(result.meta)
    if planned is not None:
        result.meta["planned_peak_bytes"] = planned
    result.meta["over_budget"] = bool(peak > limit)
    if peak > limit:
        logger.warning(
            "uma: %s peaked at %.1f MiB, over its memory budget of %.1f MiB (planned %s); flagged over_budget, "
            "and its next plan is scaled by the overrun",
            result.name, peak / 2**20, limit / 2**20,
            "nothing" if planned is None else f"{planned / 2**20:.1f} MiB",
        )  # fmt: skip


def compute_within_budget(
    metric: Any,
    model: torch.nn.Module,
    batches: list[Any],
    loss_fn: Any,
    budget: MemoryBudget | None,
    *,
    collective: Any = None,
    chunk_size: int | None = None,
    history: Any = None,
    sample_cache: dict[Any, int] | None = None,
    calibration: float = 1.0,
    calibration_chunk: int = 1,
    timeout_seconds: float | None = None,
    device: torch.device | None = None,
    optimizer_state: Any = None,
    results: Any = None,
) -> Any:
    """``metric.compute`` with the chunk the budget plans, halving it on allocation failures.

    The engine's one run of a metric: the loss is resolved once
    (:func:`~uma_callbacks.metrics.loss_choice.resolve_loss`, a no-op for the suite's), the
    model state is guarded once around the planning measurement and the computation
    (:func:`~uma_callbacks.core.model_state.preserved_model_state`; again for each retry after
    an allocation failure, which starts from the state as found), the chunk is decided by
    :meth:`~uma_callbacks.metrics.base.Metric.chunk_for` and the time limit is passed as it came.

    The plan is made from what the metric will run: one sample of the probe's longest
    batch, measured in the attention implementation the metric switches to (eager for
    ``needs_eager_attention``), its cost raised by ``calibration`` (measured / planned peak
    of the metric's earlier run at ``calibration_chunk``, kept by the suite; see
    :func:`calibrated`).

    Without a budget (and without ``chunk_size``), the metric runs at the chunk
    ``.compute()`` would use (its own, else its default) and an allocation failure still
    halves it down to 1.

    Args:
        metric: the metric to run.
        model: the snapshot (left as found).
        batches: the local probe batches.
        loss_fn: the per-sample loss (the suite's resolved one, the user's, or ``None``).
        budget: the memory budget; ``None``: no plan.
        collective: cross-rank sums; ``None`` for one process.
        chunk_size: a fixed chunk (no plan).
        history: the earlier checkpoints the metric compares against.
        sample_cache: one sample's measured bytes, by model and batch shapes.
        calibration: measured / planned peak of the metric's earlier run.
        calibration_chunk: the chunk that run used.
        timeout_seconds: the time limit decided by the caller (``Metric.time_limit``);
            ``None``: the metric's own.
        device: the model's device when the caller knows it.
        optimizer_state: the optimizer's state, for a metric that reads it.
        results: what earlier metrics of the save hand this one and what later ones ask of
            it (:class:`~uma_callbacks.metrics.base.SaveResults`), for a metric in such a pair.

    Returns:
        The ``MetricResult``, with ``chunk_size``, ``retries`` and the plan in ``meta``;
        under a budget also ``budget_bytes`` and ``over_budget`` (the measured peak passed
        it: see :func:`check_within_budget`).

    Raises:
        BudgetExceeded: no chunk of at least ``min_batch_size`` fits (before or after retries).
    """
    from uma_callbacks.metrics.loss_choice import resolve_loss

    where = device if device is not None else model_device(model)
    loss = resolve_loss(model, loss_fn, batches)
    plan_meta: dict[str, Any] = {}
    min_chunk = budget.min_batch_size if budget is not None else 1
    adaptive = budget.adaptive_batch_sizing if budget is not None else True
    chunk: int | None = None
    retries = 0
    while True:
        failure: BaseException | None = None
        with preserved_model_state(model):  # the one guard of this run (a retry takes its own)
            if chunk is None:
                planned = None
                if budget is not None and not (chunk_size or getattr(metric, "chunk_size", None)):
                    planned, plan_meta = _plan_chunk(
                        metric, model, batches, loss, budget, where, collective, sample_cache, calibration,
                        calibration_chunk, results.requested if results is not None else frozenset(),
                    )  # fmt: skip
                chunk = metric.chunk_for(batches, chunk_size, planned)
            try:
                result = metric.compute(
                    model, batches, loss, collective=collective, chunk_size=chunk, timeout_seconds=timeout_seconds,
                    history=history, device=where, state_held=True,
                    **({"optimizer_state": optimizer_state} if optimizer_state is not None else {}),
                    **({"results": results} if results is not None else {}),
                )  # fmt: skip
            except Exception as err:  # only allocation failures are handled here
                if not is_out_of_memory(err):
                    raise
                failure = err
        if failure is None:
            break
        release_memory(where, full=True)
        distributed = collective is not None and getattr(collective, "world_size", 1) > 1
        if not adaptive or distributed or chunk // 2 < min_chunk:
            raise BudgetExceeded(
                f"{metric.name} ran out of memory at chunk {chunk} after {retries} retries "
                f"(min_batch_size {min_chunk}): {failure}"
            ) from failure
        logger.warning("uma: %s ran out of memory at chunk %d; retrying at %d", metric.name, chunk, chunk // 2)
        chunk //= 2
        retries += 1
    result.meta.update(plan_meta)
    result.meta["chunk_size"] = chunk
    result.meta["retries"] = retries
    if budget is not None:
        check_within_budget(result, plan_meta.get("budget_bytes", budget.limit_bytes(where)))
    return result


def _plan_chunk(
    metric: Any,
    model: torch.nn.Module,
    batches: list[Any],
    loss: Any,
    budget: MemoryBudget,
    device: torch.device,
    collective: Any,
    sample_cache: dict[Any, int] | None,
    calibration: float,
    calibration_chunk: int,
    requested: frozenset[str] = frozenset(),
) -> tuple[int, dict[str, Any]]:
    """``(chunk, plan meta)`` of the budget's plan for ``metric``, its memory mode switched on.

    Called inside the run's state guard.

    Raises:
        BudgetExceeded: nothing fits, or one sample ran out of memory when measured.
    """
    from uma_callbacks.engine.probe import count_samples

    largest = max(count_samples(b) for b in batches)
    sizes = rank_param_bytes(model)  # sharded (FSDP): the shard and the largest gathered block
    modes = metric.memory_modes()
    sample_bytes, backward_bytes, factor_bytes = 0, 0, None
    if getattr(metric, "needs_grad", True) or any(c.forward_only for _, c in modes):
        eager = bool(getattr(metric, "needs_eager_attention", False))
        longest = longest_batch(batches)
        key = _sample_key(model, longest, eager)
        # the factors are measured through the per-layer hooks on one model copy (not sharded)
        factors = any(c.layer_factors for _, c in modes) and not sizes.sharded
        if sample_cache is not None and key in sample_cache and (key, "backward") in sample_cache:
            # the same model and batch shapes: measured at an earlier checkpoint
            sample_bytes, backward_bytes = sample_cache[key], sample_cache[(key, "backward")]
        else:
            sample = _measured(metric, device, budget, eager, measure_sample, model, loss, longest)
            sample_bytes, backward_bytes = sample.activations, sample.backward
            if sample_cache is not None:
                sample_cache[key], sample_cache[(key, "backward")] = sample_bytes, backward_bytes
        if factors and sample_cache is not None and (key, "factors") in sample_cache:
            factor_bytes = FactorBytes(sample_cache[(key, "factors")], sample_cache[(key, "factors_peak")])
        elif factors:
            factor_bytes = _measured(metric, device, budget, eager, measure_factors, model, loss, longest)
            if sample_cache is not None:
                sample_cache[(key, "factors")], sample_cache[(key, "factors_peak")] = factor_bytes.held, factor_bytes.peak
    if collective is not None and getattr(collective, "world_size", 1) > 1:
        # every rank must plan the same chunk: use the mean measurement
        def mean(value: int) -> int:
            return int(collective.sum_scalar(float(value)) / collective.world_size)

        sample_bytes, backward_bytes = mean(sample_bytes), mean(backward_bytes)
        if factor_bytes is not None:
            factor_bytes = FactorBytes(mean(factor_bytes.held), mean(factor_bytes.peak))
    n_samples = sum(count_samples(b) for b in batches)
    plan = budget.plan(
        metric,
        sizes.full,
        sample_bytes,
        largest,
        device,
        n_params=sizes.full_entries,
        n_samples=n_samples,
        sharding=sizes if sizes.sharded else None,
        calibration=calibration,
        calibration_chunk=calibration_chunk,
        backward_sample_bytes=backward_bytes,
        largest_param_bytes=largest_param_bytes(model),
        factor_bytes=factor_bytes.held if factor_bytes is not None else None,
        factor_peak_bytes=factor_bytes.peak if factor_bytes is not None else None,
        requested=requested,
    )
    plan_meta = plan.as_meta()
    if sizes.sharded:
        plan_meta.update(planned_shard_bytes=sizes.held, planned_gathered_bytes=sizes.gathered)
    plan_meta["measured_sample_bytes"] = sample_bytes
    plan_meta["measured_backward_sample_bytes"] = backward_bytes
    if factor_bytes is not None:
        plan_meta["measured_factor_bytes"] = factor_bytes.held
        plan_meta["measured_factor_peak_bytes"] = factor_bytes.peak
    if requested:
        plan_meta["planned_for_requests"] = sorted(requested)
    if plan.chunk_size is None:
        raise BudgetExceeded(plan.reason, plan_meta)
    metric.use_memory_mode(plan.mode)
    return plan.chunk_size, plan_meta


def _measured(metric: Any, device: torch.device, budget: MemoryBudget, eager: bool, measure: Any, *args: Any) -> Any:
    """``measure(*args, eager=eager, state_held=True)``; one sample running out of memory skips the metric.

    Raises:
        BudgetExceeded: the sample ran out of memory when measured.
    """
    try:
        return measure(*args, eager=eager, state_held=True)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        release_memory(device, full=True)
        raise BudgetExceeded(
            f"{metric.name}: one sample of the probe's longest batch ran out of memory when measured"
            f"{' in eager attention' if eager else ''}: {err}",
            {"budget_bytes": budget.limit_bytes(device)},
        ) from err


def as_budget(value: Any) -> MemoryBudget:
    """``None`` -> the device's free memory minus a margin; a number -> that many GiB."""
    if value is None:
        return MemoryBudget()
    if isinstance(value, MemoryBudget):
        return value
    return MemoryBudget(max_gb=float(value))
