"""The cache key covers everything that changes a result: weights and persistent buffers,
the loss function, the model's dtype and attention implementation, the metric's settings.

A cached value is one measured on the very same thing; anything else is computed again.
The same loss in another process (a backfill after the live run) still hits the cache;
a loss that cannot be identified turns the cache off for the run, with one warning.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.cases import ragged_lm_batches, tiny_qwen2
from uma_callbacks.config import UMAConfig
from uma_callbacks.core.loss_identity import loss_identity
from uma_callbacks.engine.probe import Probe
from uma_callbacks.metrics import GradientFlow, LossLandscape
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult
from uma_callbacks.session import Session

REPO = Path(__file__).resolve().parents[2]


class BatchNormNet(torch.nn.Module):
    """4 -> 6 -> BatchNorm -> tanh -> 2: its running statistics change what it computes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.fc(x))))


def squared_error(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample squared error."""
    return ((model(batch["x"]) - batch["y"]) ** 2).sum(dim=-1)


def squared_error_x10(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Ten times :func:`squared_error`: another loss, the same weights."""
    return 10 * ((model(batch["x"]) - batch["y"]) ** 2).sum(dim=-1)


def _probe() -> Probe:
    gen = torch.Generator().manual_seed(1)
    return Probe([{"x": torch.randn(8, 4, generator=gen), "y": torch.randn(8, 2, generator=gen)}])


def _session(root: Path, loss_fn, metrics=None) -> Session:
    metrics = metrics if metrics is not None else [LossLandscape(n_points=3)]
    session = Session(
        UMAConfig(metrics=metrics, loss_fn=loss_fn, draw_figures=False), root, source="callback"
    )
    session.open(_probe())
    return session


def _bn_model() -> BatchNormNet:
    model = BatchNormNet()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 6))
        model.bn.running_var.copy_(torch.linspace(0.5, 2.0, 6))
    return model.eval()


def test_buffers_alone_changed_miss_the_cache(tmp_path):
    model = _bn_model()
    first = _session(tmp_path / "uma", squared_error).measure(model, 1)[0]
    with torch.no_grad():  # what SWA's update_bn does: new running statistics, same parameters
        model.bn.running_mean.mul_(-3.0)
        model.bn.running_var.mul_(4.0)
    second = _session(tmp_path / "uma", squared_error).measure(model, 2)[0]
    fresh = _session(tmp_path / "fresh", squared_error).measure(model, 2)[0]
    assert first.status == "ok" and second.status == "ok", (first.status, second.status)
    assert second.scalars["center_loss"] == pytest.approx(fresh.scalars["center_loss"])
    assert abs(second.scalars["center_loss"] - first.scalars["center_loss"]) > 1e-3


def test_another_loss_misses_the_cache_and_the_same_loss_hits_it(tmp_path):
    model = _bn_model()
    base = _session(tmp_path / "uma", squared_error).measure(model, 1)[0]
    scaled = _session(tmp_path / "uma", squared_error_x10).measure(model, 1)[0]
    again = _session(tmp_path / "uma", squared_error).measure(model, 1)[0]
    assert base.status == "ok" and scaled.status == "ok"
    assert scaled.scalars["center_loss"] == pytest.approx(10 * base.scalars["center_loss"])
    assert again.status == "cached" and again.scalars == base.scalars


