r"""Fisher sufficient statistics and matrix-free Fisher-vector products over a chunked probe.

N rows (samples, or samples x MC label draws) with per-sample gradients g_i [P]. One pass
over the chunks accumulates, per parameter p,

    diag_sum_p = sum_i g_{i,p}^2,   grad_sum_p = sum_i g_{i,p} (optional),

and keeps the per-row squared norms ||g_{i,p}||^2 (N x n_params floats, float64). The
Fisher-vector product F v = (1/N) sum_i g_i (g_i^T v) is two contractions per chunk,
u = G_c v [B] and G_c^T u [P], on any of the chunk representations of
:mod:`uma_callbacks.linalg.chunk_grads`:

- :class:`~uma_callbacks.linalg.chunk_grads.StackedGrads`: ``vmap(grad)`` per-sample gradients ``{name: [B, *shape]}``
  (any model, any ``loss_fn``);
- :class:`~uma_callbacks.linalg.linear_factors.LinearFactors`: per-layer activations and
  output gradients, when every trainable parameter is an ``nn.Linear`` weight/bias
  (no [B, P] stack is ever built for 2-D inputs);
- :class:`~uma_callbacks.linalg.layer_grads.LayerGradients`: per-layer factors from one
  ordinary backward with hooks (Linear, Conv1D, Embedding, LayerNorm, RMSNorm; ``vmap``
  for the rest), reduced a layer at a time (the default, ``method="hooks"``).

The Gram matrix K = G G^T [N, N] (K_ij = g_i^T g_j) is formed in the same pass when asked
(every chunk's diagonal block; the blocks between chunks from the cached representations,
those the cache did not keep by recomputing chunks a block at a time, see ``_GramBlocks``):
the non-zero eigenvalues of F = G^T G / N are those of K / N, all N of them exactly.

The representations of all chunks are cached when they fit ``cache_bytes``; otherwise
each product recomputes them chunk by chunk (one forward+backward per chunk and
product; reverse mode only, since forward-mode AD has no rule for ``silu_backward``).

The per-chunk sums are accumulated in float64 (Kahan-compensated float32 on a device
without float64), so their error does not grow with the number of chunks.

The MC Fisher's labels are drawn in :mod:`uma_callbacks.linalg.mc_labels`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uma_callbacks.core.buckets import ScatterQueue, bucket_cap, buckets, full_from_pieces
from uma_callbacks.core.losses import LossFn
from uma_callbacks.core.sharding import local, unwrap
from uma_callbacks.linalg.chunk_grads import ChunkGradients, StackedGrads, chunk_gradients
from uma_callbacks.linalg.layer_grads import HookPlan, LayerGradients, layer_gradient_sums, layer_gradients
from uma_callbacks.linalg.mc_labels import group_draws, sample_mc_labels

__all__ = [
    "METHODS",
    "ChunkGradients",
    "FisherSums",
    "StackedGrads",
    "accumulate_fisher",
    "chunk_gradients",
    "fisher_matvec",
    "group_draws",
    "parameter_groups",
    "sample_mc_labels",
]

#: Ways to get per-sample gradients: ``auto`` is ``hooks`` (per-layer rules, vmap for the rest).
METHODS = ("auto", "vmap", "linear", "hooks")


class _RunningSum:
    """Running sum of same-shaped tensors whose error does not grow with their number.

    Held in float64 where the device has it (one in-place add per term; the same 8 bytes
    per entry as a float32 sum with its Kahan compensation, and more accurate), and read
    back in the requested dtype. On a device without float64 (MPS) a float32 total is
    Kahan-compensated (Kahan 1965).
    """

    def __init__(self, like: torch.Tensor, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._wide = dtype != torch.float64 and like.device.type != "mps"
        self._sum: torch.Tensor | None = None
        self._comp: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """The sum so far, in the requested dtype.

        Raises:
            ValueError: nothing has been added yet.
        """
        if self._sum is None:
            raise ValueError("_RunningSum.total: nothing added yet")
        return self._sum.to(self.dtype) if self._wide else self._sum

    def add(self, x: torch.Tensor) -> None:
        if self._sum is None:
            self._sum = x.to(torch.float64 if self._wide else self.dtype, copy=True)
            return
        if self._wide or self.dtype == torch.float64:
            self._sum.add_(x)
            return
        y = x.to(self.dtype) - (self._comp if self._comp is not None else 0)
        t = self._sum + y
        self._comp = (t - self._sum) - y
        self._sum = t


@dataclass
class FisherSums:
    """Local (this rank's) sufficient statistics; see the module docstring.

    Attributes:
        names: parameter names, model order.
        diag_sum: ``{name: sum_i g_{i,p}^2}`` in the accumulation dtype.
        grad_sum: ``{name: sum_i g_{i,p}}`` or ``None``.
        sq_norms: ``[N_local, n_params]`` float64, ||g_{i,p}||^2 per row.
        loss_sum: sum of the rows' losses (float64).
        rows: N_local (samples x draws).
        cache: every chunk's :class:`ChunkGradients` when they fitted, else ``None``.
        chunks: the (label-sampled) chunks, to recompute products when not cached.
        param_map: the linear factors' map when they were used, else ``None`` (vmap).
        fallback: why the linear factors were given up for vmap ("" when they were not).
        groups: the parameter groups of the grouped mode, else ``None``.
        plan: the hooks plan when the hooks were used, else ``None``.
        vmapped: names whose per-sample gradients came from vmap within the hooks path.
        gram: ``[N_local, N_local]`` float64 G G^T when asked and computable (one chunk, or
            several with a cache: the blocks between chunks the cache did not keep are formed
            by recomputing chunks, ``gram_recomputed`` of them), else ``None``.
        gram_recomputed: chunks recomputed for the Gram's blocks between chunks.
    """

    names: list[str]
    diag_sum: dict[str, torch.Tensor]
    grad_sum: dict[str, torch.Tensor] | None
    sq_norms: torch.Tensor
    loss_sum: float
    rows: int
    cache: list[ChunkGradients] | None
    chunks: list[Any] = field(default_factory=list)
    param_map: dict[str, tuple[str, str]] | None = None
    fallback: str = ""
    groups: list[list[str]] | None = None
    plan: HookPlan | None = None
    vmapped: list[str] = field(default_factory=list)
    gram: torch.Tensor | None = None
    gram_recomputed: int = 0

    @property
    def method(self) -> str:
        """How the per-sample gradients were computed (``meta["per_sample_method"]``)."""
        if self.plan is not None:
            return "hooks+vmap(grad)" if self.vmapped else "hooks"
        return "linear" if self.param_map is not None else "vmap(grad)"


def parameter_groups(params: Mapping[str, torch.Tensor], n_groups: int) -> list[list[str]]:
    """Split the parameter names (model order) into at most ``n_groups`` consecutive groups.

    The groups are of about equal size; a tensor larger than the share stays whole, in its
    own group.
    """
    names = list(params)
    total = sum(params[n].numel() for n in names)
    share = max(1, -(-total // max(1, n_groups)))
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        numel = params[name].numel()
        if groups[-1] and size + numel > share and len(groups) < n_groups:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += numel
    return groups


def _grouped_chunk(
    model: torch.nn.Module, loss_fn: LossFn, chunk: Any, params: Mapping[str, torch.Tensor], groups: list[list[str]]
) -> Iterable[tuple[list[str], ChunkGradients]]:
    """Per-sample gradients of one chunk, one parameter group at a time (one group alive)."""
    for group in groups:
        yield group, chunk_gradients(model, loss_fn, chunk, {n: params[n] for n in group}, None)


def accumulate_fisher(
    model: torch.nn.Module,
    loss_fn: LossFn,
    chunks: Iterable[Any],
    params: Mapping[str, torch.Tensor],
    *,
    param_map: Mapping[str, tuple[str, str]] | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    want_grad_sum: bool = False,
    cache_bytes: int = 0,
    on_chunk: Callable[[int], None] | None = None,
    auto_fallback: bool = False,
    groups: list[list[str]] | None = None,
    plan: HookPlan | None = None,
    want_diag: bool = True,
    want_gram: bool = False,
    collective: Any = None,
    fill_gram: bool = False,
) -> FisherSums:
    """One pass over ``chunks``: the :class:`FisherSums` of the per-sample gradients.

    Args:
        model: the model (read only).
        loss_fn: per-sample loss ``[B]``.
        chunks: batches of at most the chunk size (already label-sampled for MC).
        params: ``{name: parameter}`` to differentiate.
        param_map: :func:`~uma_callbacks.linalg.linear_factors.linear_param_map` output to
            use linear factors; ``None`` for vmap.
        accumulate_dtype: dtype of ``diag_sum``/``grad_sum`` (at least the parameters').
        want_grad_sum: also accumulate ``grad_sum``.
        cache_bytes: keep every chunk's gradients while their total stays under this.
        on_chunk: called with the number of chunks done (time checks).
        auto_fallback: when the linear factors fail their checks on the first chunk
            (which also verifies them against autograd), use vmap instead of raising.
        groups: per-sample gradients one parameter group at a time (vmap, nothing
            cached): a chunk holds [B, largest group] instead of [B, P]; the sums are the same.
        plan: a :func:`~uma_callbacks.linalg.layer_grads.hook_plan` to use the hooks path.
        want_diag: accumulate ``diag_sum`` (else it is empty: traces only, ghost norms).
        want_gram: also form the Gram matrix G G^T (see the module docstring).
        fill_gram: with several chunks, form the Gram's blocks between chunks that
            ``cache_bytes`` did not keep by recomputing chunks (:class:`_GramBlocks`; a block
            of at most ``cache_bytes``, at least one chunk, held at a time); else there is no
            Gram then (``gram`` is ``None``: the caller takes Lanczos).
        collective: for a sharded (FSDP) model: each chunk's full-size sums are reduced over
            ranks straight into this rank's shard (``sum_scatter_dim0``), chunks may be
            :class:`~uma_callbacks.core.sharding.GhostChunk` s (run, counted nowhere), and every
            rank agrees it is healthy before each forward and backward. ``None``: one model copy.

    Returns:
        :class:`FisherSums`.

    Raises:
        FloatingPointError: a gradient (or its square) is NaN or Inf; names the parameter.
        ValueError: the linear factors do not apply and ``auto_fallback`` is false, or the
            chunks hold no sample.
    """  # noqa: DOC502 (FloatingPointError: from _check_finite)
    names = list(params)
    state = _Whole(param_map, auto_fallback, keep_gradients=cache_bytes > 0 or want_gram)
    diag: dict[str, _RunningSum] = {}
    gsum: dict[str, _RunningSum] = {}

    def consume(name: str, d: torch.Tensor | None, g: torch.Tensor | None) -> None:
        _add_chunk_sums(
            diag, gsum if want_grad_sum else None, {name: g} if g is not None else None,
            {name: d} if d is not None else {}, params, accumulate_dtype,
        )  # fmt: skip

    if groups is not None:
        stats = _grouped_chunks(model, loss_fn, chunks, params, groups, want_grad_sum)
    elif collective is not None:
        stats = _sharded_chunks(model, loss_fn, chunks, params, plan, want_diag, want_grad_sum, collective)
    else:
        stats = _whole_model_chunks(
            model, loss_fn, chunks, params, plan, want_diag, want_grad_sum, want_gram, state, consume
        )
    norms, kept, loss_sum, rows, used = [], [], 0.0, 0, 0
    # the first chunks' gradients, while they fit cache_bytes: all of them are the product
    # cache; the Gram's blocks between each later chunk and them are formed as it comes
    held: list[ChunkGradients] = []
    holding = groups is None
    gram = _GramBlocks() if want_gram else None
    vmapped: set[str] = set()
    index = 0
    # one loop, whatever the strategy; no enumerate(): it keeps its last result tuple, and
    # with it the previous chunk's gradients, alive while the next chunk is computed
    for chunk in stats:
        if chunk.real:
            _check_finite(chunk.sq, names)
        _add_chunk_sums(diag, gsum if want_grad_sum else None, chunk.grad_sums, chunk.sums, params, accumulate_dtype)
        kept.append(chunk.item)
        if chunk.real:
            norms.append(chunk.sq)
            loss_sum += chunk.loss_sum
            rows += chunk.n
        if gram is not None:
            gram = gram.add(index, chunk.n, chunk.gram, chunk.rep, held)
        if holding:
            used += chunk.rep.nbytes() if chunk.rep is not None else 0
            holding = chunk.rep is not None and used <= cache_bytes
            # past the cache, the products recompute every chunk: the first ones stay only for the Gram
            held = held + [chunk.rep] if holding else (held if gram is not None else [])
        vmapped |= chunk.vmapped
        del chunk  # the next chunk's gradients must not meet this one's in memory
        index += 1
        if on_chunk is not None:
            on_chunk(index)
    if rows == 0:
        raise ValueError("accumulate_fisher: no samples in the chunks")
    cache = held if len(held) == len(kept) else None
    if gram is not None and not gram.complete() and fill_gram and groups is None and collective is None:
        del held  # a block at a time from here (the first chunks' blocks with every later one are formed)

        def recompute(i: int) -> ChunkGradients:
            return chunk_gradients(model, loss_fn, unwrap(kept[i])[0], params, state.param_map, plan=plan)

        gram.fill(recompute, cache_bytes, on_chunk=on_chunk, done=index)
    return FisherSums(
        names=names,
        diag_sum={n: diag.pop(n).total for n in names if n in diag},  # each float64 sum freed as it is read
        grad_sum={n: gsum.pop(n).total for n in names if n in gsum} if want_grad_sum else None,
        sq_norms=torch.cat(norms, dim=0),
        loss_sum=loss_sum,
        rows=rows,
        cache=cache,
        chunks=kept,
        param_map=dict(state.param_map) if state.param_map is not None else None,
        fallback=state.fallback,
        plan=plan,
        groups=groups,
        vmapped=[n for n in names if n in vmapped],
        gram=gram.full() if gram is not None else None,
        gram_recomputed=gram.recomputed if gram is not None else 0,
    )


@dataclass
class _ChunkSums:
    """What one chunk adds to the Fisher sums, whichever strategy made it.

    Attributes:
        item: what :attr:`FisherSums.chunks` keeps (to recompute products later).
        real: False for a sharded run's filler chunk (run for FSDP's collectives, counted nowhere).
        n: samples. loss_sum: sum of their losses.
        sums: ``{name: sum_i g_{i,p}^2}`` (this rank's shard under FSDP).
        sq: ``[B, n_params]`` per-sample squared norms (float64).
        grad_sums: ``{name: sum_i g_{i,p}}`` when asked.
        gram: the chunk's ``[B, B]`` block of G G^T when asked and available.
        rep: the chunk's gradients for the product cache (``None``: not cacheable).
        vmapped: parameters whose per-sample gradients came from vmap.
    """

    item: Any
    real: bool
    n: int
    loss_sum: float
    sums: Mapping[str, torch.Tensor]
    sq: torch.Tensor
    grad_sums: Mapping[str, torch.Tensor] | None = None
    gram: torch.Tensor | None = None
    rep: Any = None
    vmapped: set[str] = field(default_factory=set)


@dataclass
class _Whole:
    """The whole-model strategy's state: linear factors in use, and why they were dropped."""

    param_map: Mapping[str, tuple[str, str]] | None
    auto_fallback: bool
    fallback: str = ""
    #: the chunks' gradients are wanted after their sums (the product cache, the Gram's
    #: cross-chunk blocks); else the hooks path reduces them during the backward
    keep_gradients: bool = True


def _whole_model_chunks(
    model: torch.nn.Module,
    loss_fn: LossFn,
    chunks: Iterable[Any],
    params: Mapping[str, torch.Tensor],
    plan: HookPlan | None,
    want_diag: bool,
    want_grad_sum: bool,
    want_gram: bool,
    state: _Whole,
    consume: Callable[[str, torch.Tensor | None, torch.Tensor | None], None] | None = None,
) -> Iterable[_ChunkSums]:
    """Strategy: per-sample gradients of the whole model a chunk at a time, cacheable for later products.

    The gradients come from hooks, linear factors or vmap. With ``consume``, the hooks path
    hands each parameter's sums to it as they are formed (the chunk never holds P of them).

    Raises:
        ValueError: the linear factors do not apply and ``state.auto_fallback`` is false
            (re-raised from ``chunk_gradients``).
    """
    stream = plan is not None and not state.keep_gradients
    for index, chunk in enumerate(chunks):
        if stream:  # reduced during the backward: nothing kept for products
            got = layer_gradient_sums(
                model, loss_fn, chunk, params, plan, want_diag=want_diag, want_sum=want_grad_sum, consume=consume
            )
            out = _ChunkSums(chunk, True, got.n, float(got.losses.double().sum()), got.diag, got.sq_norms,
                             None, None, None, set(got.vmapped))  # fmt: skip
            del got
            yield out
            del out
            continue
        try:
            rep = chunk_gradients(model, loss_fn, chunk, params, state.param_map, verify=index == 0, plan=plan)
        except ValueError as err:
            if not (state.auto_fallback and index == 0 and state.param_map is not None):
                raise
            state.param_map, state.fallback = None, str(err)
            rep = chunk_gradients(model, loss_fn, chunk, params, None)
        if isinstance(rep, LayerGradients):
            sums, sq, chunk_gsum, gram = rep.reduce(want_diag, want_grad_sum, want_gram, consume=consume)
            chunk_gsum = chunk_gsum if consume is None else None
            vmapped = set(rep.vmapped)
        else:
            sums, sq = rep.square_stats()
            sums = sums if want_diag else {}
            chunk_gsum = rep.grad_sums() if want_grad_sum else None
            gram = rep.gram() if want_gram and hasattr(rep, "gram") else None
            vmapped = set()
        out = _ChunkSums(chunk, True, rep.n, float(rep.losses.double().sum()), sums, sq, chunk_gsum, gram, rep, vmapped)
        del rep, sums, sq, chunk_gsum, gram
        yield out
        del out  # the previous chunk's gradients must be gone before the next forward


def _sharded_chunks(
    model: torch.nn.Module,
    loss_fn: LossFn,
    chunks: Iterable[Any],
    params: Mapping[str, torch.Tensor],
    plan: HookPlan | None,
    want_diag: bool,
    want_grad_sum: bool,
    collective: Any,
) -> Iterable[_ChunkSums]:
    """Strategy for a sharded (FSDP2) model: each chunk's full-size sums reduced into this rank's shard.

    The sums are reduced over ranks straight into the shard; filler chunks run for FSDP's
    collectives, counted nowhere; every rank agrees it is healthy before each forward and
    backward.
    """
    for item in chunks:
        chunk, real = unwrap(item)
        collective.agree()  # every rank healthy before FSDP's forward all-gathers
        rep = layer_gradients(model, loss_fn, chunk, params, plan, before_backward=collective.agree)
        sums, sq, chunk_gsum = _scattered_stats(rep, params, want_diag, want_grad_sum, real, collective)
        out = _ChunkSums(
            item,
            real,
            rep.n,
            float(rep.losses.double().sum()) if real else 0.0,
            sums,
            sq,
            chunk_gsum,
            None,
            rep if real else _Ghost(rep),
            set(rep.vmapped),
        )
        del rep, sums, sq, chunk_gsum
        yield out
        del out  # the previous chunk's gradients must be gone before the next forward


def _scattered_stats(
    rep: LayerGradients,
    params: Mapping[str, torch.Tensor],
    want_diag: bool,
    want_grad_sum: bool,
    real: bool,
    collective: Any,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """``rep.reduce`` one parameter at a time, the full-size sums reduce-scattered into this rank's shard.

    The sums travel in buckets (:class:`~uma_callbacks.core.buckets.ScatterQueue`): a rank
    holds at most the largest parameter's full-size sums [d0, ...] (or 1 MiB) queued at a
    time, not the whole model's, P entries, which would not shrink with the ranks.

    Returns:
        ``({name: shard of sum_i g_i^2}`` (empty unless ``want_diag``), ``sq_norms [B, n_params]``
        float64, ``{name: shard of sum_i g_i}`` (empty unless ``want_grad_sum``)).
    """
    diag: dict[str, torch.Tensor] = {}
    gsum: dict[str, torch.Tensor] = {}
    norms = []

    def deliver(key: Hashable, piece: torch.Tensor) -> None:
        kind, name = key  # type: ignore[misc]
        (diag if kind == "diag" else gsum)[name] = piece

    queue = ScatterQueue(collective, bucket_cap(params[n] for n in rep.names), deliver)
    for name in rep.names:
        d, sq, s, _ = rep.factors[name].stats(want_diag, want_grad_sum, False)
        if want_diag:
            queue.put(("diag", name), d if real else torch.zeros_like(d))
        if want_grad_sum:
            queue.put(("gsum", name), s if real else torch.zeros_like(s))
        norms.append(sq.to(rep.losses.device))
        del d, s
    queue.flush()
    return diag, torch.stack(norms, dim=1), gsum


def _grouped_chunks(
    model: torch.nn.Module,
    loss_fn: LossFn,
    chunks: Iterable[Any],
    params: Mapping[str, torch.Tensor],
    groups: list[list[str]],
    want_grad_sum: bool,
) -> Iterable[_ChunkSums]:
    """Strategy: per-sample gradients one parameter group at a time (vmap, nothing cached).

    A chunk holds [B, largest group] instead of [B, P]; the sums are the same.
    """
    names = list(params)
    column = {n: i for i, n in enumerate(names)}
    for chunk in chunks:
        sums: dict[str, torch.Tensor] = {}
        grad_sums: dict[str, torch.Tensor] | None = {} if want_grad_sum else None
        sq_all: torch.Tensor | None = None
        n, loss_sum = 0, 0.0
        first = True  # no enumerate(): its kept result tuple would hold the last group's gradients
        for group, rep in _grouped_chunk(model, loss_fn, chunk, params, groups):
            group_sums, sq = rep.square_stats()
            _check_finite(sq, group)
            if sq_all is None:
                sq_all = torch.zeros(rep.n, len(names), dtype=torch.float64, device=sq.device)
            sq_all[:, [column[name] for name in group]] = sq
            sums.update(group_sums)
            if grad_sums is not None:
                grad_sums.update(rep.grad_sums())
            if first:
                n, loss_sum, first = rep.n, float(rep.losses.double().sum()), False
            del rep, group_sums, sq
        assert sq_all is not None
        yield _ChunkSums(chunk, True, n, loss_sum, sums, sq_all, grad_sums)


class _Ghost:
    """A ghost chunk's gradients in a product: run for FSDP's collectives, contributing zero."""

    def __init__(self, rep: ChunkGradients) -> None:
        self.rep = rep
        self.n = rep.n

    def nbytes(self) -> int:
        return self.rep.nbytes()

    def dot(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.rep.dot(v) * 0

    def weighted_sum(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.rep.weighted_sum(u * 0)


class _GramBlocks:
    """G G^T [R, R] assembled from blocks: each chunk's own ``[B, B]``, and ``G_i G_j^T`` between chunks.

    The blocks between a chunk and the first chunks that were kept (``held``) are formed as
    the chunk comes; :meth:`fill` forms the rest by recomputing chunks, a block of them held
    at a time (at most ``cache_bytes``, at least one chunk) while each later one is
    recomputed and dropped: with C chunks of which the first m were held, the chunks from
    m on are recomputed about (C - m)^2 / (2 m') times in all (m' chunks a block), instead
    of a Lanczos spectrum whose basis holds ``max_iter`` vectors of P entries and whose
    every product recomputes all C chunks (on GPT-2 124M at chunk 4 that was 22.3 GB and
    806 s where one chunk of 8 took 3.1 GB and 37 s).
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.blocks: dict[tuple[int, int], torch.Tensor] = {}
        #: chunks recomputed by :meth:`fill`
        self.recomputed = 0

    def add(self, index: int, n: int, own: torch.Tensor | None, rep: Any, held: Sequence[Any]) -> _GramBlocks | None:
        """Chunk ``index`` of ``n`` rows: its own block and its blocks with the ``held`` chunks; ``None``: no Gram."""
        if own is None:
            return None  # a path that forms no Gram block (linear factors): no Gram
        self.sizes.append(n)
        self.blocks[(index, index)] = own
        if rep is not None and hasattr(rep, "cross_gram"):
            self._cross(held, 0, rep, index)
        return self

    def complete(self) -> bool:
        """Whether every block i <= j is formed."""
        count = len(self.sizes)
        return len(self.blocks) == count * (count + 1) // 2

    def fill(
        self,
        recompute: Callable[[int], Any],
        cache_bytes: int,
        on_chunk: Callable[[int], None] | None = None,
        done: int = 0,
    ) -> None:
        """Form the missing blocks by recomputing chunks: a block held, the later chunks streamed past it.

        Args:
            recompute: ``i -> chunk i's gradients`` (the same rows as the first pass).
            cache_bytes: the most bytes of a held block (at least one chunk is held).
            on_chunk: called with the running count of chunks computed (time checks).
            done: chunks computed so far.
        """
        count = len(self.sizes)
        first = done

        def missing_from(i: int) -> int:  # the first chunk from i on with a block still missing
            return next((k for k in range(i, count) if any((k, j) not in self.blocks for j in range(k, count))), count)

        start = missing_from(0)
        while start < count:
            block: list[Any] = []
            used, j = 0, start
            while j < count:
                rep = recompute(j)
                done += 1
                if on_chunk is not None:
                    on_chunk(done)
                self._cross(block, start, rep, j)
                used += rep.nbytes()
                if block and used > cache_bytes:
                    break  # rep is the first chunk streamed past this block
                block.append(rep)
                del rep
                j += 1
            else:
                self.recomputed = done - first
                return  # the block reached the last chunk: every block of these is formed
            held_until = start + len(block)
            del rep  # the chunk that did not fit: its blocks with this block are formed
            for j in range(held_until + 1, count):
                rep = recompute(j)
                done += 1
                if on_chunk is not None:
                    on_chunk(done)
                self._cross(block, start, rep, j)
                del rep
            del block
            start = missing_from(held_until)
        self.recomputed = done - first

    def _cross(self, block: Sequence[Any], start: int, rep: Any, j: int) -> None:
        """The blocks between the held chunks ``start, start + 1, ...`` and chunk ``j``.

        A function, so that no loop variable outlives it holding a chunk while the next is recomputed.
        """
        for offset, other in enumerate(block):
            if (start + offset, j) not in self.blocks:
                self.blocks[(start + offset, j)] = other.cross_gram(rep)

    def full(self) -> torch.Tensor | None:
        """The assembled ``[R, R]`` (float64), or ``None`` while a block is missing."""
        if not self.complete():
            return None
        count = len(self.sizes)
        if count == 1:
            return self.blocks[(0, 0)]
        rows = [
            torch.cat([self.blocks[(i, j)] if i <= j else self.blocks[(j, i)].T for j in range(count)], dim=1)
            for i in range(count)
        ]
        return torch.cat(rows, dim=0)


def _add_chunk_sums(
    diag: dict[str, _RunningSum],
    gsum: dict[str, _RunningSum] | None,
    chunk_gsum: Mapping[str, torch.Tensor] | None,
    sums: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    accumulate_dtype: torch.dtype,
) -> None:
    """Add one chunk's sum_i g_{i,p}^2 (and sum_i g_{i,p} when ``gsum`` is kept) to the accumulators.

    The compensated accumulators are created (in at least the parameter's dtype) on first use.
    """
    for name, value in sums.items():
        if name not in diag:
            diag[name] = _RunningSum(value, torch.promote_types(accumulate_dtype, params[name].dtype))
        diag[name].add(value)
    if gsum is not None and chunk_gsum is not None:
        for name, g in chunk_gsum.items():
            if name not in gsum:
                gsum[name] = _RunningSum(g, torch.promote_types(accumulate_dtype, params[name].dtype))
            gsum[name].add(g)


def _check_finite(sq_norms: torch.Tensor, names: Sequence[str]) -> None:
    bad = ~torch.isfinite(sq_norms)
    if bool(bad.any()):
        col = int(bad.any(dim=0).nonzero()[0])
        raise FloatingPointError(
            f"non-finite per-sample gradient (NaN or Inf, or a square overflowing) in parameter {names[col]!r}"
        )


def fisher_matvec(
    sums: FisherSums,
    model: torch.nn.Module,
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    n_total: int,
    all_reduce: Callable[[list[torch.Tensor]], None],
    collective: Any = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The product ``v [P] -> F v [P]``, F = (1/N) sum_i g_i g_i^T, summed over ranks.

    Each call sums this rank's sum_i g_i (g_i^T v) over its chunks (cached, or recomputed
    one chunk at a time), all-reduces it with ``all_reduce`` and divides by the global
    row count ``n_total``. Vectors are flat in model order (``[P]``, any float dtype).

    With ``collective`` (a sharded FSDP2 model, see :func:`_sharded_matvec`) the vectors
    are this rank's pieces instead (``[P_local]``: the local shards of the parameters,
    flattened and concatenated in model order) and ``all_reduce`` is not used.
    """
    if collective is not None:
        return _sharded_matvec(sums, model, loss_fn, params, n_total, collective)
    shapes = [params[n].shape for n in sums.names]
    sizes = [s.numel() for s in shapes]

    def reps() -> Iterable[ChunkGradients]:
        if sums.cache is not None:
            yield from sums.cache
            return
        for item in sums.chunks:
            chunk, real = unwrap(item)
            rep = chunk_gradients(model, loss_fn, chunk, params, sums.param_map, plan=sums.plan)
            yield rep if real else _Ghost(rep)

    work = {n: params[n].dtype for n in sums.names}

    def grouped_contributions(parts: Mapping[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
        # two passes per chunk and group: u_i = sum_groups g_{i,G}^T v_G, then sum_i u_i g_{i,G}
        assert sums.groups is not None
        for chunk in sums.chunks:
            u = sum(rep.dot(parts) for _, rep in _grouped_chunk(model, loss_fn, chunk, params, sums.groups))
            for _, rep in _grouped_chunk(model, loss_fn, chunk, params, sums.groups):
                yield rep.weighted_sum(u)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        pieces = zip(sums.names, torch.split(v, sizes), shapes)
        parts = {n: p.view(s).to(work[n]) for n, p, s in pieces}  # one cast per product
        acc: dict[str, torch.Tensor] = {}
        if sums.groups is not None:
            for contrib in grouped_contributions(parts):
                for n, c in contrib.items():
                    acc[n] = c if n not in acc else acc[n].add_(c)
            out = torch.cat([acc[n].reshape(-1).to(v.dtype) for n in sums.names])
            all_reduce([out])
            return out / n_total
        for rep in reps():
            contrib = rep.weighted_sum(rep.dot(parts))
            for n in sums.names:
                acc[n] = contrib[n] if n not in acc else acc[n].add_(contrib[n])
        out = torch.cat([acc[n].reshape(-1).to(v.dtype) for n in sums.names])
        all_reduce([out])
        return out / n_total

    return matvec


def _sharded_matvec(
    sums: FisherSums,
    model: torch.nn.Module,
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    n_total: int,
    collective: Any,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""``v_r [P_r] -> (F v)_r [P_r]`` on a sharded (FSDP2) model: pieces in, pieces out.

    Rank r holds the pieces v_r of v (its rows of each parameter) and the per-sample
    gradients g_i of its own samples S_r, full-size, one chunk's factors per layer (cached
    or recomputed). The probe is split over ranks, so u_i = g_i^T v needs the whole v for
    i in S_r; per parameter p::

        v_p   = all-gather of the pieces v_{p,q}          (full [d0, ...], transient)
        u_i  += g_{i,p}^T v_p                            (i in S_r, [B] per chunk)
        (F v)_{p,r} = rows_r( sum_q sum_{i in S_q} u_i g_{i,p} ) / N   (reduce-scatter)

    The parameters travel in buckets (:mod:`uma_callbacks.core.buckets`): a rank holds at
    most the largest parameter's full-size v_p or sums (or 1 MiB) at a time, never a full
    vector of P entries, and the result is this rank's piece. Cached chunks: one gather and
    one reduce-scatter per bucket and product; recomputed chunks (every rank runs the same
    number, ghosts contributing zero): one of each per bucket and chunk.
    """
    names = list(sums.names)
    sizes = [local(params[n]).numel() for n in names]
    cap = bucket_cap(params[n] for n in names)
    gathered = buckets(params, names, cap)

    def product(reps: list[Any], pieces: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        # reps: real LayerGradients or _Ghost (zero contributions, collectives still taken)
        real = [r for r in reps if not isinstance(r, _Ghost)]
        us = [torch.zeros(r.n, dtype=r.losses.dtype, device=r.losses.device) for r in real]
        for bucket in gathered:
            fulls = full_from_pieces([pieces[n] for n in bucket], [params[n] for n in bucket], collective)
            for n, full in zip(bucket, fulls):
                full = full.to(params[n].dtype)
                for r, u in zip(real, us):
                    u += r.factors[n].dot(full).to(u.dtype)
            del fulls, full

        def add(n: Hashable, piece: torch.Tensor) -> None:
            assert isinstance(n, str)
            piece = piece.reshape(-1)
            out[n] = piece if n not in out else out[n].add_(piece)

        queue = ScatterQueue(collective, cap, add)
        for n in names:
            total = None
            for r, u in zip(real, us):
                c = r.factors[n].weighted_sum(u)
                total = c if total is None else total.add_(c)
            if total is None:
                total = torch.zeros(params[n].shape, dtype=params[n].dtype, device=pieces[n].device)
            queue.put(n, total)
            del total
        queue.flush()

    def matvec(v: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, torch.split(v, sizes)))
        out: dict[str, torch.Tensor] = {}
        if sums.cache is not None:
            product(list(sums.cache), pieces, out)
        else:
            for item in sums.chunks:
                chunk, real = unwrap(item)
                collective.agree()  # every rank healthy before FSDP's forward all-gathers
                rep = layer_gradients(model, loss_fn, chunk, params, sums.plan, before_backward=collective.agree)
                product([rep if real else _Ghost(rep)], pieces, out)
                del rep
        if not out:
            return torch.zeros_like(v)
        return torch.cat([out[n].reshape(-1).to(v.dtype) for n in names]) / n_total

    return matvec
