"""A metric defined here, outside the package, and registered by name is a first-class metric.

It declares its own memory modes, time cost and scaling rule on the :class:`Metric` class
and touches no other file; then it is planned by the memory budget (its lean mode picked),
scaled to its share of a save's time budget (its own ``scaled_to`` ran, and the scaled
config is the one measured), drawn (the default figure), listed in ``uma backfill --help``
and measured by name by each trigger: the Trainer callback, ``attach`` on an Accelerator
and ``backfill()`` of the saved checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer_cases import run_trainer, tiny_lm, tiny_lm_dataset
from uma_callbacks.metrics import METRICS, register_metric
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult
from uma_callbacks.metrics.time_cost import Scaling, UnitCosts

pytestmark = pytest.mark.slow

#: rounds asked for: a million forwards, far beyond any share of the save's budget
ROUNDS = 10**6


class Rounds(Metric):
    """The mean probe loss, with a declared cost of ``n_rounds`` forwards (it runs one)."""

    name = "rounds_outside_test"
    needs_grad = False

    def __init__(self, n_rounds: int = ROUNDS, *, chunk_size: int | None = None, timeout_seconds: float | None = None) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        self.n_rounds = n_rounds

    def memory_modes(self) -> list[tuple[str, Cost]]:
        # the fast mode holds a TiB: only the lean one fits the run's budget
        return [("wide", Cost(forward_only=True, fixed_bytes=2**40)), ("lean", Cost(forward_only=True))]

    def time_cost(self, units: UnitCosts) -> float:
        return self.n_rounds * units.forward

    def scaled_to(self, seconds: float, units: UnitCosts) -> tuple[Rounds, dict[str, list]]:
        if self.time_cost(units) <= seconds:
            return self, {}
        scaling = Scaling(self)
        scaling.set("n_rounds", max(1, int(seconds / max(units.forward, 1e-12))))
        return scaling.done()

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for chunk in ctx.chunks():
                total += ctx.loss_fn(ctx.model, chunk).to(torch.float64).sum()
        ctx.collective.sum_([total])
        lean = getattr(self, "_memory_mode", "") == "lean"
        return MetricResult(self.name, scalars={"loss": float(total) / ctx.n_total(), "rounds": float(self.n_rounds), "lean": float(lean)})


@pytest.fixture
def registered(monkeypatch):
    """Rounds registered through the public API; the registry is as it was after the test."""
    monkeypatch.setitem(METRICS, Rounds.name, Rounds)  # undone after the test: the name was free before
    del METRICS[Rounds.name]
    assert register_metric(Rounds) is Rounds
    return Rounds.name


def test_a_metric_registered_outside_is_planned_scaled_drawn_listed_and_run_by_every_trigger(registered, tmp_path, capsys):
    from accelerate import Accelerator

    from uma_callbacks import UMACallback, UMAConfig, attach
    from uma_callbacks.cli import main
    from uma_callbacks.triggers.backfill import backfill

    name = registered
    assert [type(m) for m in UMAConfig(metrics=[name]).metric_objects] == [Rounds]

    # listed, with its option, in `uma backfill --help`
    with pytest.raises(SystemExit) as done:
        main(["backfill", "--help"])
    assert done.value.code == 0
    assert f"  {name}: n_rounds={ROUNDS}" in capsys.readouterr().out

    # the Trainer callback: planned within 10 MiB, scaled to its share of 0.5 s, drawn
    run = tmp_path / "run"
    callback = UMACallback(
        metrics=[name], probe=tiny_lm_dataset(n=8, seed=3), probe_size=8, trackers=[], seed=0,
        memory_budget=0.01, seconds_per_save=0.5,
    )  # fmt: skip
    run_trainer(run, callbacks=[callback], max_steps=2, save_steps=2)
    [record] = callback.records
    assert record.status == "ok", record.error
    assert record.meta["memory_mode"] == "lean" and record.scalars["lean"] == 1.0
    before, after = record.meta["compute_budget"]["scaled"]["n_rounds"]
    assert before == ROUNDS and 1 <= after < ROUNDS
    assert record.meta["config"]["n_rounds"] == after and record.scalars["rounds"] == after
    figure = run / "uma" / "step-2" / f"{name}-scalars.png"
    assert figure.read_bytes().startswith(b"\x89PNG")

    # attach on an Accelerator, with the Trainer's weights: the same loss
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_lm())
    from uma_callbacks.checkpoints import load_into, load_weights

    load_into(accelerator.unwrap_model(model), load_weights(run / "checkpoint-2"))
    handle = attach(accelerator, [name], callback.probe, trackers=[], output_dir=str(tmp_path / "acc" / "uma"),
                    draw_figures=False, seed=0, global_step=2)  # fmt: skip
    accelerator.save_state(str(tmp_path / "acc" / "checkpoint-2"))
    handle.remove()
    [hooked] = handle.records
    assert hooked.status == "ok" and hooked.scalars["loss"] == pytest.approx(record.scalars["loss"], rel=1e-6)

    # backfill() of the saved checkpoint, by name
    summary = backfill(run, metrics=[name], output_dir=str(tmp_path / "again"), use_cache=False, trajectory=False,
                       draw_figures=False, progress=False, check_probe=False)  # fmt: skip
    assert summary.ok, summary.describe()
    [filled] = summary.records
    assert filled.metric == name and filled.step == 2
    assert filled.scalars["loss"] == pytest.approx(record.scalars["loss"], rel=1e-6)
