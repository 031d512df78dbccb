r"""Task vectors: drift from a base model, TIES conflicts, and the probe losses of model merges.

tau = theta - theta_base over every parameter (Ilharco et al. 2023, "Editing models with
task arithmetic"). Against another model theta_o of the same architecture and base,
tau_o = theta_o - theta_base, and three merges of the two:

- plain average: (theta + theta_o) / 2;
- TIES (Yadav et al. 2023, "TIES-Merging"): **trim** each task vector to its
  round(density x P) largest magnitudes over all P coordinates (ties at the threshold by
  position; :func:`trim_masks`), **elect** a sign per coordinate, s_j = sign(sum_t tau^_{t,j})
  over the trimmed vectors tau^ (a zero sum takes the majority sign sign(sum_j s_j), as
  in the authors' code), **disjoint mean**: tau_m,j = mean of the tau^_{t,j} whose sign is
  s_j (0 when none), and theta_TIES = theta_base + lambda tau_m;
- Fisher-weighted (Matena & Raffel 2022): theta_F = (F theta + F_o theta_o) / (F + F_o)
  per coordinate, F and F_o the diagonal empirical Fishers of the two models on the probe
  (:func:`~uma_callbacks.metrics.fisher.gather_fisher`), each floored at ``fisher_floor``
  x the mean of all their entries; parameters without a Fisher (``requires_grad=False``)
  take the plain average.

For quadratic losses with diagonal curvature, l_t(theta) = 1/2 sum_j h_{t,j} (theta_j -
m_{t,j})^2 with minimisers theta_t = m_t, F_t = diag(h_t) (up to a common factor) and
theta_F = (h_1 m_1 + h_2 m_2) / (h_1 + h_2) minimises l_1 + l_2: the tests check exactly that.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch

from uma_callbacks.core import validate
from uma_callbacks.core.numerics import squared_norm64
from uma_callbacks.linalg.weights import moved_weights
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, MetricSkipped, module_of
from uma_callbacks.metrics.fisher import gather_fisher
from uma_callbacks.metrics.landscape import _local_chunks, probe_loss_sum
from uma_callbacks.metrics.pruning import _split, pruned_flat
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts, batches_used, per_batch
from uma_callbacks.metrics.weights_source import WeightsSource, load_weights_source, weights_label


# ---------------------------------------------------------------------- pure functions (TIES)
def trim_masks(task_vector: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    """Keep masks of the round(density x P) largest |tau| entries over all tensors (ties by position).

    Exactly P - round((1 - density) P) entries are kept.

    Example:
        >>> [m.tolist() for m in trim_masks([torch.tensor([0.1, -3.0]), torch.tensor([2.0, 0.5])], 0.5)]
        [[False, True], [True, False]]
    """
    flat = torch.cat([t.detach().reshape(-1).abs().to(_wide(t.dtype)) for t in task_vector])
    return _split(~pruned_flat(flat, 1.0 - density), task_vector)


def elected_signs(trimmed: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``s = sign(sum_t tau^_t)`` per coordinate; zeros take the majority sign sign(sum_j s_j) (when that is non-zero).

    Args:
        trimmed: ``trimmed[t][i]``: task t's trimmed vector, tensor i.

    Returns:
        ``signs[i]`` with entries in {-1, 0, 1} (0 only where every task is 0 and no majority exists).
    """
    signs = [torch.sign(cast(torch.Tensor, sum(task[i] for task in trimmed))) for i in range(len(trimmed[0]))]
    majority = torch.sign(cast(torch.Tensor, sum(s.sum(dtype=torch.float64) for s in signs)))
    if majority != 0:
        for s in signs:
            s[s == 0] = majority.to(s.dtype)
    return signs


