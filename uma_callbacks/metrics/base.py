"""The metric contract: :class:`Metric`, :class:`MetricResult`, :class:`Cost`.

A metric is a pure computation on ``(model, batches, loss_fn)``. It never imports a
trigger, the journal or a tracker. :meth:`Metric.compute` wraps the subclass's
``_compute`` with everything every metric needs:

- the model comes back exactly as it went in (weights, ``training`` flags,
  ``requires_grad``, ``.grad``, attention implementation) and the global RNG state is
  untouched (``torch.random.fork_rng``);
- time, peak memory and the chunk size used land in ``result.meta``;
- sums over the probe go through a :class:`~uma_callbacks.core.distributed.Collective`, so
  that a probe sharded over ranks gives the single-process numbers.
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, SupportsFloat

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.core.batches import count_samples, sequence_length, split_batch
from uma_callbacks.core.devices import model_device
from uma_callbacks.core.distributed import Collective, LocalCollective
from uma_callbacks.core.interrupt import MetricInterrupted, interrupt_requested
from uma_callbacks.core.losses import LossFn
from uma_callbacks.core.model_state import eager_attention, preserved_model_state
from uma_callbacks.core.optimizer_state import OptimizerSnapshot
from uma_callbacks.metrics.loss_choice import ResolvedLoss, resolve_loss
from uma_callbacks.metrics.states import declare_state, reduce_states
from uma_callbacks.metrics.time_cost import UnitCosts

#: Allowed values of :attr:`MetricResult.status`.
STATUSES = ("ok", "error", "skipped", "timeout", "cached", "interrupted", "partial")


class MetricTimeout(RuntimeError):
    """Raised between chunks when a metric runs past its ``timeout_seconds``.

    A metric that named what it has finished (:meth:`ComputeContext.keep_partial`) is not
    lost to it: :meth:`Metric.compute` catches it and returns those values as a
    ``"partial"`` result instead (one process; see :meth:`ComputeContext.keep_partial`).

    Attributes:
        progress: what the metric had done (``chunks_done``, ``matvecs``, ...).
    """

    progress: dict[str, Any] = {}


class MetricSkipped(RuntimeError):
    """Raised when a metric has nothing to measure yet (e.g. no previous checkpoint).

    The suite records ``status="skipped"`` with the message as the reason.
    """

    uma_skip = True


@dataclass(frozen=True)
class Cost:
    """What a metric holds in memory, read by :class:`~uma_callbacks.engine.budget.MemoryBudget`.

    With ``P`` the bytes of the trainable parameters, ``n`` their number of entries, ``A``
    the activation bytes of one sample's forward+backward and ``N`` the local probe
    samples, a chunk of ``B`` samples needs about ``fixed + per_sample * B`` with

    - ``fixed = param_copies * P + vectors * n * w + probe_grads * N * P + fixed_bytes``
      (``w`` = max(``vector_itemsize``, the parameters' bytes per entry): flat vectors such
      as a Lanczos basis or float32 accumulators of bf16 weights), plus the same terms
      with ``host_`` when the budget's device is the host itself;
    - ``per_sample = per_sample_grads * P + A * (1 + hvp + activation_copies) + backward * A_b``,
      where a metric that back-propagates adds A_b, what one sample's backward holds beyond
      its forward's activations and the parameter gradients (A itself when A_b is not
      known: activations and their gradients), ``hvp`` adds one A for the kept
      double-backward graph, and ``activation_copies`` counts what the metric derives from
      the activations while they are alive (the attention metric's entropy of each layer's
      [H, T, T] probabilities). A per-sample gradient held one parameter tensor at a time
      (``per_sample_grad_by_tensor``) counts the largest trainable tensor's bytes instead of P.

    Three terms follow what a run will hold, which the planner knows and the metric does not:

    - ``layer_factors``: the per-sample gradients are kept as per-layer factors (each
      layer's inputs and output gradients, F bytes a sample, measured by the planner) past
      the backward, and each tensor's per-sample gradient is formed from them (then
      squared, a copy for a dense one): a sample costs the larger of that phase,
      ``F + per-sample gradient``, and the hooks' forward and backward (their measured
      peak, else the ``per_sample`` above);
    - ``kept_chunks``: the chunks' per-sample gradients are kept across chunks, up to
      ``K = kept_chunks(n, itemsize, N)`` bytes (the Fisher's Gram blocks between chunks),
      ``row`` bytes a sample (F with ``layer_factors``, else the per-sample gradient). A run
      of one chunk keeps nothing beyond its own. With more, when all fit (``N * row <= K``)
      ``N * row`` is fixed and a chunk's own rows are among them (``per_sample - row``);
      else K is fixed and one more chunk's rows are per sample (a block held while the next
      chunk is recomputed);
    - ``requested_bytes``: fixed bytes held only when a later metric of the same save asks
      for that output (:attr:`SaveResults.requested`: the Fisher's diagonal, its top
      eigenvector).

    A and A_b (and F) are measured by the planner on one sample of the probe's longest
    batch, in the attention implementation the metric runs (eager when ``needs_eager_attention``).

    Attributes:
        per_sample_grads: holds one gradient per sample of a chunk ([B, P]).
        hvp: takes Hessian-vector products by double backward (the graph of the first
            backward is kept).
        param_copies: full copies of the parameters held at once, in their dtype
            (accumulators, saved weights, directions).
        forward_only: needs no backward at all (landscape evaluation).
        vectors: flat vectors of ``n`` entries held at once (Lanczos basis, products).
        vector_itemsize: bytes per entry of those vectors (at least the parameters').
        probe_grads: holds a gradient for every local probe sample (cached Fisher rows).
        probe_graph_samples: holds the activations and first-backward graph of every local
            probe sample (a cached Hessian graph), ``N * A * 3``.
        fixed_bytes: any other fixed bytes.
        host_param_copies: parameter copies kept in host memory (free on an accelerator).
        host_vectors: flat vectors kept in host memory (a CPU Lanczos basis).
        extra_bytes: ``f(n, bytes per parameter entry, N) -> bytes`` for fixed memory that
            depends on the model or probe size (a Lanczos basis whose length and dtype
            follow the model, a gradient cache bounded by a byte limit).
        host_extra_bytes: the same, for host memory (counted only on a CPU budget).
        per_sample_grad_fraction: the share of P a per-sample gradient holds at once
            (per-parameter-group accumulation holds one group at a time).
        per_sample_grad_by_tensor: the per-sample gradient is held one parameter tensor at
            a time (the per-layer hooks: one layer's [B, *shape], a tied embedding's dense
            [B, V, d]), so a sample costs the largest trainable tensor's bytes, where the
            planner gives them; else ``per_sample_grad_fraction * P``.
        activation_copies: further copies of A per sample (temporaries computed from the
            activations while they are held).
        layer_factors: the per-sample gradients are kept as per-layer factors past the
            backward (see above).
        kept_chunks: ``f(n, bytes per parameter entry, N) -> bytes or None``: the most bytes
            of the chunks' per-sample gradients kept across chunks (``None``: none kept for
            this probe); counted only when the probe runs in more than one chunk (see above).
        requested_bytes: ``((output name, f(n, bytes per parameter entry, N) -> bytes), ...)``:
            fixed bytes held only when a later metric of the save asks for that output.
    """

    per_sample_grads: bool = False
    hvp: bool = False
    param_copies: float = 0.0
    forward_only: bool = False
    vectors: float = 0.0
    vector_itemsize: int = 4
    probe_grads: bool = False
    probe_graph_samples: bool = False
    fixed_bytes: int = 0
    host_param_copies: float = 0.0
    host_vectors: float = 0.0
    extra_bytes: Callable[[int, float, int], int] | None = None
    host_extra_bytes: Callable[[int, float, int], int] | None = None
    per_sample_grad_fraction: float = 1.0
    per_sample_grad_by_tensor: bool = False
    activation_copies: float = 0.0
    layer_factors: bool = False
    kept_chunks: Callable[[int, float, int], int | None] | None = None
    requested_bytes: tuple[tuple[str, Callable[[int, float, int], int]], ...] = ()

    def bytes_needed(
        self,
        param_bytes: int,
        sample_activation_bytes: int,
        chunk: int,
        *,
        n_params: int | None = None,
        n_samples: int = 0,
        on_host: bool = True,
        backward_sample_bytes: int | None = None,
        largest_param_bytes: int | None = None,
        factor_bytes: int | None = None,
        factor_peak_bytes: int | None = None,
        one_chunk: bool = False,
        requested: frozenset[str] | Sequence[str] = (),
    ) -> int:
        """Estimated peak bytes of one chunk of ``chunk`` samples (see class docstring).

        Args:
            param_bytes: P.
            sample_activation_bytes: A.
            chunk: B.
            n_params: n (default: P / 4, float32 parameters).
            n_samples: N, the local probe samples (for ``probe_*`` terms).
            on_host: the budget's device is the host, so ``host_*`` terms count.
            backward_sample_bytes: A_b (``None``: unknown, A counted again for a backward).
            largest_param_bytes: bytes of the largest trainable tensor (``None``: unknown).
            factor_bytes: F, one sample's per-layer factors (``None``: unknown, A taken for it).
            factor_peak_bytes: what one sample's pass through the per-layer hooks peaks at
                (``None``: unknown, the forward/backward's per-sample bytes taken for it).
            one_chunk: the probe runs in one chunk (``kept_chunks`` does not count).
            requested: the outputs later metrics of the save ask of this one.

        Example:
            >>> cost = Cost(per_sample_grads=True, per_sample_grad_fraction=0.5, per_sample_grad_by_tensor=True)
            >>> cost.bytes_needed(1000, 100, 1), cost.bytes_needed(1000, 100, 1, backward_sample_bytes=30, largest_param_bytes=200)
            (700, 330)
            >>> kept = Cost(per_sample_grads=True, layer_factors=True, kept_chunks=lambda n, itemsize, N: 500)
            >>> sizes = {"n_samples": 8, "backward_sample_bytes": 0, "factor_bytes": 150}
            >>> kept.bytes_needed(1000, 100, 8, one_chunk=True, **sizes)  # 8 x max(1000 + 100, 150 + 1000)
            9200
            >>> kept.bytes_needed(1000, 100, 4, **sizes)  # 8 x 150 > 500 kept: 500 + 4 x (1150 + 150)
            5700
            >>> kept.bytes_needed(1000, 100, 4, **{**sizes, "factor_bytes": 50})  # all kept: 8 x 50 + 4 x (1100 - 50)
            4600
        """
        n = n_params if n_params else max(1, param_bytes // 4)
        itemsize = max(self.vector_itemsize, param_bytes / n if n else 4.0)
        copies = self.param_copies + (self.host_param_copies if on_host else 0.0)
        vectors = self.vectors + (self.host_vectors if on_host else 0.0)
        backward = 0 if self.forward_only else 1
        param_itemsize = param_bytes / n if n else 4.0
        extra = self.extra_bytes(n, param_itemsize, n_samples) if self.extra_bytes else 0
        if on_host and self.host_extra_bytes:
            extra += self.host_extra_bytes(n, param_itemsize, n_samples)
        asked = set(requested)
        extra += sum(f(n, param_itemsize, n_samples) for output, f in self.requested_bytes if output in asked)
        fixed = (
            extra
            + copies * param_bytes
            + vectors * n * itemsize
            + (n_samples * param_bytes if self.probe_grads else 0)
            + (n_samples * sample_activation_bytes * (2 + backward) if self.probe_graph_samples else 0)
            + self.fixed_bytes
        )
        grad = param_bytes * self.per_sample_grad_fraction
        if self.per_sample_grad_by_tensor and largest_param_bytes:
            grad = largest_param_bytes
        grad = grad if self.per_sample_grads else 0
        backward_bytes = sample_activation_bytes if backward_sample_bytes is None else backward_sample_bytes
        per_sample = (
            grad
            + sample_activation_bytes * (1 + (1 if self.hvp else 0) + self.activation_copies)
            + backward * backward_bytes
        )
        factors = sample_activation_bytes if factor_bytes is None else factor_bytes
        if self.layer_factors:  # the hooks' pass (measured when known), then F and one tensor's gradients
            per_sample = max(per_sample if factor_peak_bytes is None else factor_peak_bytes, factors + grad)
        cap = self.kept_chunks(n, param_itemsize, n_samples) if self.kept_chunks is not None and not one_chunk else None
        if cap is not None:
            row = factors if self.layer_factors else grad
            if n_samples * row <= cap:  # every chunk kept: the chunk's own rows are among them
                fixed += n_samples * row
                per_sample = max(per_sample - row, 0)
            else:  # at most cap kept, and one more chunk's rows held while the next is recomputed
                fixed += cap
                per_sample += row
        return int(fixed + per_sample * chunk)


@dataclass
class MetricResult:
    """The outcome of one metric on one snapshot.

    Attributes:
        name: the metric's string name (``"fisher"``, ``"gradient_flow"``, ...).
        scalars: ``dict[str, float]``; per-layer keys are ``layers/<module>/<scalar>``,
            per-parameter keys ``params/<param name>/<scalar>``.
        arrays: ``dict[str, np.ndarray]`` (``top_eigenvalues``, ``grid_losses``, ...).
        meta: seconds, peak_bytes, chunk_size, matvecs, seeds, probe fingerprint, ...
        tensors: large named tensors (e.g. the Fisher diagonal, per parameter), kept on
            CPU and written as ``.safetensors`` by the journal when asked.
        status: one of :data:`STATUSES`.
        error: for ``status != "ok"``: ``{"type", "message", "traceback"}``.
        provided: what this metric hands to later metrics of the same save that asked for
            it (:meth:`Metric.results_needed`; ``ctx.results.requested`` names the outputs
            asked for), ``{output name: value}``. Kept in memory for that save only: never
            journalled, never part of the JSON form or the cache.
    """

    name: str
    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    status: str = "ok"
    error: dict[str, str] | None = None
    provided: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """True when the metric produced its values: computed now, read from cache, or ``"partial"``.

        ``"partial"``: values kept, but short of what was asked: an iterative method
        stopped short of its stated tolerance, an estimate's standard error is too large,
        or the time limit stopped the metric after some of its points
        (``meta["progress"]``); the reason in ``meta["partial_reason"]``.
        """
        return self.status in ("ok", "cached", "partial")

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (arrays as nested lists, tensors left out)."""
        return {
            "name": self.name,
            "status": self.status,
            "scalars": {k: _json_float(v) for k, v in self.scalars.items()},
            "arrays": {k: np.asarray(v).tolist() for k, v in self.arrays.items()},
            "meta": _jsonable(self.meta),
            "error": self.error,
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> MetricResult:
        """Inverse of :meth:`to_json_dict` (tensors are not part of the JSON form)."""
        return cls(
            name=data["name"],
            scalars={k: float(v) if v is not None else math.nan for k, v in data.get("scalars", {}).items()},
            arrays={k: np.asarray(v, dtype=np.float64) for k, v in data.get("arrays", {}).items()},
            meta=dict(data.get("meta", {})),
            status=data.get("status", "ok"),
            error=data.get("error"),
        )


def _json_float(value: SupportsFloat) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return _json_float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


@dataclass(frozen=True)
class CheckpointState:
    """An earlier checkpoint as a metric sees it.

    Attributes:
        step: its global step.
        weights: ``{param name: tensor}`` of every parameter (CPU copies, never the model's own).
        fingerprint: its weights fingerprint (part of the cache key of results that use it).
    """

    step: int
    weights: Mapping[str, torch.Tensor]
    fingerprint: str = ""

    @property
    def label(self) -> str:
        """``step-<N>``."""
        return f"step-{self.step}"


@dataclass(frozen=True)
class History:
    """The earlier checkpoints a metric asked for (:attr:`Metric.history_needed`, :attr:`Metric.needs_first`).

    Attributes:
        previous: the most recent earlier checkpoints, most recent first (at most
            ``history_needed`` of them; fewer at the start of a run).
        first: the first checkpoint measured in this run (``None`` when this is the first,
            or when the metric did not ask for it).
    """

    previous: tuple[CheckpointState, ...] = ()
    first: CheckpointState | None = None

    def fingerprints(self) -> list[str]:
        """The fingerprints this history is made of (first last), for cache keys."""
        return [s.fingerprint for s in self.previous] + ([self.first.fingerprint] if self.first else [])


@dataclass(frozen=True)
class SaveResults:
    """What the metrics of one save hand each other (:meth:`Metric.results_needed`).

    The suite runs a save's metrics one after another, each metric's providers first. A
    metric that asked for an earlier metric's outputs gets them here, and one whose outputs
    a later metric asked for is told which (``requested``), so it forms them only then.

    Attributes:
        outputs: ``{provider metric name: {output name: value}}``, the providers whose asked
            outputs reached this metric (they ran at this save and handed them on).
        missing: ``{provider metric name: why its outputs did not reach this metric}``: not
            in this save, failed, skipped, timed out, or read from the cache (what a metric
            hands on is kept in memory only); ``{"<provider>/<output>": why}`` for one
            output it did not form.
        requested: the outputs later metrics of this save ask of this metric (to put in
            ``result.provided``).

    Example:
        >>> r = SaveResults(outputs={"fisher": {"diagonal": 1}}, missing={"hessian": "not in this save"})
        >>> r.get("fisher", "diagonal"), r.get("hessian", "top_eigenvector")
        ((1, ''), (None, 'not in this save'))
    """

    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)
    requested: frozenset[str] = frozenset()

    def get(self, metric: str, output: str) -> tuple[Any, str]:
        """``(value, "")`` of ``metric``'s ``output`` at this save, or ``(None, why it is not here)``."""
        got = self.outputs.get(metric)
        if got is not None and output in got:
            return got[output], ""
        for key in (f"{metric}/{output}", metric):
            if key in self.missing:
                return None, self.missing[key]
        if got is not None:
            return None, f"{metric} ran at this save but did not hand on {output!r}"
        return None, f"{metric} did not run before this metric at this save (add it to the metrics to get its {output})"


@dataclass
class ComputeContext:
    """Everything ``Metric._compute`` may use; built by :meth:`Metric.compute`.

    Attributes:
        model: the model, in eval mode for the duration.
        batches: the local (this rank's) probe batches.
        loss_fn: per-sample loss ``loss_fn(model, batch) -> Tensor[B]``.
        chunk_size: the most samples processed at once.
        collective: sums across ranks (identity in one process).
        meta: filled by the metric (matvecs, seeds, ...) and returned in the result.
        deadline: ``time.monotonic()`` value past which :meth:`check_time` raises.
        history: the earlier checkpoints the metric declared it needs.
        optimizer_state: the optimizer's state at this checkpoint, by parameter name, when
            the trigger has one (:class:`~uma_callbacks.core.optimizer_state.OptimizerSnapshot`);
            passed to metrics that declare :attr:`Metric.needs_optimizer`.
        results: what earlier metrics of the same save hand this one, and what later ones
            ask of it (:class:`SaveResults`; see :meth:`Metric.results_needed`).
    """

    model: torch.nn.Module
    batches: Sequence[Any]
    loss_fn: LossFn
    chunk_size: int
    collective: Collective
    meta: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    history: History = field(default_factory=History)
    optimizer_state: OptimizerSnapshot | None = None
    results: SaveResults = field(default_factory=SaveResults)
    _kept: Callable[[], MetricResult | None] | None = field(default=None, repr=False)

    def trainable_params(self) -> dict[str, torch.Tensor]:
        """``{name: parameter}`` of the parameters with ``requires_grad``, in model order."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def chunks(self) -> Iterator[Any]:
        """The local probe, re-cut into chunks of at most ``chunk_size`` samples."""
        for batch in self.batches:
            yield from split_batch(batch, self.chunk_size)

    @property
    def n_local(self) -> int:
        """Samples in this rank's share of the probe."""
        return sum(count_samples(b) for b in self.batches)

    def n_total(self) -> int:
        """Samples in the whole probe (summed over ranks)."""
        return int(self.collective.sum_scalar(float(self.n_local)))

    def keep_partial(self, build: Callable[[], MetricResult | None]) -> None:
        """Name what the metric has finished so far, for when its time limit stops it.

        ``build()`` runs only if :meth:`check_time` stops the metric for time: it returns a
        result holding the values finished so far (NaN where a point was not reached), or
        ``None`` when nothing is finished yet. :meth:`Metric.compute` then returns that
        result with ``status="partial"``, ``meta["progress"]`` and ``meta["partial_reason"]``
        instead of raising :class:`MetricTimeout`, and the suite journals and delivers it
        like any other. A later call replaces an earlier one (a metric with stages names
        each stage's). ``build`` reads what the metric kept (CPU values, a Lanczos
        tridiagonal); it must not use the model, which is restored by then.

        On several ranks the time limit still ends in :class:`MetricTimeout`: each rank
        stops at its own point, so no reduction over ranks can be trusted to be complete.
        """
        self._kept = build

    def kept_partial(self, stop: MetricTimeout, limit: float | None) -> MetricResult | None:
        """The ``"partial"`` result of what was finished when ``stop`` came, or ``None``.

        ``None``: nothing was kept (:meth:`keep_partial` never called, nothing finished
        yet) or several ranks run the metric.

        Args:
            stop: the time-out that stopped the metric (its ``progress``).
            limit: the time limit in seconds (said in the reason).

        Returns:
            The kept result, with status, progress and reason set; or ``None``.
        """
        if self._kept is None or self.collective.world_size > 1:
            return None
        result = self._kept()
        if result is None:
            return None
        progress = dict(getattr(stop, "progress", None) or self.progress)
        done = ", ".join(f"{k}={v}" for k, v in progress.items())
        of = f" of {limit:g} s" if limit is not None else ""
        reason = f"stopped by its time limit{of}; kept what was finished ({done})"
        earlier = result.meta.get("partial_reason") or self.meta.get("partial_reason")
        result.status = "partial"
        result.meta["progress"] = progress
        result.meta["stopped_by"] = "timeout"
        result.meta["partial_reason"] = f"{reason}; {earlier}" if earlier else reason
        self.meta.pop("partial_reason", None)  # merged above; ctx.meta is laid over the result's
        return result

    def check_time(self, **progress: Any) -> None:
        """Record ``progress``; stop the metric if it is past its deadline or SIGTERM arrived.

        Raises:
            MetricTimeout: past the deadline (carries ``progress``).
            MetricInterrupted: SIGTERM during the metric (see :mod:`uma_callbacks.core.interrupt`).
        """  # noqa: DOC502 (both raised here, through the variable ``stop``)
        self.progress.update(progress)
        stop: RuntimeError | None = None
        if interrupt_requested():
            stop = MetricInterrupted(f"interrupted by SIGTERM; progress: {self.progress}")
        elif self.deadline is not None and time.monotonic() > self.deadline:
            stop = MetricTimeout(f"timed out; progress: {self.progress}")
        if stop is not None:
            stop.progress = dict(self.progress)  # type: ignore[attr-defined]
            raise stop


class Metric(abc.ABC):
    """Base class: one family of diagnostics computed on one model snapshot.

    Subclasses set the class attributes and implement :meth:`_compute`, which fills a
    :class:`MetricResult` from a :class:`ComputeContext`. Constructor arguments are
    validated at construction (``ValueError`` naming the field and the allowed values;
    numbers through :mod:`uma_callbacks.core.validate`, each within a stated range) and
    recorded by :meth:`config` (the cache key).

    Attributes:
        name: the string name used in ``metrics=[...]`` and in log keys ``uma/<name>/...``.
        cost: what the metric holds in memory (:class:`Cost`).
        needs_grad: whether the metric back-propagates (so the probe needs labels).
        needs_eager_attention: HF attention is switched to ``"eager"`` for the computation
            and back after (SDPA's mask code branches on data, which ``vmap`` and double
            backward refuse; attention probabilities exist only in eager attention);
            ``meta["attn_implementation"]`` says when it was switched.
        history_needed: how many earlier checkpoints the metric compares against (0: none);
            the session keeps that many (CPU copies) and passes them as ``ctx.history``.
        needs_first: the metric also compares against the first checkpoint of the run.
        needs_optimizer: the metric reads the optimizer's state (``ctx.optimizer_state``); the
            engine passes it and keys the metric's cache by it.
        uses_results: ``{metric name: (output, ...)}``: outputs of other metrics of the same
            save this metric reads (``ctx.results``), e.g. ``{"fisher": ("diagonal",)}``; the
            suite runs those metrics first, asks them for these outputs, and keys this
            metric's cache by their results. A metric that does not run, fails or hands
            nothing on leaves this one to run without it (its result says so). Read through
            :meth:`results_needed`, which a metric overrides when the need depends on its
            configuration.
        default_chunk_tokens: with no ``chunk_size`` (argument, constructor or budget plan),
            chunks of at most this many tokens (samples x sequence length of the batch's
            first 2-D tensor) instead of the whole probe batch; ``None``: the whole batch.

    Cross-rank reduction: every statistic a metric sums over probe samples goes through
    ``ctx.collective`` (a sum all-reduce), so a probe sharded over ranks gives the
    single-process numbers; metrics keep sums and counts, never means, until the end.
    A metric whose sums are uniform declares them with :meth:`add_state` and reduces them
    all at once with :meth:`reduce_states` (torchmetrics' ``add_state(dist_reduce_fx=...)``).

    What the engine reads besides :meth:`compute`: the memory cost (:attr:`cost`,
    :meth:`memory_modes`), the history (:attr:`history_needed`, :attr:`needs_first`), the
    other metrics' results of the same save (:meth:`results_needed`) and the time cost (:meth:`time_cost`, :meth:`scaled_to`, :meth:`min_time_cost`), so a metric
    registered from outside the package is planned and scaled like a built-in one.
    """

    name: ClassVar[str] = ""
    cost: ClassVar[Cost] = Cost()
    needs_grad: ClassVar[bool] = True
    needs_eager_attention: ClassVar[bool] = False
    history_needed: ClassVar[int] = 0
    needs_first: ClassVar[bool] = False
    needs_optimizer: ClassVar[bool] = False
    uses_results: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: computes right on a sharded model (FSDP2 DTensor parameters); the others are skipped there
    supports_sharded: ClassVar[bool] = False
    default_chunk_tokens: ClassVar[int | None] = None

    def __init__(self, *, chunk_size: int | None = None, timeout_seconds: float | None = None) -> None:
        owner = type(self).__name__
        validate.check_int(f"{owner}.chunk_size", chunk_size, 1, validate.MAX_CHUNK, allow_none=True)
        validate.check_number(f"{owner}.timeout_seconds", timeout_seconds, 0, validate.MAX_SECONDS, lo_open=True, allow_none=True)
        self.chunk_size = chunk_size
        self.timeout_seconds = timeout_seconds

    # ------------------------------------------------------------------ memory
    def memory_modes(self) -> list[tuple[str, Cost]]:
        """``[(mode, cost)]`` this metric can run in, fastest first (the budget picks one).

        The default is one mode, ``"default"``, with the class's :attr:`cost`. A metric
        with a leaner way of computing the same numbers (per-parameter-group
        accumulation, directions regenerated from seeds, a saved copy on CPU) lists it
        after, and applies it in :meth:`use_memory_mode`. A mode never changes results.
        """
        return [("default", self.cost)]

    def use_memory_mode(self, mode: str) -> None:
        """Switch to one of :meth:`memory_modes` (the default has nothing to switch).

        Raises:
            ValueError: unknown mode.
        """  # noqa: DOC502 (from check_choice)
        allowed = [m for m, _ in self.memory_modes()]
        check_choice(f"{type(self).__name__} memory mode", mode, allowed)
        self._memory_mode = mode

    # ------------------------------------------------------------------ other metrics' results
    def results_needed(self) -> dict[str, tuple[str, ...]]:
        """``{metric name: (output, ...)}`` this metric reads from earlier metrics of the same save.

        The default is :attr:`uses_results`; a metric whose need depends on its
        configuration (a direction asked for or not) overrides this.
        """
        return {name: tuple(outputs) for name, outputs in self.uses_results.items()}

    # ------------------------------------------------------------------ time
    def time_cost(self, units: UnitCosts) -> float:
        """The predicted seconds of this metric on the probe, from measured unit costs (rough, within ~2x).

        The default, one backward and a half, is what a per-sample-gradient metric costs; a
        metric counted in forwards, Hessian-vector products or grid points overrides it.
        """
        return 1.5 * units.backward

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[Metric, dict[str, list[Any]]]:
        """The metric as it will run within ``seconds``, and the accuracy that costs.

        Returns:
            ``(self or a scaled copy, {knob: [before, after]})``: the knobs turned down so
            that :meth:`time_cost` fits ``seconds`` where it can (the result's own outputs
            say what accuracy followed: ``trace_stderr``, grid size, ...). The configured
            metric is never changed. The default has no knob: ``(self, {})``.
        """
        return self, {}

    def min_time_cost(self, units: UnitCosts) -> float:
        """The predicted seconds of this metric scaled down as far as it goes (its floor)."""
        return self.scaled_to(0.0, units)[0].time_cost(units)

    # ------------------------------------------------------------------ states
    def add_state(self, name: str, dist_reduce_fx: str = "sum") -> None:
        """Declare a statistic this metric reduces across ranks (torchmetrics' ``add_state``).

        Call it in ``__init__``; hand the local values to :meth:`reduce_states` at the end
        of :meth:`_compute`. The declaration is private state, not configuration.

        Raises:
            ValueError: a bad name, a name declared twice, or an unknown ``dist_reduce_fx``
                (see :data:`~uma_callbacks.metrics.states.DIST_REDUCE_FXS`).
        """  # noqa: DOC502 (from declare_state)
        if "_states" not in vars(self):
            self._states: dict[str, str] = {}
        declare_state(self._states, type(self).__name__, name, dist_reduce_fx)

    @property
    def state_reductions(self) -> dict[str, str]:
        """``{state: reduction}`` as declared with :meth:`add_state` (empty: none declared)."""
        return dict(vars(self).get("_states", {}))

    def reduce_states(self, ctx: ComputeContext, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reduce every declared state over ``ctx``'s ranks, in one collective call, in place.

        Raises:
            ValueError: a value for an undeclared state, or a declared state without one.
        """  # noqa: DOC502 (from reduce_states)
        return reduce_states(self.state_reductions, type(self).__name__, ctx.collective, values)

    # ------------------------------------------------------------------ public API
    def config(self) -> dict[str, Any]:
        """The metric's configuration as JSON-able values (part of the cache key).

        Every public attribute is configuration; keep state in ``_private`` attributes.
        """
        out: dict[str, Any] = {"metric": self.name}
        for key, value in sorted(vars(self).items()):
            if key.startswith("_") or key in ("chunk_size", "timeout_seconds"):
                continue
            out[key] = _config_value(value)
        return out

    def _default_chunk(self, batches: Sequence[Any]) -> int:
        """The whole largest probe batch, or fewer samples per :attr:`default_chunk_tokens`."""
        largest = max(count_samples(b) for b in batches)
        if self.default_chunk_tokens is None:
            return largest
        length = sequence_length(batches[0])
        return max(1, min(largest, self.default_chunk_tokens // max(1, length)))

    def chunk_for(self, batches: Sequence[Any], chunk_size: int | None = None, planned: int | None = None) -> int:
        """The chunk a run uses; the one place it is decided.

        ``chunk_size`` (the caller's: an argument, or the suite's ``chunk_sizes``), else the
        constructor's, else ``planned`` (a memory budget's plan), else the default (the
        largest probe batch, cut to :attr:`default_chunk_tokens`). ``.compute()`` and the
        suite both ask here, so the same budget gives the same chunk.
        """
        return int(chunk_size or self.chunk_size or planned or self._default_chunk(batches))

    def time_limit(self, default: float | None = None, cap: float | None = None) -> float | None:
        """The seconds a run may take; the one place it is decided.

        This metric's own ``timeout_seconds``, else ``default`` (the run's), and at most
        ``cap`` (its share of a compute budget, with the allowed overrun); ``None``: no limit.
        The metric is never changed: the limit is passed to :meth:`compute`.
        """
        own = self.timeout_seconds if self.timeout_seconds is not None else default
        limits = [x for x in (own, cap) if x is not None]
        return min(limits) if limits else None

    def compute(
        self,
        model: torch.nn.Module,
        batches: Sequence[Any],
        loss_fn: LossFn | ResolvedLoss | None = None,
        *,
        collective: Collective | None = None,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
        peak_meter: Callable[[torch.device | str], Any] | None = None,
        history: History | None = None,
        device: torch.device | None = None,
        state_held: bool = False,
        optimizer_state: OptimizerSnapshot | None = None,
        results: SaveResults | None = None,
    ) -> MetricResult:
        """Compute the metric on ``model`` over the probe ``batches``.

        Args:
            model: any ``nn.Module``; HF models with ``logits`` output get a default loss.
            batches: list of batches (dicts of tensors with a leading batch dim, or
                anything ``loss_fn`` takes).
            loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` of per-sample losses; ``None``
                picks the HF default (see :mod:`uma_callbacks.core.losses`); a
                :class:`~uma_callbacks.metrics.loss_choice.ResolvedLoss` (the suite's) is
                taken as it is.
            collective: cross-rank sums; ``None`` for one process.
            chunk_size: samples per chunk (overrides the constructor's); ``None``:
                :meth:`chunk_for` decides (the constructor's, else the default).
            timeout_seconds: the time limit decided by the caller (the suite's
                :meth:`time_limit`); ``None``: :meth:`time_limit` (the constructor's).
            peak_meter: a context-manager factory measuring peak bytes (from
                :mod:`uma_callbacks.engine.budget`), called with the device; ``None`` uses
                the default meter.
            history: the earlier checkpoints the metric asked for (:class:`History`); ``None``:
                none.
            device: the model's device when the caller knows it (else
                :func:`~uma_callbacks.core.devices.model_device`).
            state_held: the caller holds :func:`~uma_callbacks.core.model_state.preserved_model_state`
                around this call (the engine's one guard per metric); ``False``: taken here.
            optimizer_state: the optimizer's state at this checkpoint (``ctx.optimizer_state``);
                ``None``: none.
            results: what earlier metrics of the same save hand this one and what later ones
                ask of it (``ctx.results``, :class:`SaveResults`); ``None``: nothing either way.

        Returns:
            The :class:`MetricResult`; exceptions propagate (``MetricSuite`` isolates them).
            A metric stopped by its time limit that kept what it finished
            (:meth:`ComputeContext.keep_partial`) returns that, ``status="partial"``.

        Raises:
            ValueError: empty probe.
            MetricSkipped: a sharded model, which this metric does not support (the reason
                named).
            FloatingPointError: a parameter holds NaN/Inf (named), or a per-sample loss is
                NaN/Inf (the samples named).
            MetricTimeout: past the time limit with nothing kept (see Returns).
        """  # noqa: DOC502 (FloatingPointError: from check_finite_weights and the resolved loss)
        from uma_callbacks.core.peak_memory import PeakMemory  # local: budget imports metrics for planning

        if not batches:
            raise ValueError(f"{type(self).__name__}.compute: batches is empty; the probe needs samples")
        if not self.supports_sharded:
            from uma_callbacks.core.sharding import is_sharded, sharded_skip_reason

            if is_sharded(model):
                raise MetricSkipped(sharded_skip_reason(self.name))
        check_finite_weights(model)
        resolved_loss = resolve_loss(model, loss_fn, batches)
        chunk = self.chunk_for(batches, chunk_size)
        limit = timeout_seconds if timeout_seconds is not None else self.time_limit()
        meter = (peak_meter or PeakMemory)(device if device is not None else model_device(model))
        started = time.perf_counter()
        guard = contextlib.nullcontext() if state_held else preserved_model_state(model)
        with guard, meter:
            ctx = ComputeContext(
                model=model,
                batches=list(batches),
                loss_fn=resolved_loss,
                chunk_size=int(chunk),
                collective=collective or LocalCollective(),
                deadline=None if limit is None else time.monotonic() + limit,
                history=history or History(),
                optimizer_state=optimizer_state,
                results=results or SaveResults(),
            )
            model.eval()
            try:
                if self.needs_eager_attention:
                    with eager_attention(model, ctx.meta):
                        result = self._compute(ctx)
                else:
                    result = self._compute(ctx)
            except MetricTimeout as stop:  # what the metric finished is kept when it named it
                kept = ctx.kept_partial(stop, limit)
                if kept is None:
                    raise
                result = kept
        result.meta.update(ctx.meta)
        result.meta.setdefault("chunk_size", int(chunk))
        result.meta["seconds"] = time.perf_counter() - started
        result.meta["peak_bytes"] = int(meter.peak_bytes)
        result.meta["n_samples"] = ctx.n_local if collective is None else ctx.n_total()
        result.meta["config"] = self.config()
        return result

    def not_ready(self, history: History) -> str | None:
        """Why the metric cannot run at all with ``history`` (e.g. no previous checkpoint yet), or ``None``.

        The suite asks before it plans memory or measures anything, and records the reason as
        a skip: a metric that would only raise :class:`MetricSkipped` on entry costs nothing.
        """
        return None

    @abc.abstractmethod
    def _compute(self, ctx: ComputeContext) -> MetricResult:
        """Compute on the context; return a result with scalars/arrays/meta filled."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "metric")
        return f"{type(self).__name__}({args})"


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise ``FloatingPointError`` naming the first parameter holding NaN or Inf, or buffer holding NaN.

    One sum per tensor in its own dtype (NaN/Inf propagate; no temporary of the tensor's
    size); only a non-finite sum (NaN/Inf, or an overflow of large finite values) is
    looked at entry by entry. Floating-point buffers (BatchNorm ``running_var``, rotary
    ``inv_freq``) are checked for NaN only: some models keep ``-inf`` masks in buffers.

    Raises:
        FloatingPointError: a parameter holds NaN or Inf, or a buffer holds NaN (named).
    """
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach().sum())):
            bad = int((~torch.isfinite(p.detach())).sum())
            if bad == 0:  # the sum overflowed; every entry is finite
                continue
            raise FloatingPointError(
                f"parameter {name!r} holds {bad} NaN/Inf value(s) of {p.numel()}; the metrics need finite weights"
            )
    for name, b in model.named_buffers():
        if b is None or not b.is_floating_point() or not bool(torch.isnan(b.detach().sum())):
            continue
        bad = int(torch.isnan(b.detach()).sum())
        if bad:
            raise FloatingPointError(
                f"buffer {name!r} holds {bad} NaN value(s) of {b.numel()}; the metrics need finite model state"
            )


def _config_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_config_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _config_value(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)


def check_positive_int(field_name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (bools are refused).

    Raises:
        ValueError: anything else, naming ``field_name``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field_name} must be a positive integer; got {value!r}")


def check_choice(field_name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the field and the allowed values unless ``value`` is one.

    Raises:
        ValueError: ``value`` is not in ``allowed``.
    """
    if value not in allowed:
        raise ValueError(f"{field_name} must be one of {tuple(allowed)!r}; got {value!r}")


def module_of(param_name: str) -> str:
    """The owning module's name: ``"model.layers.0.mlp.up_proj.weight"`` -> ``"model.layers.0.mlp.up_proj"``."""
    return param_name.rpartition(".")[0] or param_name

