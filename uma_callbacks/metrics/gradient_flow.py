"""Gradient flow: norms and signal-to-noise per parameter and per module, and the noise scale."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.core.batches import count_samples
from uma_callbacks.core.buckets import ScatterQueue, bucket_cap
from uma_callbacks.core.numerics import squared_norm64
from uma_callbacks.core.sharding import aligned_chunks, is_sharded, local, unwrap
from uma_callbacks.linalg.layer_grads import LayerGradients, LayerSums, hook_plan, layer_gradient_sums, layer_gradients
from uma_callbacks.linalg.per_sample import per_sample_grads
from uma_callbacks.linalg.sharded_plan import check_sharded_plan
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, check_choice, module_of

ACCUMULATE_DTYPES = ("float32", "float64")
#: ``auto`` is ``hooks``: per-layer rules in one ordinary backward, vmap for the rest.
METHODS = ("auto", "hooks", "vmap")


class GradientFlow(Metric):
    r"""Gradient norms per parameter and module, their signal-to-noise, and the noise scale.

    N probe samples with per-sample gradients g_i [P]; for a parameter tensor p,
    g_{i,p} is its block. Sufficient statistics (summed across ranks):
    ``grad_sum`` = sum_i g_i [P] and ``sq_norm_sum[p]`` = sum_i ||g_{i,p}||^2.

    - G = grad_sum / N (the probe-loss gradient); ``params/<p>/norm`` = ||G_p||;
    - V_p = (sq_norm_sum[p] - N ||G_p||^2) / (N - 1) (unbiased total variance of g_{i,p});
      ``params/<p>/snr`` = ||G_p||^2 / V_p;
    - per module m (the parameters it owns directly): ``layers/<m>/norm`` =
      sqrt(sum_{p in m} ||G_p||^2), ``layers/<m>/snr`` = sum ||G_p||^2 / sum V_p;
    - ``total_norm`` = ||G||; ``noise_scale`` = sum_p V_p / ||G||^2 (McCandlish et al.
      2018, "An Empirical Model of Large-Batch Training", B_simple);
    - ``layers/<m>/vanishing`` (1.0/0.0) when the module's norm is below
      ``vanishing_ratio`` x the median module norm, ``layers/<m>/exploding`` above
      ``exploding_ratio`` x the median; ``n_vanishing_layers``, ``n_exploding_layers``.

    Per-sample gradients come a chunk at a time, by default (``method="auto"`` or
    ``"hooks"``) from one ordinary backward with per-layer rules, reduced a layer at a time
    to sum_i g_i and ||g_{i,p}||^2 (:mod:`~uma_callbacks.linalg.layer_grads`; parameters
    without a rule by ``vmap``), or all by ``vmap(grad)`` (``method="vmap"``,
    :func:`~uma_callbacks.linalg.per_sample.per_sample_grads`); ``meta["per_sample_method"]``
    says which. The squared norms are
    summed in float64; ``grad_sum`` in the parameters' dtype or float64
    (``accumulate_dtype``). With float32, V_p carries a relative error of about
    1e-7 x snr from the cancellation in its formula.

    Args:
        vanishing_ratio: a module is vanishing below this fraction of the median norm.
        exploding_ratio: a module is exploding above this multiple of the median norm.
        accumulate_dtype: ``"float32"`` (the parameters' dtype when wider) or ``"float64"``.
        method: ``"auto"``, ``"hooks"`` or ``"vmap"``.
        chunk_size: samples per ``vmap`` call (default: the whole probe batch).
        timeout_seconds: stop between chunks past this time.

    Raises:
        ValueError: a ratio not positive, ``vanishing_ratio >= exploding_ratio``, or an
            unknown ``accumulate_dtype``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = {"x": torch.randn(4, 3), "y": torch.randn(4, 2)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)
        >>> r = GradientFlow().compute(model, [batch], loss)
        >>> sorted(k for k in r.scalars if "/" not in k)
        ['loss', 'median_layer_norm', 'n_exploding_layers', 'n_vanishing_layers', 'noise_scale', 'total_norm']
    """

    name = "gradient_flow"
    needs_eager_attention = True
    supports_sharded = True
    cost = Cost(per_sample_grads=True, param_copies=1.0)
    #: one chunk holds its forward graph and every layer's output gradients: chunks of at
    #: most 512 tokens keep that near a quarter of a 16 x 128-token training batch's peak
    #: while the products stay large enough to run at speed (bench/per_sample.py)
    default_chunk_tokens = 512

    def __init__(
        self,
        vanishing_ratio: float = 1e-3,
        exploding_ratio: float = 1e3,
        accumulate_dtype: str = "float32",
        *,
        method: str = "auto",
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        for field_name, value in (("vanishing_ratio", vanishing_ratio), ("exploding_ratio", exploding_ratio)):
            validate.check_number(f"GradientFlow.{field_name}", value, 0, 1e300, lo_open=True)
        if vanishing_ratio >= exploding_ratio:
            raise ValueError(
                f"GradientFlow.vanishing_ratio must be below exploding_ratio; got {vanishing_ratio!r} >= {exploding_ratio!r}"
            )
        check_choice("GradientFlow.accumulate_dtype", accumulate_dtype, ACCUMULATE_DTYPES)
        check_choice("GradientFlow.method", method, METHODS)
        self.method = method
        self.vanishing_ratio = float(vanishing_ratio)
        self.exploding_ratio = float(exploding_ratio)
        self.accumulate_dtype = accumulate_dtype

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode: ``grad_sum``, one chunk's per-sample gradients and its per-tensor sums.

        ``grad_sum`` is one vector in the accumulation dtype, the per-tensor sums of a chunk
        one copy. The hooks path holds one layer's [B, *shape] at a time: the largest
        trainable tensor per sample (``per_sample_grad_by_tensor``; a tied embedding's dense
        [B, V, d] on GPT-2), half of [B, P] where the planner does not say; vmap holds all
        of [B, P].
        """
        acc = 8 if self.accumulate_dtype == "float64" else 4
        hooks = self.method != "vmap"
        cost = Cost(
            per_sample_grads=True, param_copies=1.0, vectors=1.0, vector_itemsize=acc,
            per_sample_grad_fraction=0.5 if hooks else 1.0, per_sample_grad_by_tensor=hooks,
        )  # fmt: skip
        return [("default", cost)]

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        params = ctx.trainable_params()
        if not params:
            raise ValueError("GradientFlow: the model has no trainable parameters")
        sharded = is_sharded(ctx.model)
        if sharded:
            check_sharded_plan(ctx.model, params, self.method)
        grad_sum = {
            n: torch.zeros_like(local(p), dtype=_acc_dtype(p.dtype, self.accumulate_dtype)) for n, p in params.items()
        }
        names = list(params)
        sq_norm_sum = torch.zeros(len(names), dtype=torch.float64, device=local(next(iter(params.values()))).device)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=sq_norm_sum.device)
        n_chunks = n_done = 0
        if not sharded:  # on several ranks a time limit still ends the metric (see ComputeContext.keep_partial)
            ctx.keep_partial(lambda: self._partial(names, grad_sum, sq_norm_sum, loss_sum, n_done))
        plan = hook_plan(ctx.model, params) if self.method != "vmap" else None
        vmapped: set[str] = set()
        chunks = aligned_chunks(ctx.chunks(), ctx.collective) if sharded else ctx.chunks()

        def into_shard(n: Hashable, piece: torch.Tensor) -> None:
            assert isinstance(n, str)
            grad_sum[n] += piece.to(grad_sum[n].dtype)

        # a chunk's sums over all ranks' samples, reduce-scattered into the shards in buckets
        queue = ScatterQueue(ctx.collective, bucket_cap(params.values()), into_shard)
        for item in chunks:
            chunk, real = unwrap(item)
            if plan is not None:

                def add(n: str, _diag: torch.Tensor | None, part: torch.Tensor | None, real: bool = real) -> None:
                    # one parameter's chunk sum at a time, straight into the accumulator
                    assert part is not None  # reduced with want_sum=True: every call carries the sum
                    part = part if real else torch.zeros_like(part)
                    if sharded:
                        queue.put(n, part)
                    else:
                        grad_sum[n] += part.to(grad_sum[n].dtype)

                rep: LayerGradients | LayerSums
                if sharded:  # FSDP runs its own collectives in the backward: the sums are scattered after it
                    ctx.collective.agree()  # every rank healthy before FSDP's forward all-gathers
                    rep = layer_gradients(ctx.model, ctx.loss_fn, chunk, params, plan, before_backward=ctx.collective.agree)
                    _, norms, _, _ = rep.reduce(want_diag=False, want_sum=True, consume=add)
                    queue.flush()
                else:  # reduced during the backward, one layer's output gradients at a time
                    rep = layer_gradient_sums(
                        ctx.model, ctx.loss_fn, chunk, params, plan, want_diag=False, want_sum=True, consume=add
                    )
                    norms = rep.sq_norms
                if real:
                    sq_norm_sum += norms.sum(0)
                    loss_sum += rep.losses.to(torch.float64).sum()
                    vmapped.update(rep.vmapped)
                del rep, norms
            else:
                psg = per_sample_grads(ctx.model, ctx.loss_fn, chunk, params)
                sq = psg.sq_norms()
                sq_norm_sum += torch.stack([sq[n].to(torch.float64).sum() for n in names])
                for n in names:
                    grad_sum[n] += psg.grads[n].sum(dim=0).to(grad_sum[n].dtype)
                loss_sum += psg.losses.to(torch.float64).sum()
                del psg, sq
            n_chunks += int(real)
            n_done += count_samples(chunk) if real else 0
            ctx.check_time(chunks_done=n_chunks, samples_done=n_done)
        if sharded:
            ctx.collective.sum_([sq_norm_sum, loss_sum])
        else:
            ctx.collective.sum_([*grad_sum.values(), sq_norm_sum, loss_sum])
        # ||sum_i g_{i,p}||^2 per parameter: the shards' sums of squares, summed over ranks
        sum_sq = torch.stack([squared_norm64(g) for g in grad_sum.values()]).to(sq_norm_sum.device)
        if sharded:
            ctx.collective.sum_([sum_sq])
            ctx.meta["sharded"] = True
        n_total = ctx.n_total()
        if plan is None:
            ctx.meta["per_sample_method"] = "vmap(grad)"
        else:
            ctx.meta["per_sample_method"] = "hooks+vmap(grad)" if vmapped else "hooks"
            if vmapped:
                ctx.meta["vmap_params"] = {p: plan.reasons.get(p, "") for p in names if p in vmapped}
        return gradient_flow_from_sums(
            names, sum_sq, sq_norm_sum, n_total, self.vanishing_ratio, self.exploding_ratio, loss_sum.item() / n_total
        )


    def _partial(
        self,
        names: list[str],
        grad_sum: dict[str, torch.Tensor],
        sq_norm_sum: torch.Tensor,
        loss_sum: torch.Tensor,
        n_done: int,
    ) -> MetricResult | None:
        """What the chunks finished before the time limit give: the metric on those samples alone.

        The sums are over the first ``n_done`` samples of the probe (the chunks run in probe
        order), so this is exactly :class:`GradientFlow` on a probe of those samples; ``None``
        before the first chunk ends.
        """
        if n_done == 0:
            return None
        result = gradient_flow_from_sums(
            names, grad_sum, sq_norm_sum, n_done, self.vanishing_ratio, self.exploding_ratio, loss_sum.item() / n_done
        )
        result.meta["samples_done"] = n_done
        return result


