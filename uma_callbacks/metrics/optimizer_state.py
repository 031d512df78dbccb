r"""Adam's state per module: moment norms, the update it takes, update-to-weight ratios, effective learning rates.

And, when ``fisher`` runs at the same save, how well sqrt(v_hat) ranks the entries as the
Fisher diagonal does (Spearman's rank correlation); when a later metric of the save asks
(``sharpness``'s last-update direction at a first save), the step AdamW would take now
(:func:`pending_step`), handed on in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from uma_callbacks.core.optimizer_state import OptimizerSnapshot
from uma_callbacks.core.ranks import spearman
from uma_callbacks.core.sharding import is_dtensor, local
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, MetricSkipped, module_of
from uma_callbacks.metrics.time_cost import UnitCosts

#: Per-tensor sums, in this order: ||m||^2, ||v||^2, ||u||^2, ||theta||^2, ||m_hat||^2,
#: sum v_hat, sum sqrt(v_hat), entries.
SUMS = ("m2", "v2", "u2", "w2", "mhat2", "vhat", "sqrt_vhat", "n")
#: Entries processed at once (float64 pieces of 8 MiB).
PIECE = 2**20
#: What the Spearman correlation reads from the ``fisher`` metric of the same save.
FISHER_OUTPUT = "diagonal"
#: Entries ranked at most for one Spearman correlation: above it, a seeded uniform sample of
#: about this many distinct entries (its standard error is about 1/sqrt of it).
SPEARMAN_ENTRIES = 2**20
#: The same for each module's correlation (about 0.004 standard error): with every module's
#: entries ranked, the per-module values cost 2.8 s of MiniLM's 3.1 s, a sort of every entry.
SPEARMAN_MODULE_ENTRIES = 2**16
#: Seeds that sample (the same entries at every save of a model of the same size).
SPEARMAN_SEED = 0
#: What this metric hands on when a later metric of the save asks: ``{param name: pending step}``.
PENDING_OUTPUT = "pending_update"


def adam_update(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    r"""Adam's update u = lr m_hat / (sqrt(v_hat) + eps), in float64.

    m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t); computed as torch's Adam does:
    (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps).

    Args:
        exp_avg: m [*shape].
        exp_avg_sq: v [*shape] (``max_exp_avg_sq`` under amsgrad).
        step: t, the state's step count (>= 1).
        lr: the group's learning rate.
        betas: (beta1, beta2).
        eps: epsilon.

    Returns:
        u [*shape], float64.

    Example:
        >>> g = torch.tensor([0.5, -2.0], dtype=torch.float64)  # one step from zero moments
        >>> u = adam_update(0.1 * g, 0.001 * g**2, 1, 1e-3, (0.9, 0.999), 0.0)
        >>> [round(float(x), 12) for x in u]  # lr * sign(g)
        [0.001, -0.001]
    """
    return _adam_parts(exp_avg.detach().to(torch.float64), exp_avg_sq.detach().to(torch.float64), step, lr, betas, eps)[0]


def pending_step(update: torch.Tensor, theta: torch.Tensor, lr: float, decay: float) -> torch.Tensor:
    r"""The step AdamW takes next from its moments as they are: Delta theta = -u - lr lambda theta, in float64.

    u = lr m_hat / (sqrt(v_hat) + eps) (:func:`adam_update`); lambda the decoupled weight decay
    (:func:`decoupled_decay`: AdamW's, 0 for Adam's L2 decay, which reaches the step through
    the gradient). The sign is the direction the parameters move: theta_next = theta + Delta theta
    when the next step leaves m_hat and v_hat as they are (exactly: one step with a zero
    gradient from the state one step earlier, m / beta1, v / beta2, t - 1).

    Args:
        update: u [*shape] (float64).
        theta: the parameter [*shape].
        lr: the group's learning rate now.
        decay: lambda.

    Returns:
        Delta theta [*shape], float64.

    Example:
        >>> u = torch.tensor([0.001, -0.001], dtype=torch.float64)
        >>> [round(float(x), 12) for x in pending_step(u, torch.tensor([2.0, 0.0]), 1e-3, 0.1)]  # -u - 1e-4 theta
        [-0.0012, 0.001]
    """
    return torch.add(update, theta.detach().to(torch.float64), alpha=lr * decay).neg_()


def decoupled_decay(kind: str, group: Mapping[str, Any]) -> float:
    """The decoupled weight decay lambda of a group (a step does theta <- theta (1 - lr lambda)); 0 for coupled (L2) decay.

    A group's ``decoupled_weight_decay`` says which (torch >= 2.5 keeps it in its groups);
    without it, AdamW's decay is decoupled and Adam's coupled (the weight decay is added to
    the gradient, so it is in the moments of the next step, not in the step from these).

    Example:
        >>> decoupled_decay("AdamW", {"weight_decay": 0.1}), decoupled_decay("Adam", {"weight_decay": 0.1})
        (0.1, 0.0)
        >>> decoupled_decay("Adam", {"weight_decay": 0.1, "decoupled_weight_decay": True})
        0.1
    """
    flag = group.get("decoupled_weight_decay")
    decoupled = bool(flag) if flag is not None else kind == "AdamW"
    return float(group.get("weight_decay") or 0.0) if decoupled else 0.0


def _adam_parts(
    m: torch.Tensor, v: torch.Tensor, step: float, lr: float, betas: tuple[float, float], eps: float
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(u, sqrt(v), 1 - beta1^t, 1 - beta2^t)`` from float64 m and v (the fewest temporaries).

    Raises:
        ValueError: t < 1 (a state that was never stepped has no bias correction).
    """
    if not step >= 1:
        raise ValueError(f"OptimizerState: the state's step must be >= 1 for Adam's bias correction; got {step!r}")
    bc1 = 1.0 - float(betas[0]) ** step
    bc2 = 1.0 - float(betas[1]) ** step
    root_v = v.sqrt()
    u = torch.div(m, root_v / math.sqrt(bc2) + eps).mul_(lr / bc1)
    return u, root_v, bc1, bc2


