"""UMALightningCallback hands the Lightning trainer's live optimizer to ``optimizer_state``."""

from __future__ import annotations

import pytest
import torch

from tests.triggers.test_lightning import fit  # skips this module too where lightning is missing
from uma_callbacks.core.optimizer_state import from_optimizer
from uma_callbacks.metrics import OptimizerState

pytestmark = pytest.mark.slow


def test_optimizer_state_reads_the_trainers_live_adamw_at_each_checkpoint(tmp_path):
    from uma_callbacks.triggers.lightning import UMALightningCallback

    callback = UMALightningCallback(metrics=["optimizer_state"], probe_size=8, trackers=[], draw_figures=False, seed=0)
    trainer, module = fit(tmp_path, [callback])
    records = callback.records
    assert [(r.step, r.metric, r.status) for r in records] == [(2, "optimizer_state", "ok"), (4, "optimizer_state", "ok")]
    assert [r.scalars["step"] for r in records] == [2.0, 4.0]  # Adam's own step count at each save
    assert records[0].meta["optimizer"] == "AdamW" and records[0].meta["optimizer_source"] == "optimizer"
    # the last save is the state the optimizer holds now: the same values computed on it directly
    (optimizer,) = trainer.optimizers
    inner = module.model  # the module measured by default (the LightningModule's transformers model)
    batches = [torch.zeros(1)]
    direct = OptimizerState().compute(inner, batches, lambda m, b: b, optimizer_state=from_optimizer(optimizer, inner))
    assert set(records[1].scalars) - {"over_budget"} == set(direct.scalars) and len(direct.scalars) > 20  # the suite adds over_budget
    for key, value in direct.scalars.items():
        assert records[1].scalars[key] == pytest.approx(value, rel=1e-12), key
    assert records[1].scalars["groups/0/lr"] == 1e-2
