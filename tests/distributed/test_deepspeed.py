"""DeepSpeed ZeRO-3 runs are refused with a clear message (parameters are placeholders)."""

from __future__ import annotations

import torch

from uma_callbacks.config import UMAConfig
from uma_callbacks.core.sharding import deepspeed_zero3_reason
from uma_callbacks.engine.probe import Probe
from uma_callbacks.session import Session


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2)).double()


def _loss(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).sum(-1)


def test_reason_names_zero3_only_for_partitioned_parameters():
    model = _model()
    assert deepspeed_zero3_reason(model) == ""
    model[0].weight.ds_id = 0  # what deepspeed.zero.Init puts on every partitioned parameter
    reason = deepspeed_zero3_reason(model)
    assert "ZeRO-3" in reason and "ds_id" in reason and "uma backfill" in reason


def test_session_records_the_refusal_and_leaves_the_model_alone(tmp_path):
    model = _model()
    model[0].weight.ds_numel = model[0].weight.numel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"x": torch.randn(4, 3, dtype=torch.float64), "y": torch.randn(4, 2, dtype=torch.float64)}
    session = Session(UMAConfig(metrics=["gradient_flow"], loss_fn=_loss, use_cache=False, draw_figures=False),
                      tmp_path / "uma", source="callback")  # fmt: skip
    session.open(Probe([batch]), save=False)
    records = session.measure(model, 1)
    assert [(r.metric, r.status) for r in records] == [("deepspeed_zero3", "error")]
    assert "does not measure DeepSpeed ZeRO-3" in records[0].error["message"]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert session.journal is not None and "deepspeed_zero3" in (tmp_path / "uma" / "journal.jsonl").read_text()