def _acc_dtype(param_dtype: torch.dtype, accumulate_dtype: str) -> torch.dtype:
    if accumulate_dtype == "float64" or param_dtype == torch.float64:
        return torch.float64
    return torch.float32


def gradient_flow_from_sums(
    names: list[str],
    grad_sum: dict[str, torch.Tensor] | torch.Tensor,
    sq_norm_sum: torch.Tensor,
    n: int,
    vanishing_ratio: float,
    exploding_ratio: float,
    mean_loss: float,
) -> MetricResult:
    """The :class:`GradientFlow` scalars from its sufficient statistics (see the class).

    Args:
        names: parameter names, in the order of ``sq_norm_sum``.
        grad_sum: ``{name: sum_i g_{i,p}}``, or ``[len(names)]`` float64 of their squared
            norms ||sum_i g_{i,p}||^2 (what a sharded model gives, summed over shards).
        sq_norm_sum: ``[len(names)]`` float64, sum_i ||g_{i,p}||^2.
        n: number of samples N.
        vanishing_ratio: see :class:`GradientFlow`.
        exploding_ratio: see :class:`GradientFlow`.
        mean_loss: the probe loss L, reported as ``loss``.

    Returns:
        A :class:`MetricResult` named ``gradient_flow``.
    """
    scalars: dict[str, float] = {}
    mean_sq = {}
    variance = {}
    for i, name in enumerate(names):
        if isinstance(grad_sum, torch.Tensor):
            m2 = float(grad_sum[i]) / (n * n)
        else:
            m2 = float((grad_sum[name].to(torch.float64) / n).pow(2).sum())
        v = (float(sq_norm_sum[i]) - n * m2) / (n - 1) if n > 1 else math.nan
        v = max(v, 0.0) if not math.isnan(v) else v
        mean_sq[name], variance[name] = m2, v
        scalars[f"params/{name}/norm"] = math.sqrt(m2)
        scalars[f"params/{name}/snr"] = _ratio(m2, v)
    modules: dict[str, list[str]] = defaultdict(list)
    for name in names:
        modules[module_of(name)].append(name)
    module_norms = {}
    for module, members in modules.items():
        m2 = sum(mean_sq[p] for p in members)
        v = sum(variance[p] for p in members)
        module_norms[module] = math.sqrt(m2)
        scalars[f"layers/{module}/norm"] = math.sqrt(m2)
        scalars[f"layers/{module}/snr"] = _ratio(m2, v)
    median = float(np.median(list(module_norms.values())))
    n_vanishing = n_exploding = 0
    for module, norm in module_norms.items():
        vanishing = norm < vanishing_ratio * median
        exploding = norm > exploding_ratio * median
        scalars[f"layers/{module}/vanishing"] = float(vanishing)
        scalars[f"layers/{module}/exploding"] = float(exploding)
        n_vanishing += vanishing
        n_exploding += exploding
    total_m2 = sum(mean_sq.values())
    total_v = sum(variance.values())
    scalars["total_norm"] = math.sqrt(total_m2)
    scalars["noise_scale"] = _ratio(total_v, total_m2)
    scalars["n_vanishing_layers"] = float(n_vanishing)
    scalars["n_exploding_layers"] = float(n_exploding)
    scalars["loss"] = mean_loss
    scalars["median_layer_norm"] = median
    return MetricResult(name="gradient_flow", scalars=scalars, meta={"n_modules": len(modules)})


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0:
        return math.inf if num > 0 else math.nan
    return num / den
