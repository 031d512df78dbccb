"""The Ray backfill reads each checkpoint's optimizer.pt and keeps a metric in the task of the metric whose results it reads."""

from __future__ import annotations

import pytest
import torch

from tests.test_checkpoints import fake_trainer_run
from tests.trainer_cases import tiny_lm_dataset
from tests.triggers.test_backfill_ray import ray_local  # noqa: F401 (the module's local Ray, a fixture)
from uma_callbacks.engine.probe import Probe, save_probe
from uma_callbacks.metrics import DirectionalSharpness, FisherInformation, OptimizerState
from uma_callbacks.triggers.backfill import backfill
from uma_callbacks.triggers.ray_backfill import plan_tasks, ray_backfill

pytestmark = pytest.mark.slow
STEPS = (1, 2)


def _metrics():
    return [OptimizerState(), DirectionalSharpness(directions=["gradient", "fisher"]), FisherInformation(top_k=2)]


def _with_optimizer_files(run):
    """Give each checkpoint an ``optimizer.pt``: two AdamW steps of its model (parameter order), saved as the Trainer saves it."""
    from transformers import AutoModelForCausalLM

    batch = {"input_ids": torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))}
    for step in STEPS:
        folder = run / f"checkpoint-{step}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            model(**batch, labels=batch["input_ids"]).loss.backward()
            opt.step()
        torch.save(opt.state_dict(), folder / "optimizer.pt")
    return run


def test_ray_backfill_reads_optimizer_pt_and_hands_fisher_on_as_in_one_process(ray_local, tmp_path):  # noqa: F811
    run = _with_optimizer_files(fake_trainer_run(tmp_path / "run", steps=STEPS))
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=3), 4), run / "uma")
    common = {"trajectory": False, "draw_figures": False, "progress": False, "use_cache": False}
    ref = backfill(run, metrics=_metrics(), output_dir=tmp_path / "ref", **common)
    # sharpness alone would be an expensive task here: it stays in fisher's task, whose results it reads
    summary = ray_backfill(run, metrics=_metrics(), output_dir=tmp_path / "uma", expensive_backwards=2.0, **common)
    assert summary.ok and summary.failed_tasks == 0, summary.describe()
    assert summary.tasks == len(STEPS) and summary.split == []
    expected = {(r.step, r.metric): r for r in ref.records}
    assert {(r.step, r.metric) for r in summary.records} == set(expected)
    for record in summary.records:
        want = expected[(record.step, record.metric)]
        assert record.status == want.status and record.status in ("ok", "partial"), (record.metric, record.error)
        assert "results_missing" not in record.meta
        assert set(record.scalars) == set(want.scalars), record.metric
        for key, value in want.scalars.items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (record.step, record.metric, key)
        if record.metric == "optimizer_state":
            assert record.meta["optimizer_source"] == f"checkpoint-{record.step}/optimizer.pt"
            assert record.scalars["step"] == 2.0 and "fisher_spearman" in record.scalars
        if record.metric == "sharpness":
            assert "fisher/curvature" in record.scalars


def test_the_plan_keeps_a_metric_with_the_metrics_whose_results_it_reads():
    from uma_callbacks.config import UMAConfig

    cfg = UMAConfig(metrics=["gradient_flow", "landscape:n_points=5", *_metrics()])
    names = cfg.metric_names
    assert [t.metrics for t in plan_tasks(1, cfg, n_batches=1, threshold=2.0)] == [
        ("gradient_flow", "optimizer_state", "sharpness", "fisher"), ("landscape",),
    ]  # fmt: skip
    # everything expensive: the consumers join fisher's task, the others keep their own
    assert [t.metrics for t in plan_tasks(1, cfg, n_batches=1, threshold=0.0)] == [
        ("gradient_flow",), ("landscape",), ("optimizer_state", "sharpness", "fisher"),
    ]  # fmt: skip
    assert names == ["gradient_flow", "landscape", "optimizer_state", "sharpness", "fisher"]
