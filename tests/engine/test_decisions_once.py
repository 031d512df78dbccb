"""Each decision about one metric run is made once, in one place, and passed down.

The chunk (``Metric.chunk_for``), the time limit (``Metric.time_limit``, an argument, never
written into the metric), the loss (``metrics/loss_choice.resolve_loss``, once per save),
the model-state guard (once per metric, in ``compute_within_budget``) and the model's
device (``core/devices.model_device``).
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch

import uma_callbacks.core.model_state as model_state
import uma_callbacks.metrics.loss_choice as loss_choice
from uma_callbacks.engine.budget import MemoryBudget
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.metrics.base import Metric, MetricResult

ROOT = Path(__file__).resolve().parents[2]


class _TinyLM(torch.nn.Module):
    """The smallest token model: an embedding and a head (a per-sample loss over 180 tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 2)
        self.head = torch.nn.Linear(2, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def _loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"])
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"], reduction="none")
    return per_token.mean(-1)


def _batch(rows: int = 120, tokens: int = 180) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 8, (rows, tokens), generator=gen)}


class _DeadlineSeen(Metric):
    """Records the seconds left before its deadline when it ran (-1: no deadline)."""

    name = "deadline_seen"
    needs_grad = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sealed = True
        self._writes: list[str] = []

    def __setattr__(self, key: str, value) -> None:
        if getattr(self, "_sealed", False) and key != "_writes":
            self._writes.append(key)
        object.__setattr__(self, key, value)

    def _compute(self, ctx) -> MetricResult:
        left = -1.0 if ctx.deadline is None else ctx.deadline - time.monotonic()
        return MetricResult(self.name, scalars={"left": left})


def test_suite_and_compute_plan_the_same_chunk():
    """On one 120 x 180-token batch, with no memory budget, ``.compute()`` and the suite both
    cut the batch to the metric's default (512 tokens: 2 rows); the suite ran it whole (120)."""
    model, batch = _TinyLM(), _batch()
    alone = GradientFlow().compute(model, [batch], _loss).meta["chunk_size"]
    suite = MetricSuite([GradientFlow()], loss_fn=_loss, draw_figures=False)
    (record,) = suite.run(model, Probe([batch]), step=0)
    assert record.status == "ok", record.error
    assert alone == record.meta["chunk_size"] == 512 // 180


def test_a_budget_plan_is_what_compute_runs():
    """Under a memory budget the suite's chunk is the budget's plan, and ``.compute()`` given
    that plan runs it unchanged (``Metric.chunk_for`` decides both)."""
    model, batch = _TinyLM(), _batch(rows=16, tokens=8)
    suite = MetricSuite([GradientFlow()], loss_fn=_loss, draw_figures=False, budget=MemoryBudget(max_gb=1))
    (record,) = suite.run(model, Probe([batch]), step=0)
    assert record.meta["chunk_size"] == record.meta["planned_chunk_size"] == 16
    planned = record.meta["planned_chunk_size"]
    assert GradientFlow().compute(model, [batch], _loss, chunk_size=planned).meta["chunk_size"] == planned


@pytest.mark.parametrize("seconds", [None, 60.0])
def test_the_metric_is_not_written_by_a_suite_run_with_a_timeout(seconds):
    """The suite's time limit reaches the metric as an argument: no attribute is written
    (it used to set ``metric.timeout_seconds`` and put it back), and the limit holds."""
    metric = _DeadlineSeen()
    before = dict(vars(metric))
    suite = MetricSuite([metric], loss_fn=_loss, draw_figures=False, timeout_seconds=5.0)
    (record,) = suite.run(_TinyLM(), Probe([_batch(rows=4, tokens=8)]), step=0, seconds=seconds)
    assert record.status == "ok", record.error
    assert metric._writes == []
    assert {k: v for k, v in vars(metric).items() if k != "_writes"} == {k: v for k, v in before.items() if k != "_writes"}
    assert 0.0 < record.scalars["left"] <= 5.0
    own = _DeadlineSeen(timeout_seconds=2.0)  # a metric's own limit wins over the run's
    (record,) = MetricSuite([own], loss_fn=_loss, draw_figures=False, timeout_seconds=5.0).run(
        _TinyLM(), Probe([_batch(rows=4, tokens=8)]), step=0
    )
    assert 0.0 < record.scalars["left"] <= 2.0 and own._writes == []


@pytest.mark.parametrize("seconds", [None, 60.0])
def test_state_guard_and_loss_once_per_metric(monkeypatch, seconds):
    """``preserved_model_state`` is entered once per metric (planning and computing share it;
    a compute budget adds one for the save's unit costs), and the loss is resolved once per save."""
    guards: list[int] = []
    real_guard = model_state.restored_tensors  # entered by every preserved_model_state, and only there

    def counted_guard(model):
        guards.append(1)
        return real_guard(model)

    resolved: list[int] = []
    real_resolve = loss_choice.resolve_loss_fn

    def counted_resolve(model, loss_fn):
        resolved.append(1)
        return real_resolve(model, loss_fn)

    monkeypatch.setattr(model_state, "restored_tensors", counted_guard)
    monkeypatch.setattr(loss_choice, "resolve_loss_fn", counted_resolve)
    metrics = [GradientFlow(), _DeadlineSeen()]
    suite = MetricSuite(metrics, loss_fn=_loss, draw_figures=False, budget=MemoryBudget(max_gb=1))
    records = suite.run(_TinyLM(), Probe([_batch(rows=4, tokens=8)]), step=0, seconds=seconds)
    assert [r.status for r in records] == ["ok", "ok"], [r.error for r in records]
    assert len(guards) == len(metrics) + (seconds is not None)
    assert len(resolved) == 1


def test_one_device_helper():
    """ "Which device is the model on" is answered by ``core/devices.model_device`` alone: no
    other module defines a helper that returns the first parameter's device."""
    found = []
    for path in sorted((ROOT / "uma_callbacks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.FunctionDef)
                and any(
                    isinstance(n, ast.Return)
                    and isinstance(n.value, ast.Attribute)
                    and n.value.attr == "device"
                    and isinstance(n.value.value, ast.Name)
                    for n in ast.walk(node)
                )
                and any(isinstance(n, ast.For) for n in ast.walk(node))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert found == ["uma_callbacks/core/devices.py:model_device"]