def disjoint_mean(trimmed: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the entries of ``trimmed[t]`` whose sign is ``sign`` (0 where none is).

    Example:
        >>> disjoint_mean([torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -2.0, 0.0])], torch.tensor([1.0, 1.0, 1.0]))
        tensor([2., 2., 0.])
    """
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for t in trimmed:
        agree = (torch.sign(t) == sign) & (t != 0)
        total += torch.where(agree, t, torch.zeros_like(t))
        count += agree.to(count.dtype)
    return total / count.clamp(min=1)


def ties_merge(
    task_vectors: Sequence[Sequence[torch.Tensor]], density: float, scale: float = 1.0
) -> list[torch.Tensor]:
    """The merged task vector ``lambda tau_m`` of TIES-merging (trim, elect, disjoint mean; see the module docstring).

    Args:
        task_vectors: ``task_vectors[t][i]``: T task vectors as lists of tensors of the same shapes.
        density: share of entries each task keeps, in (0, 1].
        scale: lambda.

    Returns:
        The merged task vector, tensor by tensor (add it to theta_base).

    Example:
        >>> [t.tolist() for t in ties_merge([[torch.tensor([1.0, -2.0, 0.1])], [torch.tensor([3.0, 1.0, -0.1])]], 2 / 3)]
        [[2.0, -2.0, 0.0]]
    """
    trimmed = [[t * m for t, m in zip(tv, trim_masks(tv, density))] for tv in task_vectors]
    signs = elected_signs(trimmed)
    return [scale * disjoint_mean([task[i] for task in trimmed], s) for i, s in enumerate(signs)]


def ties_fractions(
    trimmed: Sequence[torch.Tensor], trimmed_other: Sequence[torch.Tensor], signs: Sequence[torch.Tensor]
) -> tuple[float, float]:
    """``(conflict_fraction, kept_fraction)`` of two trimmed task vectors.

    conflict_fraction = #{j: both non-zero, opposite signs} / #{j: both non-zero} (nan when
    none); kept_fraction = #{j: tau^_j != 0 and sign(tau^_j) = s_j} / #{j: tau^_j != 0}: the
    share of this model's trimmed update that survives the sign election.

    Example:
        >>> a, b = [torch.tensor([1.0, 2.0, 0.0])], [torch.tensor([-3.0, 1.0, 5.0])]
        >>> ties_fractions(a, b, elected_signs([a, b]))
        (0.5, 0.5)
    """
    both = conflict = own = kept = 0
    for a, b, s in zip(trimmed, trimmed_other, signs):
        nz_a, nz_b = a != 0, b != 0
        both += int((nz_a & nz_b).sum())
        conflict += int((nz_a & nz_b & (torch.sign(a) != torch.sign(b))).sum())
        own += int(nz_a.sum())
        kept += int((nz_a & (torch.sign(a) == s)).sum())
    return (conflict / both if both else math.nan), (kept / own if own else math.nan)


def fisher_merge(
    thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor | None], floor: float = 0.0
) -> torch.Tensor:
    """sum_t F_t theta_t / sum_t F_t per coordinate (F_t floored at ``floor``); plain mean without Fishers.

    Example:
        >>> fisher_merge([torch.tensor([0.0]), torch.tensor([4.0])], [torch.tensor([3.0]), torch.tensor([1.0])])
        tensor([1.])
    """
    if any(f is None for f in fishers):
        return cast(torch.Tensor, sum(thetas)) / len(thetas)
    weights = [f.clamp(min=floor) for f in fishers]  # type: ignore[union-attr]
    return cast(torch.Tensor, sum(w * t for w, t in zip(weights, thetas))) / cast(torch.Tensor, sum(weights))


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------- loading
#: ``{name: tensor}`` of a model, a state dict, a ``.safetensors`` file or a checkpoint folder.
load_state = load_weights_source


def check_same_parameters(
    field: str, params: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], known: set[str]
) -> None:
    """Check that ``weights`` holds every parameter of ``params`` with its shape, and none beyond ``known``.

    Raises:
        ValueError: naming ``field`` and the first parameter ``weights`` lacks, mis-shapes,
            or has beyond ``known``.
    """
    for name, p in params.items():
        if name not in weights:
            raise ValueError(f"{field} has no parameter {name!r}: not the model's architecture")
        if tuple(weights[name].shape) != tuple(p.shape):
            raise ValueError(
                f"{field} parameter {name!r} has shape {tuple(weights[name].shape)}, the model's is {tuple(p.shape)}"
            )
    extra = [n for n in weights if n not in known]
    if extra:
        raise ValueError(f"{field} has parameter {extra[0]!r} that the model lacks: not the model's architecture")


# ---------------------------------------------------------------------- the metric
class TaskVectors(Metric):
    r"""Task-vector norms against a base, and TIES / Fisher merges with named other models.

    Scalars (tau = theta - theta_base; see the module docstring for the merges):

    - ``norm`` = ||tau||, ``relative_norm`` = ||tau|| / ||theta_base||, ``layers/<m>/norm``
      over module m's own parameters;
    - per other model o: ``ties/<o>/conflict_fraction`` and ``ties/<o>/kept_fraction``
      (:func:`ties_fractions`), ``others/<o>/cosine`` = cos(tau, tau_o), ``others/<o>/loss``
      (its probe loss), and the probe losses ``merge/<o>/average_loss``,
      ``merge/<o>/ties_loss``, ``merge/<o>/fisher_loss``; ``loss``: this model's probe loss.

    The base: ``base=`` (a checkpoint folder, a ``.safetensors`` file, a model or a state
    dict), else the first checkpoint measured in the run (``needs_first``). At that first
    checkpoint itself there is no base yet and the metric is skipped (its tau would be 0
    by definition). Other models are loaded with safetensors (never unpickled) when first
    needed, kept on CPU, and must hold every parameter of the model with its shape and no
    other parameter (else a ``ValueError`` naming the parameter, at measure time).

    The merged weights are written in place from one saved copy of theta
    (:func:`~uma_callbacks.linalg.weights.moved_weights`) and restored bit for bit after,
    also on error. Holds on the device the saved copy, the two task vectors (trimmed in
    place) and the two Fisher diagonals; base and others stay in host memory.

    Args:
        base: the base weights, or None for the first checkpoint measured.
        others: ``{name: weights}``; names without ``/``.
        ties_density: share of each task vector TIES keeps, in (0, 1].
        ties_lambda: TIES scale lambda (> 0).
        fisher_floor: Fisher floor, relative to the mean Fisher entry (>= 0).
        n_batches: use only the first ``n_batches`` local probe batches.
        chunk_size: samples per chunk.
        timeout_seconds: stop between steps past this time.

    Raises:
        ValueError: a bad field (named): a missing path, a bad other name, a density outside
            (0, 1], a non-positive lambda.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> base = {"weight": lin.weight.detach() - torch.tensor([[3.0, 4.0]], dtype=torch.float64)}
        >>> r = TaskVectors(base=base).compute(lin, [{"x": torch.ones(2, 2, dtype=torch.float64)}],
        ...                                   lambda m, b: m(b["x"]).sum(-1))
        >>> r.scalars["norm"]
        5.0
    """

    name = "task_vectors"
    needs_first = True
    needs_eager_attention = True
    cost = Cost(per_sample_grads=True, param_copies=5.0, host_param_copies=2.0)

    def __init__(
        self,
        base: WeightsSource | None = None,
        others: Mapping[str, WeightsSource] | None = None,
        *,
        ties_density: float = 0.2,
        ties_lambda: float = 1.0,
        fisher_floor: float = 1e-6,
        n_batches: int | None = None,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        self.base = None
        if base is not None:
            self.base, self._loaded[""] = weights_label("TaskVectors.base", base)
        if others is not None and not isinstance(others, Mapping):
            raise ValueError(f"TaskVectors.others must map names to weights; got {type(others).__name__}")
        labels = {}
        for key, source in (others or {}).items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"TaskVectors.others names must be non-empty strings without '/'; got {key!r}")
            labels[key], self._loaded[f"others/{key}"] = weights_label(f"TaskVectors.others[{key!r}]", source)
        self.others = labels
        validate.check_number("TaskVectors.ties_density", ties_density, 0, 1, lo_open=True)
        validate.check_number("TaskVectors.ties_lambda", ties_lambda, 0, 1000, lo_open=True)
        validate.check_number("TaskVectors.fisher_floor", fisher_floor, 0, 1e300)
        validate.check_int("TaskVectors.n_batches", n_batches, 1, validate.MAX_BATCHES, allow_none=True)
        self.ties_density = float(ties_density)
        self.ties_lambda = float(ties_lambda)
        self.fisher_floor = float(fisher_floor)
        self.n_batches = n_batches

    def _weights(self, key: str) -> dict[str, torch.Tensor]:
        return self._loaded[key]

    def time_cost(self, units: UnitCosts) -> float:
        """Three forwards of the batches used (the merges' losses) and two backwards (the Fisher weights)."""
        return 3 * units.forward * batches_used(self, units) * per_batch(units) + 2 * units.backward

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[TaskVectors, dict[str, list[Any]]]:
        """Fewer probe batches (``n_batches``)."""
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        scaling.fewer_batches(seconds, units)
        return scaling.done()

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        ctx.check_time(stage="start")
        params = dict(ctx.model.named_parameters())
        known = set(ctx.model.state_dict()) | set(params)
        base: Mapping[str, torch.Tensor]
        if self.base is not None:
            base, base_label = self._weights(""), self.base
        elif ctx.history.first is not None:
            base, base_label = ctx.history.first.weights, ctx.history.first.label
        else:
            raise MetricSkipped("no base yet: this is the first checkpoint measured (pass base= to compare with another)")
        check_same_parameters(f"TaskVectors base ({base_label})", params, base, known)
        others = {}
        for name in self.others:
            others[name] = self._weights(f"others/{name}")
            check_same_parameters(f"TaskVectors.others[{name!r}]", params, others[name], known)
        ctx.meta["base"] = base_label
        scalars = norm_scalars(params, base)
        if others:
            scalars.update(self._merges(ctx, params, base, others))
        return MetricResult(name=self.name, scalars=scalars)

    def _merges(
        self,
        ctx: ComputeContext,
        params: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        others: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> dict[str, float]:
        """Fisher of this model, then for each other model its Fisher, TIES statistics and the three merges' probe losses.

        The weights are set in place and restored on exit.
        """
        names = list(params)
        targets = [params[n] for n in names]
        wide = torch.float64 if any(p.dtype == torch.float64 for p in targets) else torch.float32
        with moved_weights(targets) as mover:
            run = _MergeRun(self, ctx, mover, names, params, base, wide)
            fisher_self, loss = run.fisher_here()
            scalars: dict[str, float] = {"loss": loss}
            ctx.check_time(step="fisher_self")
            tau = [run.theta[i] - run.on(base, i) for i in range(len(names))]
            tau_sq = sum(float(squared_norm64(t)) for t in tau)
            trimmed = [t * m for t, m in zip(tau, trim_masks(tau, self.ties_density))]
            del tau
            for name, other in others.items():
                scalars.update(run.with_other(name, other, fisher_self, trimmed, tau_sq))
        ctx.meta.update(others=list(others), ties_density=self.ties_density)
        return scalars


class _MergeRun:
    """One :meth:`TaskVectors._merges` call: the saved theta, the probe chunks and the setters."""

    def __init__(
        self,
        metric: TaskVectors,
        ctx: ComputeContext,
        mover: Any,
        names: list[str],
        params: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        wide: torch.dtype,
    ) -> None:
        self.metric, self.ctx, self.mover, self.names, self.base, self.wide = metric, ctx, mover, names, base, wide
        self.trainable = {n for n in names if params[n].requires_grad}
        self.theta = [t.to(wide) for t in mover.theta]
        self.devices = [params[n].device for n in names]
        self.chunks, n_local = _local_chunks(ctx, metric.n_batches)
        self.n = ctx.collective.sum_scalar(float(n_local))
        self.sub = ctx if metric.n_batches is None else _with_batches(ctx, ctx.batches[: metric.n_batches])
        self.accumulate = "float64" if wide == torch.float64 else "float32"

    def on(self, source: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
        """Tensor i of ``source`` on its parameter's device, in the computation dtype."""
        return source[self.names[i]].to(device=self.devices[i], dtype=self.wide)

    def fisher_here(self) -> tuple[dict[str, torch.Tensor], float]:
        """The diagonal empirical Fisher at the current weights and the probe loss there."""
        stats = gather_fisher(self.sub, "empirical", 0, 1, "auto", self.accumulate, 0)
        return {k: (d / stats.rows).to(self.wide) for k, d in stats.diag_sum.items()}, stats.loss

    def loss_at(self, value: Callable[[int], torch.Tensor]) -> float:
        """The probe loss with every parameter i set to ``value(i)``."""
        self.mover.set_per_tensor(lambda i, p: p.copy_(value(i).to(p.dtype)))
        total = probe_loss_sum(self.ctx, self.chunks).reshape(1)
        self.ctx.collective.sum_([total])
        return float(total[0]) / self.n

    def with_other(
        self,
        name: str,
        other: Mapping[str, torch.Tensor],
        fisher_self: Mapping[str, torch.Tensor],
        trimmed: list[torch.Tensor],
        tau_sq: float,
    ) -> dict[str, float]:
        """The scalars against one other model (its Fisher is taken with its weights in place)."""
        ctx, metric, count = self.ctx, self.metric, len(self.names)
        out: dict[str, float] = {}
        self.mover.set_per_tensor(lambda i, p: p.copy_(other[self.names[i]].to(device=p.device, dtype=p.dtype)))
        fisher_other, out[f"others/{name}/loss"] = self.fisher_here()
        ctx.check_time(step=f"fisher_{name}")
        tau_o = [self.on(other, i) - self.on(self.base, i) for i in range(count)]
        dot = sum(float((self.theta[i] - self.on(self.base, i)).double().mul(tau_o[i].double()).sum()) for i in range(count))
        sq_o = sum(float(squared_norm64(t)) for t in tau_o)
        out[f"others/{name}/cosine"] = dot / math.sqrt(tau_sq * sq_o) if tau_sq > 0 and sq_o > 0 else math.nan
        trimmed_o = [t * m for t, m in zip(tau_o, trim_masks(tau_o, metric.ties_density))]
        del tau_o
        signs = elected_signs([trimmed, trimmed_o])
        conflict, kept = ties_fractions(trimmed, trimmed_o, signs)
        out[f"ties/{name}/conflict_fraction"], out[f"ties/{name}/kept_fraction"] = conflict, kept
        merge = f"merge/{name}"
        out[f"{merge}/average_loss"] = self.loss_at(lambda i: (self.theta[i] + self.on(other, i)) / 2)
        ctx.check_time(step=f"average_{name}")
        out[f"{merge}/ties_loss"] = self.loss_at(
            lambda i: self.on(self.base, i) + metric.ties_lambda * disjoint_mean([trimmed[i], trimmed_o[i]], signs[i])
        )
        ctx.check_time(step=f"ties_{name}")
        floor = metric.fisher_floor * _mean_entry([*fisher_self.values(), *fisher_other.values()])

        def fisher_value(i: int) -> torch.Tensor:
            key = self.names[i]
            fishers = (fisher_self.get(key), fisher_other.get(key)) if key in self.trainable else (None, None)
            return fisher_merge([self.theta[i], self.on(other, i)], fishers, floor)

        out[f"{merge}/fisher_loss"] = self.loss_at(fisher_value)
        ctx.check_time(step=f"fisher_merge_{name}")
        return out


def _mean_entry(tensors: Sequence[torch.Tensor]) -> float:
    total = sum(float(t.double().sum()) for t in tensors)
    count = sum(t.numel() for t in tensors)
    return total / count if count else 0.0


def _with_batches(ctx: ComputeContext, batches: Sequence[Any]) -> ComputeContext:
    import dataclasses

    return dataclasses.replace(ctx, batches=list(batches))


def norm_scalars(params: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``norm``, ``relative_norm`` and ``layers/<m>/norm`` of tau = params - base, in float64.

    Example:
        >>> norm_scalars({"a.w": torch.tensor([3.0]), "b.w": torch.tensor([4.0])}, {"a.w": torch.tensor([0.0]), "b.w": torch.tensor([0.0])})
        {'norm': 5.0, 'relative_norm': inf, 'layers/a/norm': 3.0, 'layers/b/norm': 4.0}
    """
    per: dict[str, float] = defaultdict(float)
    total = base_sq = 0.0
    for name, p in params.items():
        b = base[name].to(device=p.device, dtype=torch.float64)
        sq = float((p.detach().double() - b).square().sum())
        per[module_of(name)] += sq
        total += sq
        base_sq += float(b.square().sum())
    out = {"norm": math.sqrt(total), "relative_norm": math.sqrt(total / base_sq) if base_sq > 0 else math.inf}
    out.update({f"layers/{m}/norm": math.sqrt(v) for m, v in per.items()})
    return out
