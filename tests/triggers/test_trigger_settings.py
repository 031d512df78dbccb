"""Trigger settings are validated in one place (``session.UNSUPPORTED``): honoured, or refused.

``attach(overhead=0.05)`` was silently ignored (no ``compute_budget`` in the records' meta),
and so was ``log_scalars``; ``backfill`` built its config twice and finished every sink as
its own, the user's sink objects included.
"""

from __future__ import annotations

import pytest
import torch

from tests.cases import mlp_case
from tests.test_checkpoints import fake_trainer_run
from uma_callbacks import attach
from uma_callbacks.config import UMAConfig
from uma_callbacks.engine.probe import Probe
from uma_callbacks.integrations import MemorySink
from uma_callbacks.session import Session
from uma_callbacks.triggers.backfill import backfill

accelerate = pytest.importorskip("accelerate")


def _accelerated():
    from accelerate import Accelerator

    model, batches, loss_fn = mlp_case()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, batches, loss_fn


def test_attach_honours_overhead(tmp_path):
    """A real Accelerate loop on the tiny MLP: with ``overhead`` every save's record carries
    its compute budget, a share of the training time since the last measurement."""
    accelerator, model, optimizer, batches, loss_fn = _accelerated()
    state = {"step": 0}
    handle = attach(
        accelerator, ["gradient_flow"], batches, global_step=lambda: state["step"], trackers=[],
        output_dir=str(tmp_path / "uma"), loss_fn=loss_fn, draw_figures=False, overhead=0.5,
    )  # fmt: skip
    for _ in range(2):
        loss = loss_fn(model, batches[0]).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    state["step"] = 2
    accelerator.save_state(str(tmp_path / "ckpt-2"))
    handle.remove()
    (record,) = handle.records
    budget = record.meta["compute_budget"]  # half the training time since attach
    assert 0 < budget["save_seconds"] < 60 and "fits" in budget


@pytest.mark.parametrize(
    ("field", "value"),
    [("log_scalars", ["gradient_flow/total_norm"]), ("every_n_steps", 5)],
)
def test_attach_refuses_trainer_settings(tmp_path, field, value):
    """Trainer-only settings are refused at ``attach``, naming the field (``log_scalars`` was
    silently ignored)."""
    accelerator, _, _, batches, loss_fn = _accelerated()
    with pytest.raises(ValueError, match=field):
        attach(accelerator, ["gradient_flow"], batches, trackers=[], output_dir=str(tmp_path / "uma"),
               loss_fn=loss_fn, **{field: value})  # fmt: skip
    assert not accelerator._save_model_state_pre_hook  # nothing registered


@pytest.mark.parametrize(("field", "value"), [("overhead", 0.05), ("log_scalars", ["fisher/trace"]), ("every_n_steps", 2)])
def test_offline_sessions_refuse_training_settings(tmp_path, field, value):
    """A backfill has no training time, no step events and no Trainer log: refused, named."""
    config = UMAConfig(metrics=["gradient_flow"], trackers=[], **{field: value})
    with pytest.raises(ValueError, match=f"UMAConfig.{field}"):
        Session(config, tmp_path / "uma", source="backfill")
    Session(config, tmp_path / "uma", source="callback")  # the Trainer honours all three


class _UserSink(MemorySink):
    """A sink object the user owns: a backfill must not finish it."""

    finished = 0

    def finish(self) -> None:
        type(self).finished += 1


def test_backfill_builds_its_config_once_and_finishes_only_what_it_opened(tmp_path, monkeypatch):
    run = fake_trainer_run(tmp_path / "run", steps=(2, 4), hidden=8)
    built: list[int] = []
    real = UMAConfig.__post_init__

    def counted(self):
        built.append(1)
        real(self)

    monkeypatch.setattr(UMAConfig, "__post_init__", counted)
    sink = _UserSink()
    probe = Probe([{"input_ids": torch.randint(0, 50, (2, 6)), "labels": torch.randint(0, 50, (2, 6))}])
    summary = backfill(run, ["gradient_flow"], probe, trackers=[sink], draw_figures=False, progress=False, prefetch=False)
    assert summary.ok, summary.describe()
    assert sorted({r.metric for r in summary.records}) == ["gradient_flow", "trajectory"]
    assert _UserSink.finished == 0  # the user's sink: backfill finished it as its own
    assert len(built) == 1  # built twice to add trajectory
    assert len(sink.records) == len(summary.records)