def test_a_loss_has_the_same_identity_in_another_process():
    code = (
        "from tests.reliability.test_cache_identity import squared_error\n"
        "from uma_callbacks.core.loss_identity import loss_identity\n"
        "print(loss_identity(squared_error)[0], loss_identity(None)[0])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [loss_identity(squared_error)[0], loss_identity(None)[0]]
    assert loss_identity(squared_error)[0] != loss_identity(squared_error_x10)[0]


def _factor(k: float):
    def loss(model, batch):
        return k * squared_error(model, batch)

    return loss


def test_closure_values_are_part_of_the_identity():
    assert loss_identity(_factor(2.0))[0] == loss_identity(_factor(2.0))[0]
    assert loss_identity(_factor(2.0))[0] != loss_identity(_factor(3.0))[0]


def test_an_unidentifiable_loss_turns_the_cache_off_with_one_warning(tmp_path, caplog):
    lock = threading.Lock()  # no stable identity: the loss could depend on anything

    def guarded(model, batch):
        with lock:
            return squared_error(model, batch)

    model = _bn_model()
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        session = _session(tmp_path / "uma", guarded)
        first = session.measure(model, 1)[0]
        second = session.measure(model, 2)[0]  # same weights: a hit if there were a cache
    assert first.status == "ok" and second.status == "ok"
    assert first.cache_key == "" and second.cache_key == ""
    warnings = [m for m in caplog.messages if "not cached" in m]
    assert len(warnings) == 1 and "lock" in warnings[0], caplog.messages


def test_attention_implementation_and_dtype_are_part_of_the_key(tmp_path):
    model = tiny_qwen2(dtype=torch.float32, attn="sdpa")
    probe = Probe(ragged_lm_batches(vocab=40, n_batches=1))
    session = Session(
        UMAConfig(metrics=[GradientFlow()], draw_figures=False), tmp_path / "uma", source="callback"
    )
    session.open(probe)
    assert session.measure(model, 1)[0].status == "ok"
    model.config._attn_implementation = "eager"
    assert session.measure(model, 2)[0].status == "ok"
    model.config._attn_implementation = "sdpa"
    assert session.measure(model, 3)[0].status == "cached"
    assert session.measure(model.to(torch.float64), 4)[0].status == "ok"


class Weighted(Metric):
    """The probe loss weighted per sample: a tensor setting that ``config()`` only describes by shape."""

    name = "weighted"

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        with torch.no_grad():
            losses = torch.cat([ctx.loss_fn(ctx.model, b) for b in ctx.batches])
        return MetricResult(name=self.name, scalars={"loss": float((losses * self.weights).sum())})


def test_a_metric_setting_with_the_same_shape_and_other_values_misses(tmp_path):
    model = _bn_model()
    ones = _session(tmp_path / "uma", squared_error, [Weighted(torch.ones(8))]).measure(model, 1)[0]
    twos = _session(tmp_path / "uma", squared_error, [Weighted(2 * torch.ones(8))]).measure(model, 1)[0]
    assert ones.status == "ok" and twos.status == "ok"
    assert twos.scalars["loss"] == pytest.approx(2 * ones.scalars["loss"])


def test_backfill_of_a_model_with_buffers_hits_the_live_runs_cache(tmp_path):
    from uma_callbacks.triggers.backfill import backfill

    run = tmp_path / "run"
    model = _bn_model()
    live = _session(run / "uma", squared_error).measure(model, 4)[0]
    folder = run / "checkpoint-4"
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))  # buffers too, as save_pretrained does
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bn-net", "architectures": ["BatchNormNet"]})
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    summary = backfill(
        run,
        metrics=[LossLandscape(n_points=3)],
        loss_fn=squared_error,
        model_factory=lambda path, config: BatchNormNet(),
        trajectory=False,
        draw_figures=False,
        progress=False,
        device="cpu",
    )
    assert summary.ok, summary.describe()
    assert live.status == "ok" and [r.status for r in summary.records] == ["cached"]
    assert summary.records[0].scalars == live.scalars


class ScaledError:
    """A loss object with a setting the user may change between saves."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * ((model(batch["x"]) - batch["y"]) ** 2).sum(dim=-1)


def test_a_loss_objects_setting_changed_between_saves_misses_the_cache(tmp_path):
    """One session, one loss object: its identity is taken at every save, not once per run."""
    model, loss = _bn_model(), ScaledError(1.0)
    session = _session(tmp_path / "uma", loss)
    first = session.measure(model, 1)[0]
    loss.scale = 10.0
    second = session.measure(model, 2)[0]  # the same weights, another loss
    assert first.status == "ok" and second.status == "ok", (first.status, second.status)
    assert second.scalars["center_loss"] == pytest.approx(10 * first.scalars["center_loss"])
