r"""Lottery tickets: global magnitude pruning, pruned probe losses, early-bird mask convergence.

Weight matrices W = every parameter with ``ndim >= 2`` outside ``nn.Embedding`` modules
(so not norms, biases or embedding tables; a tied output head is the embedding's and is
left out with it), n entries in all. The global magnitude mask at sparsity s prunes the
k = round(s n) entries of smallest |w| over all of W together (Han et al. 2015; Frankle &
Carbin 2019); ties at the threshold are broken by position (model order, then row-major),
so exactly k entries are pruned. Masks are nested: a larger s prunes a superset.

Early-bird tickets (You et al. 2020): d_t = the normalised Hamming distance between the
masks at ``main_sparsity`` of checkpoints t and t-1 (``mask_distance_prev``, the share of
the n entries whose kept/pruned state differs). The early-bird condition holds at t when
the last ``eb_patience`` distances d_{t - p + 1}, ..., d_t (p = ``eb_patience``) are all
below ``eb_threshold``: the masks of checkpoints t - p, ..., t stayed put. It is *found*
at the first t where it holds and did not hold at t - 1; ``early_bird_step`` is then the
global step of checkpoint t - p, the checkpoint from which the mask stopped changing
(the early-bird ticket could have been drawn there), emitted as a scalar at checkpoint t
only. Everything comes from the checkpoint history (``history_needed`` = p + 1 earlier
checkpoints: the p distances ending at t and the one before them), so backfills and
restarted runs find the same step, at the same checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.metrics.base import (
    ComputeContext,
    Cost,
    Metric,
    MetricResult,
)
from uma_callbacks.metrics.landscape import _local_chunks, probe_loss_sum
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts, batches_used, per_batch


# ---------------------------------------------------------------------- pure functions
def prunable_names(model: torch.nn.Module) -> list[str]:
    """Names of the weight matrices: parameters with ``ndim >= 2`` outside ``nn.Embedding`` modules.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
        >>> prunable_names(m)
        ['1.weight']
    """
    embedded = {id(p) for mod in model.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()}
    return [n for n, p in model.named_parameters() if p.ndim >= 2 and id(p) not in embedded]


def magnitude_masks(
    weights: Sequence[torch.Tensor], sparsities: Sequence[float]
) -> list[list[torch.Tensor]]:
    """Global magnitude masks: for each sparsity s, ``keep`` masks of ``weights`` pruning round(s n) entries.

    Args:
        weights: the tensors, in a fixed order (the tie-break order).
        sparsities: each in (0, 1).

    Returns:
        ``masks[j][i]``: bool ``[*weights[i].shape]``, True where entry is kept at sparsity j.

    Example:
        >>> [m.tolist() for m in magnitude_masks([torch.tensor([3.0, -1.0, 2.0, 0.5])], [0.5])[0]]
        [[True, False, True, False]]
    """
    flat = _magnitudes(weights)
    out = []
    for s in sparsities:
        pruned = pruned_flat(flat, s)
        out.append(_split(~pruned, weights))
        del pruned
    return out


def _magnitudes(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """|w| of all ``weights`` concatenated ``[n]`` (float64 for float64 weights, else float32)."""
    return torch.cat([w.detach().reshape(-1).abs().to(_mag_dtype(w)) for w in weights])


def pruned_flat(magnitudes: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool ``[n]``: True at the k = round(sparsity n) smallest entries of ``magnitudes [n]`` (ties by position)."""
    n = magnitudes.numel()
    k = round(sparsity * n)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    if magnitudes.device.type == "cpu":  # introselect: about 10x faster than torch.kthvalue on CPU
        threshold = torch.as_tensor(np.partition(magnitudes.numpy(), k - 1)[k - 1])
    else:
        threshold = torch.kthvalue(magnitudes, k).values
    pruned = magnitudes < threshold
    need = k - int(torch.count_nonzero(pruned))
    ties = magnitudes == threshold
    if int(torch.count_nonzero(ties)) == need:
        pruned |= ties
    else:
        pruned[torch.nonzero(ties).reshape(-1)[:need]] = True
    return pruned


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for w in like:
        out.append(flat[start : start + w.numel()].reshape(w.shape))
        start += w.numel()
    return out


