r"""Adam's state per module: moment norms, the update it takes, update-to-weight ratios, effective learning rates."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from uma_callbacks.core.optimizer_state import OptimizerSnapshot
from uma_callbacks.core.sharding import is_dtensor, local
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult, MetricSkipped, module_of
from uma_callbacks.metrics.time_cost import UnitCosts

#: Per-tensor sums, in this order: ||m||^2, ||v||^2, ||u||^2, ||theta||^2, ||m_hat||^2,
#: sum v_hat, sum sqrt(v_hat), entries.
SUMS = ("m2", "v2", "u2", "w2", "mhat2", "vhat", "sqrt_vhat", "n")
#: Entries processed at once (float64 pieces of 8 MiB).
PIECE = 2**20
#: Why the Spearman correlation with the Fisher diagonal is not logged.
FISHER_SKIP = (
    "the Fisher diagonal of the same save does not reach this metric: the results of a save are not passed between metrics"
)


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
    without (never stepped) are counted in ``meta["params_without_state"]``. The Spearman rank
    correlation of sqrt(v_hat) with the Fisher diagonal is not logged (``meta["skipped"]``
    says why: :data:`FISHER_SKIP`).

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

    def __init__(self, keep_update: bool = False, *, timeout_seconds: float | None = None) -> None:
        super().__init__(timeout_seconds=timeout_seconds)
        if not isinstance(keep_update, bool):
            raise ValueError(f"OptimizerState.keep_update must be True or False; got {keep_update!r}")
        self.keep_update = keep_update

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode: six float64 pieces of :data:`PIECE` entries at a time; with ``keep_update``, u of every parameter in float64."""
        keep = self.keep_update
        return [("default", Cost(fixed_bytes=6 * 8 * PIECE, extra_bytes=lambda n, _w, _s: 8 * n if keep else 0))]

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
        with torch.no_grad():
            for i, name in enumerate(names):
                sums[i], steps[name], update = _param_sums(state, name, params[name], self.keep_update)
                if self.keep_update:
                    kept[name] = update.cpu()
                ctx.check_time(params_done=i + 1)
        if any(is_dtensor(t) for n in names for t in (params[n], *state.params[n].values())):
            ctx.collective.sum_([sums])  # FSDP2: each rank summed its shard
        ctx.meta["params_without_state"] = len([n for n in params if n not in state.params])
        ctx.meta["optimizer"] = state.kind
        ctx.meta["optimizer_source"] = state.source
        ctx.meta["skipped"] = {"fisher_spearman": FISHER_SKIP}
        result = self._result(state, names, sums, steps)
        result.tensors = kept
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


def _param_sums(
    state: OptimizerSnapshot, name: str, param: torch.Tensor, keep: bool = False
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The row of :data:`SUMS` of one parameter (its local shard under FSDP2), its step t and its update u (``keep``; else empty).

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
    for start in range(0, flat[0].numel(), PIECE):  # cache-sized float64 pieces: no model-sized temporaries
        m, v, w = (t[start : start + PIECE].to(torch.float64) for t in flat)
        u, root_v, bc1, bc2 = _adam_parts(m, v, step, float(group["lr"]), tuple(group["betas"]), float(group["eps"]))
        m2 = torch.dot(m, m)
        row += torch.stack([
            m2, torch.dot(v, v), torch.dot(u, u), torch.dot(w, w), m2 / (bc1 * bc1),
            v.sum() / bc2, root_v.sum() / math.sqrt(bc2), torch.tensor(float(m.numel()), dtype=torch.float64, device=m.device),
        ])  # fmt: skip
        if keep:
            pieces.append(u)
    u = torch.cat(pieces).reshape(shape) if keep else torch.empty(0)
    return row.cpu(), step, u


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
