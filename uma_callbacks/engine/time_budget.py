"""The compute budget of one save: the time twin of the memory budget.

``UMAConfig(overhead=0.05)`` allows the metrics 5% of the training wall time since the
last measured save (``seconds_per_save=`` caps it in seconds). Before a save's metrics
run, the session measures the probe's unit costs once (one forward, one forward+backward,
one Hessian-vector product of the whole local probe, :class:`UnitCosts`), and each metric
says what it costs in them and how it fits less: :meth:`Metric.time_cost
<uma_callbacks.metrics.base.Metric.time_cost>` predicts its seconds,
:meth:`Metric.scaled_to <uma_callbacks.metrics.base.Metric.scaled_to>` gives the config it
runs within a share and the knobs it turned down, :meth:`Metric.min_time_cost
<uma_callbacks.metrics.base.Metric.min_time_cost>` its floor. This module only measures
the units and shares the budget among the metrics in proportion to their predictions; it
never asks which metric it is, so a metric registered from outside the package is
scaled like a built-in one.

Each metric documents its own order in its ``scaled_to`` (fewer Hutchinson probes before
fewer Lanczos products, a coarser grid before fewer probe batches, ...). A metric with no
knob keeps its config (the default: one backward and a half, not scaled). A metric that
cannot fit even scaled down is skipped with the reason, the costliest first, and its
share goes to the others (:func:`share_budget`). What was scaled, the predicted seconds
and the share land in ``meta["compute_budget"]``; the accuracy that resulted is in the
metric's own outputs (``trace_stderr``, Lanczos residuals, grid size).

The predictions are calibrated as the run goes: after each save, every metric's measured
seconds over its prediction updates a per-metric factor (an average of the last ratios),
so a model with overheads the unit costs miss (per-sample gradients, an eager softmax) is
planned right from the second save on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uma_callbacks.core.batches import count_samples
from uma_callbacks.metrics.base import Metric
from uma_callbacks.metrics.time_cost import UnitCosts

#: a plan fits when its predicted seconds are at most this multiple of its share
FIT_SLACK = 1.5

#: Measured on the real MiniLM (16-sample probe): a double-backward HVP costs ~2.4 fwd+bwd.
HVP_OVER_BACKWARD = 2.5


def measure_unit_costs(model: torch.nn.Module, batches: Sequence[Any], loss_fn: Callable[..., torch.Tensor]) -> UnitCosts:
    """Time one forward and one forward+backward on the first probe batch, scaled to the probe.

    The model's ``.grad`` fields are left as found (gradients are taken with ``autograd.grad``).
    """
    first = batches[0]
    share = sum(count_samples(b) for b in batches) / max(1, count_samples(first))
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss_fn(model, first)  # warm-up: first-call overheads are not the metric's
            started = time.perf_counter()
            loss_fn(model, first)
            forward = time.perf_counter() - started
        started = time.perf_counter()
        loss = loss_fn(model, first).sum()
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
        backward = time.perf_counter() - started
    finally:
        model.train(was_training)
    return UnitCosts(
        forward=forward * share,
        backward=backward * share,
        hvp=HVP_OVER_BACKWARD * backward * share,
        n_batches=len(batches),
    )


def share_budget(
    metrics: Sequence[Metric], units: UnitCosts, seconds: float, calibration: Mapping[str, float] | None = None
) -> list[float]:
    """Each metric's share of ``seconds`` (water-filling, cheapest first).

    Cheap metrics get what they need, the expensive ones split the rest equally.
    A metric that cannot fit its share even scaled down (its floor above :data:`FIT_SLACK`
    x the share) gets nothing, the one with the largest floor first, and the shares are
    filled again without it: as many metrics run as the budget allows, instead of all of
    them sharing a budget none can use.

    Example:
        >>> units = UnitCosts(forward=0.1, backward=0.3, hvp=0.75, n_batches=1)
        >>> from uma_callbacks.metrics import GradientFlow, HessianSpectrum, LossLandscape
        >>> [round(s, 3) for s in share_budget([GradientFlow(), HessianSpectrum(), LossLandscape()], units, 40.0)]
        [0.45, 19.775, 19.775]
        >>> [round(s, 3) for s in share_budget([GradientFlow(), HessianSpectrum(), LossLandscape()], units, 3.0)]
        [0.45, 0.0, 2.55]
    """
    factors = calibration or {}
    estimates = [m.time_cost(units) * factors.get(m.name, 1.0) for m in metrics]
    floors = [m.min_time_cost(units) * factors.get(m.name, 1.0) for m in metrics]
    kept = sorted(range(len(metrics)), key=lambda i: estimates[i])
    while True:
        shares = [0.0] * len(metrics)
        remaining = float(seconds)
        for rank, i in enumerate(kept):
            shares[i] = min(estimates[i], remaining / (len(kept) - rank))
            remaining -= shares[i]
        short = [i for i in kept if floors[i] > FIT_SLACK * shares[i]]
        if not short:
            return shares
        kept.remove(max(short, key=lambda i: floors[i]))


#: The bank holds at most this many saves' budgets; a metric whose floor needs more is never run (one warning).
BANK_SAVES = 10


def units_key(model: torch.nn.Module, probe_fingerprint: str, world_size: int = 1) -> str:
    """What the unit costs depend on: the parameters' names, shapes, dtypes and devices, the probe and the ranks.

    Two saves with the same key reuse the first one's :class:`UnitCosts` (the weights'
    values do not change how long a forward takes); a model whose shapes change (a layer
    added, a dtype cast, moved to another device) or another probe is timed again.
    """
    import hashlib

    digest = hashlib.sha256(f"{probe_fingerprint}|{world_size}".encode())
    for name, p in model.named_parameters():
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.device}|{p.requires_grad};".encode())
    return digest.hexdigest()


@dataclass
class TimeBank:
    """The compute budget carried from save to save (one per suite).

    Attributes:
        seconds: budget left unspent by earlier saves, at most :data:`BANK_SAVES` saves'
            budgets (negative: a debt, an overrun repaid from the next save's budget, at most
            one save's budget).
        steps: the steps whose unspent budget makes up ``seconds`` (the latest
            :data:`BANK_SAVES`).
        waiting: ``{metric name: step it first waited at}``, in the order they began to
            wait: the longest-waiting metric runs first when the bank covers it.
        warned: metrics warned about once as too costly for any save.
        units: the unit costs measured last, with :attr:`units_key` and :attr:`units_step`.
        units_key: :func:`units_key` of the model and probe the units were measured on.
        units_step: the step they were measured at (``-1``: before training).
        units_seconds: what measuring them took.
    """

    seconds: float = 0.0
    steps: list[int] = field(default_factory=list)
    waiting: dict[str, int] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    units: UnitCosts | None = None
    units_key: str = ""
    units_step: int = -1
    units_seconds: float = 0.0

    def charge(self, seconds: float) -> None:
        """Owe ``seconds`` spent for the metrics outside a save (the figure worker's drawing): the next save pays them.

        The debt lowers the next save's own budget (:func:`plan_save`: ``seconds`` less the
        debt), so that save scales its metrics down or makes them wait, saying why;
        :meth:`settle` then keeps at most one save's budget of it.
        """
        if seconds <= 0.0:
            return
        self.seconds -= seconds
        if self.seconds <= 0.0:
            self.steps = []

    def settle(self, step: int, own_seconds: float, spent: float) -> None:
        """Bank what a save left of its own budget, up to :data:`BANK_SAVES` saves' worth, or owe what it overran, up to one save's."""
        cap = BANK_SAVES * max(own_seconds, 0.0)
        # an overrun is owed up to one save's budget: repaying more would starve every metric for saves on end
        self.seconds = min(cap, max(-max(own_seconds, 0.0), self.seconds + own_seconds - spent))
        if self.seconds <= 0.0:
            self.steps = []
        elif own_seconds > spent:  # this save added to it
            self.steps = [*self.steps, int(step)][-BANK_SAVES:]


@dataclass(frozen=True)
class SavePlan:
    """What one save runs, decided by :func:`plan_save`.

    Attributes:
        shares: ``{metric name: seconds}`` for every metric that runs.
        from_bank: the names among them that run on banked budget.
        waiting: ``{name: why}`` for a metric that waits for the bank.
        never: ``{name: floor seconds}`` for a metric whose floor does not fit even
            :data:`BANK_SAVES` saves' budgets.
        own_seconds: this save's own budget (less a debt and the calibration it paid).
        bank_seconds: the bank it could draw on.
    """

    shares: dict[str, float]
    from_bank: tuple[str, ...]
    waiting: dict[str, str]
    never: dict[str, float]
    own_seconds: float
    bank_seconds: float


def plan_save(
    metrics: Sequence[Metric],
    units: UnitCosts,
    seconds: float,
    bank: TimeBank,
    step: int,
    calibration: Mapping[str, float] | None = None,
    paid: float = 0.0,
) -> SavePlan:
    """Share one save's budget, and the bank, among ``metrics`` (every rank decides alike).

    The rule:

    1. A metric whose floor (:meth:`Metric.min_time_cost`, calibrated) exceeds
       :data:`FIT_SLACK` x :data:`BANK_SAVES` x ``seconds`` never runs at this rate
       (``never``; the caller warns once).
    2. The save's own budget (``seconds``, less a debt in the bank and ``paid``, the
       calibration timed at this save) is shared as :func:`share_budget` shares it.
    3. The metrics that did not fit wait in line, longest-waiting first (then the cheapest
       floor): the head of the line runs when its floor fits :data:`FIT_SLACK` x (the
       bank + what step 2 left), with what it needs of that; the next one only after it, so
       a cheap metric never starves a costly one of the bank.

    Example:
        >>> from uma_callbacks.metrics import GradientFlow, LossLandscape
        >>> units = UnitCosts(forward=0.05, backward=0.15, hvp=0.4, n_batches=2)
        >>> bank = TimeBank()
        >>> metrics = [GradientFlow(), LossLandscape(n_points=11)]
        >>> plan = plan_save(metrics, units, 0.5, bank, step=40)  # the grid's floor, 0.31 s, waits
        >>> [round(plan.shares.get(m.name, 0.0), 3) for m in metrics], len(plan.waiting)
        ([0.225, 0.0], 1)
        >>> bank.settle(40, 0.5, 0.3)  # what the save left is banked
        >>> plan = plan_save(metrics, units, 0.5, bank, step=80)
        >>> [round(plan.shares.get(m.name, 0.0), 3) for m in metrics], len(plan.from_bank)
        ([0.225, 0.475], 1)
    """
    factors = calibration or {}
    cap = BANK_SAVES * max(seconds, 0.0)
    floors = {m.name: m.min_time_cost(units) * factors.get(m.name, 1.0) for m in metrics}
    estimates = {m.name: m.time_cost(units) * factors.get(m.name, 1.0) for m in metrics}
    never = {m.name: floors[m.name] for m in metrics if floors[m.name] > FIT_SLACK * cap}
    candidates = [m for m in metrics if m.name not in never]
    own = max(0.0, seconds + min(bank.seconds, 0.0) - paid)
    banked = max(bank.seconds, 0.0)
    own_shares = share_budget(candidates, units, own, factors)
    shares = {m.name: s for m, s in zip(candidates, own_shares) if s > 0.0 and floors[m.name] <= FIT_SLACK * s}
    pool = banked + max(0.0, own - sum(shares.values()))
    line = sorted(
        (m.name for m in candidates if m.name not in shares),
        key=lambda n: (bank.waiting.get(n, step), floors[n]),
    )
    from_bank: list[str] = []
    waiting: dict[str, str] = {}
    for name in line:
        if not waiting and floors[name] <= FIT_SLACK * pool:
            shares[name] = min(estimates[name], pool)
            pool -= shares[name]
            from_bank.append(name)
            continue
        since = bank.waiting.get(name, step)
        waiting[name] = (
            f"needs about {floors[name]:.2f} s even scaled down; this save has {own:.2f} s and the bank "
            f"{banked:.2f} s" + (f" (banked over steps {', '.join(map(str, bank.steps))})" if bank.steps else "")
            + (f"; waiting since step {since}" if since != step else "")
            + ("; it runs when the bank covers it" if not waiting else f"; it runs after {next(iter(waiting))}")
        )  # fmt: skip
    return SavePlan(shares, tuple(from_bank), waiting, never, own, banked)


def overhead_needed(floor: float, seconds: float, overhead: float | None) -> tuple[float, float] | None:
    """``(overhead to run every BANK_SAVES-th save, overhead to run at every save)`` for a metric of ``floor`` seconds.

    ``None`` when the budget is not a share of training time (``overhead`` unset) or ``seconds`` is 0.
    """
    if overhead is None or seconds <= 0.0:
        return None
    per_unit = overhead / seconds  # overhead per second of budget
    return floor / (FIT_SLACK * BANK_SAVES) * per_unit, floor / FIT_SLACK * per_unit