def mask_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Normalised Hamming distance: the share of entries where two lists of bool masks differ.

    Example:
        >>> mask_distance([torch.tensor([True, False, True, True])], [torch.tensor([True, True, True, False])])
        0.5
    """
    differ = sum(int(torch.count_nonzero(x.cpu() != y.cpu())) for x, y in zip(a, b))
    total = sum(x.numel() for x in a)
    return differ / total if total else math.nan


def early_bird_found(distances: Sequence[float], threshold: float, patience: int) -> bool:
    """Whether the early-bird condition first holds at the last of ``distances`` (oldest first).

    It holds at t when the last ``patience`` distances are all below ``threshold``; it is
    *first* found at t when it does not also hold at t-1 (or t-1 has too few distances).

    Example:
        >>> early_bird_found([0.3, 0.05, 0.02], 0.1, 2), early_bird_found([0.05, 0.05, 0.02], 0.1, 2)
        (True, False)
    """
    def holds(ds: Sequence[float]) -> bool:
        return len(ds) >= patience and all(d < threshold for d in ds[-patience:])

    return holds(distances) and not holds(distances[:-1])


def sparsity_key(s: float) -> str:
    """The key form of a sparsity: ``0.5 -> "0.5"``, ``0.875 -> "0.875"``."""
    return f"{s:g}"


# ---------------------------------------------------------------------- the metric
class LotteryTickets(Metric):
    r"""Pruned probe losses at global magnitude sparsities, mask distance, early-bird step.

    With the dense probe loss L_0 = (1/N) sum_i l_i(theta) and L_s the same with the entries
    pruned at sparsity s set to zero (module docstring):

    - ``sparsity/<s>/loss`` = L_s; ``sparsity/<s>/loss_ratio`` = L_s / L_0; ``dense_loss`` = L_0;
    - ``mask_distance_prev`` = d_t at ``main_sparsity`` (from the second checkpoint on);
    - ``early_bird_step``: the step of checkpoint t - ``eb_patience``, only at the checkpoint
      t where the early-bird condition is first found (module docstring);
    - arrays ``sparsities [S]`` (ascending) and ``losses [S]``; with enough history also
      ``mask_distances [<= eb_patience + 1]`` (oldest first).

    The weights are pruned in place from one saved copy of the weight matrices (memory
    mode ``"device"``: on the model's device; ``"host"``: in host memory, for an
    accelerator short of memory; the budget picks), sparsity by sparsity in ascending order (masks are
    nested, so each step only zeroes more entries), and restored bit for bit at the end,
    also on error. Forward passes only, under ``torch.no_grad()``; per-sample sums are
    all-reduced once.

    Args:
        sparsities: each in (0, 1); default (0.5, 0.8, 0.9).
        main_sparsity: the sparsity of the early-bird mask (in (0, 1); default the first
            of ``sparsities``).
        eb_threshold: in (0, 1].
        eb_patience: consecutive checkpoints (>= 1).
        n_batches: use only the first ``n_batches`` local probe batches.
        chunk_size: samples per forward pass.
        timeout_seconds: stop between sparsities past this time.

    Raises:
        ValueError: a sparsity outside (0, 1), an empty or repeated list, a bad field (named);
            at measure time, an earlier checkpoint without one of the weight matrices (named).

    Example:
        >>> lin = torch.nn.Linear(4, 1, bias=False).double()
        >>> _ = torch.nn.init.constant_(lin.weight, 1.0)
        >>> batch = {"x": torch.ones(3, 4, dtype=torch.float64)}
        >>> r = LotteryTickets(sparsities=[0.5]).compute(lin, [batch], lambda m, b: m(b["x"]).sum(-1))
        >>> r.scalars["dense_loss"], r.scalars["sparsity/0.5/loss"]
        (4.0, 2.0)
    """

    name = "pruning"
    needs_grad = False
    history_needed = 3  # eb_patience + 1 for the default patience; the instance value follows eb_patience

    def __init__(
        self,
        sparsities: Sequence[float] = (0.5, 0.8, 0.9),
        *,
        main_sparsity: float | None = None,
        eb_threshold: float = 0.1,
        eb_patience: int = 2,
        n_batches: int | None = None,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        self.add_state("loss_sums", dist_reduce_fx="sum")
        self.add_state("n_samples", dist_reduce_fx="sum")
        if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
            raise ValueError(f"LotteryTickets.sparsities must be a non-empty list of numbers in (0, 1); got {sparsities!r}")
        for s in sparsities:
            _check_fraction("LotteryTickets.sparsities", s)
        if len(set(sparsities)) != len(sparsities):
            raise ValueError(f"LotteryTickets.sparsities must not repeat a value; got {list(sparsities)!r}")
        if main_sparsity is not None:
            _check_fraction("LotteryTickets.main_sparsity", main_sparsity)
        validate.check_number("LotteryTickets.eb_threshold", eb_threshold, 0, 1, lo_open=True)
        validate.check_int("LotteryTickets.eb_patience", eb_patience, 1, 1000)  # that many checkpoints are kept
        validate.check_int("LotteryTickets.n_batches", n_batches, 1, validate.MAX_BATCHES, allow_none=True)
        self.sparsities = sorted(float(s) for s in sparsities)
        self.main_sparsity = float(main_sparsity if main_sparsity is not None else sparsities[0])
        self.eb_threshold = float(eb_threshold)
        self.eb_patience = eb_patience
        self.n_batches = n_batches
        self.history_needed = eb_patience + 1  # type: ignore[misc]  # per instance: the engine reads the attribute
        #: flat main-sparsity keep masks of earlier checkpoints by weights fingerprint
        self._mask_cache: dict[str, torch.Tensor] = {}

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """``[(mode, cost)]`` this metric can run in, fastest first.

        ``"device"`` (the saved copy of the weight matrices on the device, 1 P) first, then
        ``"host"`` (in host memory). Both hold the magnitudes (n float32) and a mask (n bools) at once.
        """
        def masks(n: int, itemsize: float, n_samples: int) -> int:
            return int(n * 4 + n)  # |w| concatenated (float32) and one bool mask

        return [
            ("device", Cost(forward_only=True, param_copies=1.0, extra_bytes=masks)),
            ("host", Cost(forward_only=True, host_param_copies=1.0, extra_bytes=masks)),
        ]

    def time_cost(self, units: UnitCosts) -> float:
        """One forward of the batches used per sparsity, and one of the dense model."""
        return (len(self.sparsities) + 1) * units.forward * batches_used(self, units) * per_batch(units)

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[LotteryTickets, dict[str, list[Any]]]:
        """Fewer probe batches (``n_batches``); the sparsities are kept."""
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        scaling.fewer_batches(seconds, units)
        return scaling.done()

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        names = prunable_names(ctx.model)
        if not names:
            raise ValueError("LotteryTickets: the model has no weight matrices to prune")
        params = dict(ctx.model.named_parameters())
        weights = [params[n] for n in names]
        chunks, n_local = _local_chunks(ctx, self.n_batches)
        levels = self.sparsities
        mode = getattr(self, "_memory_mode", "device")
        sums = torch.zeros(len(levels) + 1, dtype=torch.float64)
        main_mask: torch.Tensor | None = None
        with torch.no_grad():
            sums[0] = probe_loss_sum(ctx, chunks)
            ctx.check_time(sparsities_done=0)
            flat = torch.cat([w.detach().reshape(-1).abs().to(_mag_dtype(w)) for w in weights])
            saved = [w.detach().to("cpu" if mode == "host" else w.device, copy=True) for w in weights]
            try:
                for j, s in enumerate(levels):
                    pruned_all = pruned_flat(flat, s)
                    if s == self.main_sparsity:
                        main_mask = ~pruned_all.cpu()
                    pruned = _split(pruned_all, weights)
                    for w, m in zip(weights, pruned):
                        w.masked_fill_(m, 0)
                    del pruned, pruned_all
                    sums[j + 1] = probe_loss_sum(ctx, chunks)
                    ctx.check_time(sparsities_done=j + 1)
            finally:
                for w, theta in zip(weights, saved):
                    w.copy_(theta)
                del saved
            if main_mask is None:  # main_sparsity is not one of the sparsities
                main_mask = ~pruned_flat(flat, self.main_sparsity).cpu()
            del flat
        totals = self.reduce_states(ctx, loss_sums=sums, n_samples=torch.tensor([float(n_local)], dtype=torch.float64))
        losses = (sums / totals["n_samples"].item()).numpy()
        scalars = {"dense_loss": float(losses[0])}
        for s, loss in zip(levels, losses[1:]):
            scalars[f"sparsity/{sparsity_key(s)}/loss"] = float(loss)
            scalars[f"sparsity/{sparsity_key(s)}/loss_ratio"] = float(loss / losses[0]) if losses[0] else math.nan
        arrays = {"sparsities": np.asarray(levels, np.float64), "losses": np.asarray(losses[1:], np.float64)}
        distances = self._history_distances(ctx, names, main_mask)
        if distances:
            scalars["mask_distance_prev"] = distances[-1]
            arrays["mask_distances"] = np.asarray(distances, np.float64)
            if early_bird_found(distances, self.eb_threshold, self.eb_patience):
                scalars["early_bird_step"] = float(ctx.history.previous[self.eb_patience - 1].step)
                ctx.meta["summary"] = {"early_bird_step": int(scalars["early_bird_step"])}  # a tag, once
        ctx.meta.update(n_weight_entries=sum(w.numel() for w in weights), memory_mode=mode, forward_passes=(len(levels) + 1) * len(chunks))
        return MetricResult(name=self.name, scalars=scalars, arrays=arrays)

    def _history_distances(
        self, ctx: ComputeContext, names: Sequence[str], current: torch.Tensor
    ) -> list[float]:
        """The mask distances d over the history, oldest first, ending with d_t (empty at the first checkpoint).

        ``current``: this checkpoint's flat keep mask ``[n]`` at ``main_sparsity``; the earlier
        checkpoints' masks are kept between calls by weights fingerprint (each is needed
        ``eb_patience + 1`` times), so a run computes one new earlier mask per checkpoint.

        Raises:
            ValueError: an earlier checkpoint lacks one of the weight matrices, or holds one
                with another shape.
        """
        states = list(ctx.history.previous)[: self.eb_patience + 1]
        if not states:
            return []
        masks = [current]
        shapes = {n: p.shape for n, p in ctx.model.named_parameters()}
        for state in states:
            missing = [n for n in names if n not in state.weights]
            if missing:
                raise ValueError(
                    f"LotteryTickets: the checkpoint at step {state.step} has no weight {missing[0]!r} "
                    "(the run's checkpoints must share the model's weight matrices)"
                )
            earlier = [state.weights[n] for n in names]
            bad = [n for n, w in zip(names, earlier) if w.shape != shapes[n]]
            if bad:
                raise ValueError(f"LotteryTickets: weight {bad[0]!r} has another shape at step {state.step}")
            cached = self._mask_cache.get(state.fingerprint) if state.fingerprint else None
            mask = cached if cached is not None else ~pruned_flat(_magnitudes(earlier), self.main_sparsity)
            if state.fingerprint:
                self._mask_cache[state.fingerprint] = mask
            masks.append(mask)
        keep = {s.fingerprint for s in states}
        self._mask_cache = {fp: m for fp, m in self._mask_cache.items() if fp in keep}
        ctx.meta["history_steps"] = [s.step for s in states]
        distances = [mask_distance([masks[i]], [masks[i + 1]]) for i in range(len(masks) - 1)]
        return distances[::-1]


def _mag_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _check_fraction(field: str, value: object) -> None:
    validate.check_number(field, value, 0, 1, lo_open=True, hi_open=True)