class OptimizerState(Metric):
    r"""Adam's state at the checkpoint, per module and overall (Composer's OptimizerMonitor, and more).

    For each parameter tensor p with Adam state m (``exp_avg``), v (``exp_avg_sq``;
    ``max_exp_avg_sq`` under amsgrad) and step t, in its group's lr, (beta1, beta2), eps:

    - m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t) (bias-corrected moments);
    - u = lr m_hat / (sqrt(v_hat) + eps): the update Adam takes from this state. Right after
      a step it is exactly that step's change of p, weight decay apart (AdamW's decoupled
      -lr lambda p is not part of u); with a scheduler, lr is the group's lr now (the one the
      next step will use);
    - sqrt(v_hat): the root-mean-square gradient, a free diagonal-Fisher proxy (v_hat is an
      EMA of squared minibatch gradients: an uncentred, minibatch version of diag F).

    Over a module's tensors (``layers/<module>/...``) and over all (no prefix):

    - ``exp_avg_norm`` = ||m||, ``exp_avg_sq_norm`` = ||v||, ``update_norm`` = ||u||,
      ``weight_norm`` = ||theta||;
    - ``update_ratio`` = ||u|| / ||theta|| (the update-to-weight ratio);
    - ``effective_lr`` = ||u|| / ||m_hat||: the step length per unit of (bias-corrected)
      momentum. Since u = diag(lr / (sqrt(v_hat) + eps)) m_hat, it is the m_hat-weighted RMS
      of the per-coordinate rates lr / (sqrt(v_hat) + eps); it equals lr for SGD with momentum;
    - ``sqrt_v_hat_mean`` = mean over entries of sqrt(v_hat); overall also ``v_hat_sum`` =
      sum v_hat (the Fisher-trace proxy).

    Per group i: ``groups/<i>/lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay`` and
    ``step`` (the largest t of its parameters). Only parameters with state count; those
    without (never stepped) are counted in ``meta["params_without_state"]``.

    When the ``fisher`` metric runs at the same save (the suite runs it first and it hands
    on its diagonal, diag F = (1/N) sum_i g_i^2 of its kind and probe):
    ``fisher_spearman`` = Spearman's rank correlation (:func:`~uma_callbacks.core.ranks.spearman`:
    ties at their mean rank, as ``scipy.stats.spearmanr``) between sqrt(v_hat) and diag F
    over the entries of every parameter holding both, and ``layers/<module>/fisher_spearman``
    over each module's entries. Above :data:`SPEARMAN_ENTRIES` entries (a module's above
    :data:`SPEARMAN_MODULE_ENTRIES`) the correlation is taken over a seeded uniform sample of
    about that many distinct entries (``meta["fisher_spearman_sampled"]``). Without ``fisher`` at this save (not in the
    metrics, failed, read from the cache) or on a sharded state, ``meta["skipped"]
    ["fisher_spearman"]`` says why and the rest is measured.

    Handed to later metrics of the same save that ask for it (``ctx.results.requested``; in
    ``result.provided``, never journalled): ``"pending_update"``, ``{param name: Delta theta}``
    in the parameter's dtype and on its device, Delta theta = -u - lr lambda theta
    (:func:`pending_step`): the step the optimizer would take now if its moments stayed as
    they are, signed as the parameters move. lambda is the group's weight decay when it is
    decoupled (AdamW: theta <- theta (1 - lr lambda), part of the pending step) and 0 for
    Adam's coupled L2 decay (:func:`decoupled_decay`). Parameters without state are absent
    (the next step does not move them). Formed only when asked (one parameter-sized copy,
    planned as ``Cost.requested_bytes``); on a sharded (FSDP2) state ``meta["not_provided"]``
    says why it is not. ``sharpness`` measures its last-update direction along it at a save
    with no previous checkpoint.

    The state comes with the measurement, not from the probe (``ctx.optimizer_state``: the
    Trainer's optimizer at ``on_save``, an accelerator's prepared optimizers, or a
    checkpoint's ``optimizer.pt``/``optimizer.bin`` in a backfill). No state: a skip record
    with the reason. An optimizer other than Adam/AdamW: a skip record naming it. A state
    that does not fit the model's parameters: an error record naming the first mismatch.
    FSDP2 (DTensor) states: sums over each rank's shard, all-reduced; replicated states (DDP)
    are read as they are.

    Args:
        keep_update: return u per parameter in ``result.tensors`` (``{param name: u}``, float64,
            CPU; written as ``.safetensors`` with ``save_tensors``).
        timeout_seconds: stop past this time.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.0)
        >>> lin(torch.ones(1, 2, dtype=torch.float64)).sum().backward(); opt.step()
        >>> from uma_callbacks.core.optimizer_state import from_optimizer
        >>> r = OptimizerState().compute(lin, [torch.zeros(1)], lambda m, b: b, optimizer_state=from_optimizer(opt, lin))
        >>> round(r.scalars["update_norm"], 6), round(r.scalars["effective_lr"], 6)  # lr * ||sign(g)||
        (0.141421, 0.1)
    """

    name = "optimizer_state"
    needs_grad = False
    #: reads no probe: a backfill runs it without one
    needs_probe = False
    #: reads ``ctx.optimizer_state`` (the engine passes it and keys its cache by it)
    needs_optimizer = True
    supports_sharded = True
    #: the Fisher diagonal of the same save, for ``fisher_spearman``
    uses_results = {"fisher": (FISHER_OUTPUT,)}

    def __init__(self, keep_update: bool = False, *, timeout_seconds: float | None = None) -> None:
        super().__init__(timeout_seconds=timeout_seconds)
        if not isinstance(keep_update, bool):
            raise ValueError(f"OptimizerState.keep_update must be True or False; got {keep_update!r}")
        self.keep_update = keep_update

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode: six float64 pieces of :data:`PIECE` entries at a time; with ``keep_update``, u of every parameter in float64.

        The Spearman correlation adds six float64 vectors of :data:`SPEARMAN_ENTRIES` (the two
        samples, their ranks, the sort's values and order). When a later metric asks for
        ``"pending_update"``: one copy of the parameters in their dtype (n entries), held
        until that metric has run, and one more float64 piece (``Cost.requested_bytes``).
        """
        keep = self.keep_update
        fixed = 6 * 8 * PIECE + 6 * 8 * SPEARMAN_ENTRIES
        pending = ((PENDING_OUTPUT, _pending_bytes),)
        return [("default", Cost(fixed_bytes=fixed, extra_bytes=lambda n, _w, _s: 8 * n if keep else 0, requested_bytes=pending))]

    def time_cost(self, units: UnitCosts) -> float:
        """A few elementwise passes over the state, no probe: a rough tenth of a forward (calibrated by the suite)."""
        return 0.1 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        state = ctx.optimizer_state
        if state is None:
            raise MetricSkipped("no optimizer state was given with this measurement (measure(..., optimizer=...))")
        if state.missing:
            raise MetricSkipped(f"no optimizer state: {state.missing}")
        if state.error:
            raise ValueError(f"OptimizerState: {state.error}")
        if not state.is_adam:
            raise MetricSkipped(f"the optimizer is {state.kind}, not Adam or AdamW: its state has no Adam moments")
        params = dict(ctx.model.named_parameters())
        check_fits(state, params)
        names = [n for n in params if n in state.params]
        if not names:
            raise MetricSkipped("the optimizer holds no state yet (no step taken)")
        sums = torch.zeros(len(names), len(SUMS), dtype=torch.float64)
        steps: dict[str, float] = {}
        kept: dict[str, torch.Tensor] = {}
        sharded = any(is_dtensor(t) for n in names for t in (params[n], *state.params[n].values()))
        form_pending = PENDING_OUTPUT in ctx.results.requested and not sharded
        pending: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, name in enumerate(names):
                sums[i], steps[name], update, moved = _param_sums(state, name, params[name], self.keep_update, form_pending)
                if self.keep_update:
                    kept[name] = update.cpu()
                if form_pending:
                    pending[name] = moved
                ctx.check_time(params_done=i + 1)
        if sharded:
            ctx.collective.sum_([sums])  # FSDP2: each rank summed its shard
        ctx.meta["params_without_state"] = len([n for n in params if n not in state.params])
        ctx.meta["optimizer"] = state.kind
        ctx.meta["optimizer_source"] = state.source
        result = self._result(state, names, sums, steps)
        correlations = _fisher_spearman(ctx, state, names, params, steps)
        if isinstance(correlations, str):
            ctx.meta["skipped"] = {"fisher_spearman": correlations}
        else:
            result.scalars.update(correlations)
            ctx.meta["skipped"] = {}
        result.tensors = kept
        if form_pending:
            result.provided[PENDING_OUTPUT] = pending
        elif PENDING_OUTPUT in ctx.results.requested:
            ctx.meta["not_provided"] = {
                PENDING_OUTPUT: "optimizer_state on a sharded (FSDP) state holds each rank's shard of the pending step only"
            }
        return result

    def _result(self, state: OptimizerSnapshot, names: list[str], sums: torch.Tensor, steps: Mapping[str, float]) -> MetricResult:
        scalars: dict[str, float] = {}
        total = sums.sum(0)
        scalars.update(_summary(total))
        scalars["v_hat_sum"] = float(total[SUMS.index("vhat")])
        modules: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            modules.setdefault(module_of(name), []).append(i)
        ratios = []
        for module, rows in modules.items():
            for key, value in _summary(sums[rows].sum(0)).items():
                scalars[f"layers/{module}/{key}"] = value
            ratios.append(scalars[f"layers/{module}/update_ratio"])
        for gi, group in enumerate(state.groups):
            held = [steps[n] for n in group.get("params", ()) if n in steps]
            betas = group.get("betas", (math.nan, math.nan))
            scalars.update({
                f"groups/{gi}/lr": float(group.get("lr", math.nan)), f"groups/{gi}/beta1": float(betas[0]),
                f"groups/{gi}/beta2": float(betas[1]), f"groups/{gi}/eps": float(group.get("eps", math.nan)),
                f"groups/{gi}/weight_decay": float(group.get("weight_decay", 0.0)),
            })  # fmt: skip
            if held:
                scalars[f"groups/{gi}/step"] = max(held)
        scalars["step"] = max(steps.values())
        arrays = {"update_ratio": np.asarray(ratios, dtype=np.float64)}
        return MetricResult(name=self.name, scalars=scalars, arrays=arrays, meta={"modules": list(modules)})


def check_fits(state: OptimizerSnapshot, params: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first state entry that does not fit the model's parameters.

    Raises:
        ValueError: a state for a parameter the model lacks, or of another shape.
    """
    for name, entry in state.params.items():
        if name not in params:
            raise ValueError(f"OptimizerState: the optimizer holds state for {name!r}, which the model does not have")
        want = list(params[name].shape)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = entry.get(key)
            if t is not None and list(t.shape) != want:
                raise ValueError(
                    f"OptimizerState: the optimizer's {key} of {name!r} has shape {list(t.shape)}; the parameter has {want}"
                )


def _pending_bytes(n: int, itemsize: float, _n_samples: int) -> int:
    """Bytes of the pending step handed on: the parameters' size in their dtype, and one float64 piece forming it."""
    return int(n * itemsize) + 8 * PIECE


def _param_sums(
    state: OptimizerSnapshot, name: str, param: torch.Tensor, keep: bool = False, pending: bool = False
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """One parameter's row of :data:`SUMS` (its local shard under FSDP2), its step t, its update u and its pending step.

    u is float64 (``keep``; else empty); the pending step Delta theta (:func:`pending_step`)
    is in the parameter's dtype and on its device (``pending``; else empty).

    Raises:
        ValueError: a state without Adam's moments or step, or a group without lr/betas/eps.
    """
    entry = state.params[name]
    group = state.group_of(name)
    amsgrad = bool(group.get("amsgrad", False))
    second = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    if "exp_avg" not in entry or second not in entry or "step" not in entry:
        raise ValueError(f"OptimizerState: the state of {name!r} lacks exp_avg, {second} or step (keys {sorted(entry)})")
    if not all(k in group for k in ("lr", "betas", "eps")):
        raise ValueError(f"OptimizerState: the param group of {name!r} lacks lr, betas or eps (keys {sorted(group)})")
    step = float(local(entry["step"]).detach().cpu().reshape(-1)[0])
    shape = local(entry["exp_avg"]).shape
    flat = [local(t).detach().reshape(-1) for t in (entry["exp_avg"], entry[second], param)]
    row = torch.zeros(len(SUMS), dtype=torch.float64, device=flat[0].device)
    pieces = []
    lr = float(group["lr"])
    decay = decoupled_decay(state.kind, group)
    moved = torch.empty(shape, dtype=param.dtype, device=param.device) if pending else torch.empty(0)
    for start in range(0, flat[0].numel(), PIECE):  # cache-sized float64 pieces: no model-sized temporaries
        m, v, w = (t[start : start + PIECE].to(torch.float64) for t in flat)
        u, root_v, bc1, bc2 = _adam_parts(m, v, step, lr, tuple(group["betas"]), float(group["eps"]))
        if pending:
            moved.view(-1)[start : start + PIECE] = pending_step(u, w, lr, decay)
        m2 = torch.dot(m, m)
        row += torch.stack([
            m2, torch.dot(v, v), torch.dot(u, u), torch.dot(w, w), m2 / (bc1 * bc1),
            v.sum() / bc2, root_v.sum() / math.sqrt(bc2), torch.tensor(float(m.numel()), dtype=torch.float64, device=m.device),
        ])  # fmt: skip
        if keep:
            pieces.append(u)
    u = torch.cat(pieces).reshape(shape) if keep else torch.empty(0)
    return row.cpu(), step, u, moved


def _fisher_spearman(
    ctx: ComputeContext,
    state: OptimizerSnapshot,
    names: list[str],
    params: Mapping[str, torch.Tensor],
    steps: Mapping[str, float],
) -> dict[str, float] | str:
    """``fisher_spearman`` and ``layers/<module>/fisher_spearman`` with the Fisher diagonal of this save, or why not.

    Args:
        ctx: the context (``ctx.results`` holds the diagonal when ``fisher`` handed it on).
        state: the optimizer state.
        names: the parameters with state, in model order.
        params: the model's parameters by name.
        steps: each parameter's step t.
    """
    diagonal, why = ctx.results.get("fisher", FISHER_OUTPUT)
    if diagonal is None:
        return f"no Fisher diagonal at this save: {why}"
    if any(is_dtensor(params[n]) for n in names):
        return "the Spearman correlation over a sharded (FSDP) state is not computed: each rank holds a shard"
    both = [n for n in names if n in diagonal and tuple(diagonal[n].shape) == tuple(params[n].shape)]
    if not both:
        return "the Fisher diagonal handed on holds none of the parameters with optimizer state"
    modules: dict[str, list[str]] = {}
    for name in both:
        modules.setdefault(module_of(name), []).append(name)
    sources = {n: _Pair(state, n, diagonal[n], steps[n]) for n in both}
    out = {"fisher_spearman": _correlation([sources[n] for n in both], ctx.meta, "fisher_spearman")}
    for module, members in modules.items():
        out[f"layers/{module}/fisher_spearman"] = _correlation([sources[n] for n in members], cap=SPEARMAN_MODULE_ENTRIES)
    ctx.meta["fisher_spearman_params"] = len(both)
    return out


class _Pair:
    """One parameter's sqrt(v_hat) and Fisher diagonal entries, flat, read a piece at a time in float64."""

    def __init__(self, state: OptimizerSnapshot, name: str, fisher: torch.Tensor, step: float) -> None:
        entry, group = state.params[name], state.group_of(name)
        second = "max_exp_avg_sq" if bool(group.get("amsgrad", False)) else "exp_avg_sq"
        self.v = local(entry[second]).detach().reshape(-1)
        self.fisher = fisher.detach().reshape(-1)
        self.bc2 = 1.0 - float(group["betas"][1]) ** step
        self.n = self.v.numel()

    def values(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(v_hat), diag F)`` float64 on the CPU, at the flat ``index`` [k] (sorted) or all entries."""
        v, f = (self.v, self.fisher) if index is None else (self.v[index.to(self.v.device)], self.fisher[index.to(self.fisher.device)])
        return (v.to(torch.float64) / self.bc2).sqrt().cpu(), f.to(torch.float64).cpu()


def _correlation(pairs: list[_Pair], meta: dict[str, object] | None = None, label: str = "", cap: int | None = None) -> float:
    """Spearman's rho over the entries of ``pairs``; a seeded sample of ``cap`` (:data:`SPEARMAN_ENTRIES`) distinct entries above it."""
    total = sum(p.n for p in pairs)
    cap = SPEARMAN_ENTRIES if cap is None else cap
    index = None
    if total > cap:
        gen = torch.Generator().manual_seed(SPEARMAN_SEED)
        index = torch.unique(torch.randint(total, (cap,), generator=gen))  # sorted, distinct
    xs, ys = [], []
    offset = 0
    for pair in pairs:
        if index is None:
            x, y = pair.values()
        else:
            lo, hi = torch.searchsorted(index, torch.tensor([offset, offset + pair.n]))
            x, y = pair.values(index[lo:hi] - offset)
        xs.append(x)
        ys.append(y)
        offset += pair.n
    if meta is not None:
        meta[f"{label}_entries"] = int(sum(x.numel() for x in xs))
        meta[f"{label}_sampled"] = index is not None
    return spearman(torch.cat(xs), torch.cat(ys))


def _summary(row: torch.Tensor) -> dict[str, float]:
    """The norms and ratios of one row of summed :data:`SUMS`."""
    s = dict(zip(SUMS, (float(x) for x in row)))
    update, weight, mhat = math.sqrt(s["u2"]), math.sqrt(s["w2"]), math.sqrt(s["mhat2"])
    return {
        "exp_avg_norm": math.sqrt(s["m2"]),
        "exp_avg_sq_norm": math.sqrt(s["v2"]),
        "update_norm": update,
        "weight_norm": weight,
        "update_ratio": update / weight if weight > 0 else math.nan,
        "effective_lr": update / mhat if mhat > 0 else math.nan,
        "sqrt_v_hat_mean": s["sqrt_vhat"] / s["n"] if s["n"] > 0 else math.nan,
    }
