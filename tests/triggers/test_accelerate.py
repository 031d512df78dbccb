"""``attach(accelerator)``: measure at ``save_state`` with the user's global step; remove() undoes it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cases import mlp_case
from uma_callbacks import attach
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.triggers.accelerate import STATE_FILE, AcceleratorTrackerSink, read_state

accelerate = pytest.importorskip("accelerate")
REPO = Path(__file__).resolve().parents[2]


def _accelerated(**kwargs):
    from accelerate import Accelerator

    model, batches, loss_fn = mlp_case()
    accelerator = Accelerator(cpu=True, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, batches, loss_fn


def _train_step(model, optimizer, batches, loss_fn, accelerator):
    loss = loss_fn(model, batches[0]).mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def test_save_state_measures_at_the_given_step_and_writes_metadata(tmp_path):
    accelerator, model, optimizer, batches, loss_fn = _accelerated()
    state = {"step": 0}
    handle = attach(
        accelerator,
        metrics=["gradient_flow"],
        probe=batches,
        global_step=lambda: state["step"],
        trackers=[],
        output_dir=str(tmp_path / "uma"),
        loss_fn=loss_fn,
        draw_figures=False,
    )
    for step in (1, 2, 3):
        _train_step(model, optimizer, batches, loss_fn, accelerator)
        state["step"] = step * 10  # a global step unrelated to Accelerate's save counter
        if step in (1, 3):
            accelerator.save_state(str(tmp_path / f"ckpt-{step}"))
    assert [(r.step, r.metric, r.status) for r in handle.records] == [(10, "gradient_flow", "ok"), (30, "gradient_flow", "ok")]
    meta = read_state(tmp_path / "ckpt-3")
    assert meta["step"] == 30 and meta["format"] == "uma-state/1"
    assert meta["records"][0]["record_id"] == handle.records[1].record_id
    assert meta["journal"] == str((tmp_path / "uma").resolve())
    # the numbers are those of the model as saved (one process: the whole probe)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ckpt-3" / "model.safetensors"))
    reference, _, _ = mlp_case()
    reference.load_state_dict(saved)
    expected = GradientFlow().compute(reference, batches, loss_fn).scalars["total_norm"]
    assert handle.records[1].scalars["total_norm"] == pytest.approx(expected, rel=1e-12)
    assert [(r.step, r.source) for r in Journal(tmp_path / "uma").records()] == [(10, "accelerate"), (30, "accelerate")]
    # remove() undoes attach: no hook, nothing measured, no metadata file
    handle.remove()
    accelerator.save_state(str(tmp_path / "ckpt-after"))
    assert len(handle.records) == 2 and not (tmp_path / "ckpt-after" / STATE_FILE).exists()
    assert not accelerator._save_model_state_pre_hook


def test_handle_step_and_missing_step(tmp_path, caplog):
    accelerator, model, _, batches, loss_fn = _accelerated()
    handle = attach(accelerator, ["gradient_flow"], batches, trackers=[], output_dir=str(tmp_path / "uma"),
                    loss_fn=loss_fn, draw_figures=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        accelerator.save_state(str(tmp_path / "no-step"))  # training goes on, nothing measured
    assert handle.records == [] and "global step" in caplog.text
    assert not (tmp_path / "no-step" / STATE_FILE).exists()
    handle.step = 7
    accelerator.save_state(str(tmp_path / "seven"))
    assert [r.step for r in handle.records] == [7]
    assert json.loads((tmp_path / "seven" / STATE_FILE).read_text())["step"] == 7
    handle.remove()


class ListTracker:
    """An Accelerate ``GeneralTracker`` test double that keeps what it is given."""

    name = "listtracker"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []
        self.config: dict = {}

    @property
    def tracker(self):
        return self

    def start(self):
        pass

    def store_init_configuration(self, values):
        self.config.update(values)

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        pass


def test_logs_through_the_accelerators_trackers(tmp_path):
    from accelerate.tracking import GeneralTracker

    class Tracker(ListTracker, GeneralTracker):
        def __init__(self):
            ListTracker.__init__(self)
            GeneralTracker.__init__(self)

    tracker = Tracker()
    accelerator, model, _, batches, loss_fn = _accelerated(log_with=[tracker])
    accelerator.init_trackers("uma-test")
    handle = attach(accelerator, ["gradient_flow"], batches, global_step=12, output_dir=str(tmp_path / "uma"),
                    loss_fn=loss_fn, draw_figures=False)  # fmt: skip
    accelerator.save_state(str(tmp_path / "s12"))
    accelerator.save_state(str(tmp_path / "s12-again"))  # same step: not measured twice
    assert isinstance(handle.sinks[0], AcceleratorTrackerSink)
    assert [step for step, _ in tracker.logged] == [12]
    values = tracker.logged[0][1]
    assert values["uma/gradient_flow/total_norm"] == handle.records[0].scalars["total_norm"]
    assert tracker.config["uma.probe_fingerprint"] == handle.probe.fingerprint
    handle.remove()
    accelerator.end_training()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"probe": None}, "probe"),
        ({"global_step": "ten"}, "global_step"),
        ({"every_n_steps": 5}, "every_n_steps"),
        ({"trackers": ["neptune"]}, "trackers"),
        ({"metrics": ["fishr"]}, "metrics"),
        ({"probe_size": 0}, "probe_size"),
        ({"model_index": -1}, "model_index"),
    ],
)
def test_bad_input_raises_at_attach(kwargs, match):
    accelerator, _, _, batches, loss_fn = _accelerated()
    args = {"metrics": ["gradient_flow"], "probe": batches, "loss_fn": loss_fn, **kwargs}
    with pytest.raises(ValueError, match=match):
        attach(accelerator, **args)
    assert not accelerator._save_model_state_pre_hook


def test_missing_tracker_package_names_the_extra(monkeypatch):
    accelerator, _, _, batches, loss_fn = _accelerated()
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match=r"uma-callbacks\[wandb\]"):
        attach(accelerator, ["gradient_flow"], batches, trackers=["wandb"], loss_fn=loss_fn)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_example_under_accelerate_launch_two_processes(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` with ``cpu=True``: two real ranks."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(REPO / "examples" / "accelerate_loop.py"), "--out", str(out), "--steps", "4", "--save-every", "2",
           "--float64"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2  # two processes really ran
    records = Journal(out / "uma").records()
    assert [(r.step, r.metric, r.status) for r in records] == [(2, "gradient_flow", "ok"), (4, "gradient_flow", "ok")]
    assert all(r.meta["world_size"] == 2 for r in records)
    for r in records:
        assert read_state(out / f"checkpoint-{r.step}")["step"] == r.step
    # the 2-rank numbers equal one process on the saved weights and the same probe
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from accelerate_loop import random_token_rows, tiny_qwen2
    finally:
        sys.path.remove(str(REPO / "examples"))
    from safetensors.torch import load_file

    from uma_callbacks.engine.probe import Probe, pad_collate

    probe = Probe.from_dataset(random_token_rows(8, 12, 50, seed=1), 8, batch_size=8, seed=42, collate_fn=pad_collate)
    assert probe.fingerprint == records[0].probe
    model = tiny_qwen2(50, torch.float64)
    model.load_state_dict(load_file(str(out / "checkpoint-4" / "model.safetensors")))
    reference = GradientFlow().compute(model, probe.batches)
    for key in ("total_norm", "noise_scale"):
        assert records[1].scalars[key] == pytest.approx(reference.scalars[key], rel=1e-6)


def test_joins_the_accelerators_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from tests.integrations.wandb_runfile import history_rows, settled_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    try:
        accelerator, model, _, batches, loss_fn = _accelerated(log_with="wandb")
        accelerator.init_trackers("uma-test", init_kwargs={"wandb": {"dir": str(tmp_path)}})
        accelerator.log({"train/loss": 1.0}, step=40)  # the run's own step is ahead of ours
        handle = attach(accelerator, ["gradient_flow"], batches, global_step=5, output_dir=str(tmp_path / "uma"),
                        loss_fn=loss_fn, draw_figures=False)  # fmt: skip
        accelerator.save_state(str(tmp_path / "s5"))
        assert handle.sinks[0].name == "wandb" and not handle.sinks[0].owns_run
        handle.remove()
        accelerator.end_training()
        settled = settled_records(tmp_path, lambda rows: any("uma/step" in r for r in rows))
        rows = [r for r in history_rows(settled) if "uma/step" in r]
        assert len(rows) == 1 and rows[0]["uma/step"] == 5  # not dropped although 5 < 40
        assert rows[0]["uma/gradient_flow/total_norm"] == handle.records[0].scalars["total_norm"]
    finally:
        wandb.teardown()
