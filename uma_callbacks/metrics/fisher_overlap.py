r"""Fisher overlap between named probes (tasks): importance-mask Jaccard, diagonal cosine, conflict.

Whole-model values per pair of tasks, and the same per module (task separability and
interference where they happen).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.core.batches import count_samples, fingerprint_batches, select_samples
from uma_callbacks.core.distributed import shard
from uma_callbacks.core.losses import LossFn
from uma_callbacks.core.numerics import squared_norm64
from uma_callbacks.linalg.fisher_products import METHODS
from uma_callbacks.metrics.base import (
    ComputeContext,
    Cost,
    Metric,
    MetricResult,
    check_choice,
    module_of,
)
from uma_callbacks.metrics.fisher import (
    ACCUMULATE_DTYPES,
    KINDS,
    check_percent,
    gather_fisher,
    top_percent_mask,
)
from uma_callbacks.metrics.loss_choice import ResolvedLoss


def mask_jaccard(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """|A & B| / |A | B| of two ``{name: bool mask}`` sets (nan when both are empty).

    Example:
        >>> mask_jaccard({"w": torch.tensor([True, True, False])}, {"w": torch.tensor([True, False, True])})
        0.3333333333333333
    """
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else math.nan


def diagonal_cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """cos(F_a, F_b) = <F_a, F_b> / (||F_a|| ||F_b||) of two Fisher diagonals (in [0, 1])."""
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    na = math.sqrt(sum(float(squared_norm64(a[n])) for n in a))
    nb = math.sqrt(sum(float(squared_norm64(b[n])) for n in b))
    return dot / (na * nb) if na > 0 and nb > 0 else math.nan


def fisher_weighted_conflict(
    fisher_a: Mapping[str, torch.Tensor],
    fisher_b: Mapping[str, torch.Tensor],
    grad_a: Mapping[str, torch.Tensor],
    grad_b: Mapping[str, torch.Tensor],
) -> float:
    r"""Minus the cosine of two mean gradients in the metric of the tasks' shared Fisher.

    With w_j = sqrt(F_{a,j} F_{b,j}) (the geometric mean of the two Fisher diagonals, so a
    coordinate counts only where both tasks care about it) and the mean gradients
    G_a = (1/N_a) sum_i g_i over task a (likewise G_b),

        conflict = - sum_j w_j G_{a,j} G_{b,j} / sqrt(sum_j w_j G_{a,j}^2 * sum_j w_j G_{b,j}^2).

    In [-1, 1]: +1 when the tasks pull the parameters both rely on in opposite
    directions, -1 when in the same direction, 0 when orthogonal; nan when a weighted
    norm is zero.

    Example:
        >>> f = {"w": torch.tensor([1.0, 1.0])}
        >>> fisher_weighted_conflict(f, f, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.0])})
        1.0
    """
    dot = na = nb = 0.0
    for n in fisher_a:
        w = (fisher_a[n].double() * fisher_b[n].double()).clamp(min=0).sqrt()
        ga, gb = grad_a[n].double(), grad_b[n].double()
        dot += float((w * ga * gb).sum())
        na += float((w * ga.square()).sum())
        nb += float((w * gb.square()).sum())
    return -dot / math.sqrt(na * nb) if na > 0 and nb > 0 else math.nan


class FisherOverlap(Metric):
    r"""How much two or more tasks share their important parameters, and whether they conflict.

    Each task t is its own probe (list of batches, given at construction): its Fisher
    diagonal F_t = (1/N_t) sum_i g_i^2 (``kind`` as in
    :class:`~uma_callbacks.metrics.fisher.FisherInformation`) and mean gradient
    G_t = (1/N_t) sum_i g_i. For every pair (a, b), in the order given:

    - ``pairs/<a>/<b>/jaccard``: Jaccard overlap of the top-``top_percent``% masks
      (:func:`~uma_callbacks.metrics.fisher.top_percent_mask`);
    - ``pairs/<a>/<b>/cosine``: :func:`diagonal_cosine` of F_a and F_b;
    - ``pairs/<a>/<b>/conflict``: :func:`fisher_weighted_conflict`;

    the same three restricted to the entries of each module m (its own parameters; the
    masks stay the global ones): ``layers/<m>/pairs/<a>/<b>/jaccard`` (nan where neither
    mask has an entry in m), ``layers/<m>/pairs/<a>/<b>/cosine`` and
    ``layers/<m>/pairs/<a>/<b>/conflict``; and per task ``tasks/<t>/trace`` = sum_j F_{t,j}
    and ``tasks/<t>/loss``. With ``tasks`` given, the suite's probe (the ``batches``
    argument of :meth:`compute`) is not used and each rank takes every world_size-th batch
    of each task, so a sharded run equals one process. With ``tasks=None`` (the string
    form ``"fisher_overlap"``), the tasks are the two halves of the probe, ``even`` and
    ``odd`` (the even- and odd-indexed samples of each probe batch): a split-half baseline,
    the overlap that sampling noise alone leaves within one task. With kind ``"mc"`` the
    mean gradients G_t still use the tasks' own labels (MC scores average to zero).

    Args:
        tasks: ``{task name: batches}``, at least two tasks of at least two samples; or None
            for the probe's two halves.
        top_percent: p in (0, 100] for the masks.
        kind: ``"empirical"`` or ``"mc"``.
        mc_samples: label draws per sample for ``"mc"``.
        seed: MC seed.
        method: per-sample gradients, as in ``FisherInformation``.
        accumulate_dtype: ``"float32"`` or ``"float64"``.
        chunk_size: samples per chunk.
        timeout_seconds: stop between chunks past this time.

    Raises:
        ValueError: fewer than two tasks, an empty task, a task name with ``/``, or a bad field;
            at measure time, a task (or probe half) of fewer than two samples.
    """

    name = "fisher_overlap"
    needs_eager_attention = True
    cost = Cost(per_sample_grads=True, param_copies=4.0)

    def __init__(
        self,
        tasks: Mapping[str, Sequence[Any]] | None = None,
        top_percent: float = 5.0,
        *,
        kind: str = "empirical",
        mc_samples: int = 1,
        seed: int = seeds.DEFAULT_SEED,
        method: str = "auto",
        accumulate_dtype: str = "float32",
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        if tasks is not None and (not isinstance(tasks, Mapping) or len(tasks) < 2):
            raise ValueError(f"FisherOverlap.tasks must map at least two task names to batches; got {tasks!r:.80}")
        for task, batches in (tasks or {}).items():
            if not isinstance(task, str) or not task or "/" in task:
                raise ValueError(f"FisherOverlap.tasks names must be non-empty strings without '/'; got {task!r}")
            if not batches:
                raise ValueError(f"FisherOverlap.tasks[{task!r}] has no batches")
        check_percent("FisherOverlap.top_percent", top_percent)
        check_choice("FisherOverlap.kind", kind, KINDS)
        validate.check_int("FisherOverlap.mc_samples", mc_samples, 1, validate.MAX_DRAWS)
        validate.check_seed("FisherOverlap.seed", seed)
        check_choice("FisherOverlap.method", method, METHODS)
        check_choice("FisherOverlap.accumulate_dtype", accumulate_dtype, ACCUMULATE_DTYPES)
        self._tasks = {k: list(v) for k, v in tasks.items()} if tasks is not None else None
        self.task_fingerprints = {k: fingerprint_batches(v) for k, v in (self._tasks or {}).items()}
        self.top_percent = float(top_percent)
        self.kind = kind
        self.mc_samples = mc_samples
        self.seed = seed
        self.method = method
        self.accumulate_dtype = accumulate_dtype

    def compute(
        self,
        model: torch.nn.Module,
        batches: Sequence[Any] | None = None,
        loss_fn: LossFn | ResolvedLoss | None = None,
        **kwargs: Any,
    ) -> MetricResult:
        """:meth:`Metric.compute`, the same signature.

        With ``tasks`` given, ``batches`` (the suite's probe) is not used and may be ``None``.
        """
        if not batches and self._tasks is not None:
            batches = next(iter(self._tasks.values()))
        # None is refused there as an empty probe is, with the same ValueError
        return super().compute(model, batches or [], loss_fn, **kwargs)

    def _local_tasks(self, ctx: ComputeContext) -> dict[str, list[Any]]:
        """This rank's batches of each task (given tasks sharded; else the probe's halves)."""
        if self._tasks is not None:
            rank, world = ctx.collective.rank, ctx.collective.world_size
            return {task: shard(batches, rank, world) for task, batches in self._tasks.items()}
        return split_halves(ctx.batches)

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        fisher, grads, scalars = {}, {}, {}
        for task, batches in self._local_tasks(ctx).items():
            sub = dataclasses.replace(ctx, batches=batches, meta={})
            stats = gather_fisher(
                sub, self.kind, self.seed, self.mc_samples, self.method, self.accumulate_dtype, 0, True
            )
            fisher[task] = {n: d / stats.rows for n, d in stats.diag_sum.items()}
            if self.kind == "mc":  # MC scores average to 0: the task gradient uses the true labels
                stats_g = gather_fisher(sub, "empirical", self.seed, 1, self.method, self.accumulate_dtype, 0, True)
                assert stats_g.grad_sum is not None  # want_grad_sum=True
                grads[task] = {n: g / stats_g.rows for n, g in stats_g.grad_sum.items()}
            else:
                assert stats.grad_sum is not None  # want_grad_sum=True
                grads[task] = {n: g / stats.rows for n, g in stats.grad_sum.items()}
            scalars[f"tasks/{task}/trace"] = float(stats.sq_norm_sum.sum()) / stats.rows
            scalars[f"tasks/{task}/loss"] = stats.loss
            ctx.meta[f"tasks/{task}/rows"] = stats.rows
        masks = {t: top_percent_mask(f, self.top_percent) for t, f in fisher.items()}
        modules: dict[str, list[str]] = {}
        for name in next(iter(fisher.values())):
            modules.setdefault(module_of(name), []).append(name)
        for a, b in itertools.combinations(fisher, 2):
            scalars.update(_pair_scalars(f"pairs/{a}/{b}", list(fisher[a]), masks, fisher, grads, a, b))
            for module, names in modules.items():
                scalars.update(_pair_scalars(f"layers/{module}/pairs/{a}/{b}", names, masks, fisher, grads, a, b))
        return MetricResult(name=self.name, scalars=scalars)


def _pair_scalars(
    prefix: str,
    names: list[str],
    masks: Mapping[str, Mapping[str, torch.Tensor]],
    fisher: Mapping[str, Mapping[str, torch.Tensor]],
    grads: Mapping[str, Mapping[str, torch.Tensor]],
    a: str,
    b: str,
) -> dict[str, float]:
    """``<prefix>/jaccard``, ``/cosine``, ``/conflict`` of tasks a and b over the parameters ``names``."""

    def only(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: d[n] for n in names}

    return {
        f"{prefix}/jaccard": mask_jaccard(only(masks[a]), only(masks[b])),
        f"{prefix}/cosine": diagonal_cosine(only(fisher[a]), only(fisher[b])),
        f"{prefix}/conflict": fisher_weighted_conflict(only(fisher[a]), only(fisher[b]), only(grads[a]), only(grads[b])),
    }


def split_halves(batches: Sequence[Any]) -> dict[str, list[Any]]:
    """``{"even": [...], "odd": [...]}``: the even- and odd-indexed samples of each batch.

    Positions within a batch, so the split does not depend on how the probe's batches are
    sharded over ranks. A batch of one sample gives nothing to ``odd``.

    Example:
        >>> halves = split_halves([{"x": torch.arange(5)}])
        >>> halves["even"][0]["x"].tolist(), halves["odd"][0]["x"].tolist()
        ([0, 2, 4], [1, 3])
    """
    out: dict[str, list[Any]] = {"even": [], "odd": []}
    for batch in batches:
        n = count_samples(batch)
        for key, start in (("even", 0), ("odd", 1)):
            if n > start:
                out[key].append(select_samples(batch, list(range(start, n, 2))))
    return out
