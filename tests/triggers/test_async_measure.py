"""``measure="async"``: the triggers announce complete checkpoints for a watcher and measure nothing.

A real Trainer (tiny Qwen2) and a real Accelerator save checkpoints; the announcements
(``<journal>/watch.jsonl``) are read back with the reader the watcher uses. Every line of a
checkpoint must be appended after its save finished (checked at the moment it is appended),
hold hard links to its weight files that outlive ``save_total_limit``, and name the tracker
runs of the training (a real MLflow SQLite store, W&B offline run files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm, tiny_lm_dataset, training_args
from uma_callbacks import UMACallback, attach
from uma_callbacks.config import UMAConfig, metric_spec
from uma_callbacks.engine import announce
from uma_callbacks.engine.announce import HELD_DIR, WATCH_FILE, read_announcements
from uma_callbacks.engine.journal import Journal, read_lines
from uma_callbacks.metric_specs import build_metric
from uma_callbacks.metrics import METRICS, GradientFlow, register_metric
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult
from uma_callbacks.session import Session

pytestmark = pytest.mark.slow


class NeverComputed(Metric):
    """A metric that fails the test if anything computes it in the training process."""

    name = "never_computed_test"

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        raise AssertionError("measure='async' computed a metric in the training process")


@pytest.fixture
def registered():
    register_metric(NeverComputed)
    yield
    METRICS.pop(NeverComputed.name, None)


@pytest.fixture
def no_measuring(monkeypatch):
    """Any in-process measurement fails the test (the metric's own raise would be isolated as a record)."""

    def refuse(*args, **kwargs):
        raise AssertionError("Session.measure called with measure='async'")

    monkeypatch.setattr(Session, "measure", refuse)


@pytest.fixture
def appended(monkeypatch):
    """Every announcement line, with what its checkpoint folder held at the moment it was appended."""
    lines = []
    real = announce.append_line

    def spy(path, payload):
        seen = {}
        if payload.get("kind") == "checkpoint":
            folder = Path(path).parent.parent / payload["folder"]  # the journal is <run>/uma
            held = Path(path).parent / payload["held"]
            seen = {
                "folder_files": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [],
                "held_files": sorted(p.name for p in held.iterdir()) if payload["held"] else [],
            }
        lines.append((dict(payload), seen))
        real(path, payload)

    monkeypatch.setattr(announce, "append_line", spy)
    return lines


def _probe():
    return tiny_lm_dataset(n=8, seed=3)


def test_trainer_announces_complete_checkpoints_and_measures_nothing(tmp_path, registered, no_measuring, appended):
    from transformers import TrainerCallback

    out = tmp_path / "out"
    saved = {}  # the weights as trained at each save, seen by a callback after ours

    class AfterUs(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            saved[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            # our on_save came first: its line is in the file when the Trainer moves on
            ann = read_announcements(out / "uma", out)
            assert state.global_step in ann.checkpoints

    cb = UMACallback(
        metrics=[NeverComputed.name, "gradient_flow"], probe=_probe(), probe_size=8, trackers=[], measure="async"
    )
    run_trainer(out, callbacks=[cb, AfterUs()], max_steps=6, save_steps=2, save_total_limit=1)
    root = out / "uma"

    ann = read_announcements(root, out)
    assert ann.bad_lines == 0
    assert ann.run is not None and ann.run.run == cb.session.run
    assert ann.run.trackers == {}
    assert sorted(ann.checkpoints) == [2, 4, 6] and ann.finished == 6
    # the metrics as the watcher rebuilds them: same classes, same configurations
    assert [m["name"] for m in ann.run.metrics] == [NeverComputed.name, "gradient_flow"]
    for spec, metric in zip(ann.run.metrics, cb.config.metric_objects):
        assert build_metric(spec).config() == metric.config()
    assert (root / "probe.safetensors").is_file() and (root / "probe.json").is_file()
    # nothing measured: no metric record, no result folder
    assert Journal(root).records() == [] and not list(root.glob("step-*"))

    # each line appended after the save finished: trainer_state.json (written last) was there, and the held copy
    kinds = [payload["kind"] for payload, _ in appended]
    assert kinds == ["run", "checkpoint", "checkpoint", "checkpoint", "finished"]
    for payload, seen in appended[1:4]:
        assert {"trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "uma_run.json"} <= set(
            seen["folder_files"]
        ), seen
        assert {"trainer_state.json", "model.safetensors", "config.json", "uma_run.json"} <= set(seen["held_files"])
        assert "optimizer.pt" not in seen["held_files"]  # weights only

    # save_total_limit=1: the Trainer deleted the older folders, the held copies remain and load
    assert not (out / "checkpoint-2").exists() and not (out / "checkpoint-4").exists()
    for step in (2, 4, 6):
        held = root / HELD_DIR / f"checkpoint-{step}"
        assert ann.checkpoints[step].held == held.resolve()
        assert ann.checkpoints[step].folder == (out / f"checkpoint-{step}").resolve()
        weights = load_file(str(held / "model.safetensors"))
        assert weights and all(torch.equal(t, saved[step][k]) for k, t in weights.items())
        assert json.loads((held / "trainer_state.json").read_text())["global_step"] == step
        assert json.loads((held / "uma_run.json").read_text())["run"] == cb.session.run
    # a hard link: the same inode as the checkpoint's own file
    live = out / "checkpoint-6" / "model.safetensors"
    assert os.path.samefile(live, root / HELD_DIR / "checkpoint-6" / "model.safetensors")
    assert live.stat().st_nlink == 2


def test_resumed_training_continues_the_run_and_announces_it_again(tmp_path, no_measuring):
    from transformers import Trainer

    out = tmp_path / "out"
    first = UMACallback(metrics=["gradient_flow"], probe=_probe(), probe_size=8, trackers=[], measure="async")
    run_trainer(out, callbacks=[first], max_steps=4, save_steps=2)
    second = UMACallback(metrics=["gradient_flow"], probe=_probe(), probe_size=8, trackers=[], measure="async")
    trainer = Trainer(
        model=tiny_lm(),
        args=training_args(out, max_steps=6, save_steps=2),
        train_dataset=tiny_lm_dataset(),
        callbacks=[second],
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))

    assert second.session.run == first.session.run
    lines, bad = read_lines(out / "uma" / WATCH_FILE)
    assert bad == 0
    assert [p["kind"] for p in lines] == ["run", "checkpoint", "checkpoint", "finished", "run", "checkpoint", "finished"]
    assert {p["run"] for p in lines if p["kind"] == "run"} == {first.session.run}
    ann = read_announcements(out / "uma", out)
    assert sorted(ann.checkpoints) == [2, 4, 6] and ann.finished == 6
    assert Journal(out / "uma").records() == []


def test_run_line_names_the_trainers_mlflow_run(tmp_path, monkeypatch, no_measuring):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "uma-async")
    cb = UMACallback(metrics=["gradient_flow"], probe=_probe(), probe_size=8, measure="async")
    run_trainer(tmp_path / "out", callbacks=[cb], max_steps=2, save_steps=2, report_to=["mlflow"])

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("uma-async").experiment_id])
    assert len(runs) == 1  # the Trainer's own run, no run of ours
    ann = read_announcements(tmp_path / "out" / "uma", tmp_path / "out")
    assert ann.run is not None and ann.run.trackers == {"mlflow": {"run": runs[0].info.run_id, "uri": uri}}
    assert sorted(ann.checkpoints) == [2]
    params = runs[0].data.params
    assert any(k.endswith("probe_fingerprint") for k in params)  # the session's params are logged
    assert params[next(k for k in params if k.endswith("probe_fingerprint"))] == cb.probe.fingerprint
    assert not [k for k in runs[0].data.metrics if k.startswith("uma/")]  # nothing measured


def test_a_tracker_down_at_train_begin_is_announced_once_it_starts(tmp_path, monkeypatch, no_measuring):
    """The MLflow store is unreachable at train begin (a file where its folder belongs) and there from step 2."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    from uma_callbacks.integrations.mlflow import default_tracking_uri

    (tmp_path / "store").write_text("not a folder")
    uri = default_tracking_uri(tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    class StoreComesUp(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                (tmp_path / "store").unlink()
                (tmp_path / "store").mkdir()

    cb = UMACallback(metrics=["gradient_flow"], probe=_probe(), probe_size=8, trackers=["mlflow"], measure="async")
    run_trainer(tmp_path / "out", callbacks=[cb, StoreComesUp()], max_steps=4, save_steps=2)

    lines, _ = read_lines(tmp_path / "out" / "uma" / WATCH_FILE)
    runs = [p for p in lines if p["kind"] == "run"]
    assert [p["trackers"] for p in runs[:1]] == [{}]  # down: nothing to name yet
    assert len(runs) == 2 and runs[1]["trackers"]["mlflow"]["uri"] == uri
    run_id = runs[1]["trackers"]["mlflow"]["run"]
    assert [p["kind"] for p in lines] == ["run", "checkpoint", "run", "checkpoint", "finished"]
    run = MlflowClient(uri).get_run(run_id)  # the run our sink opened once the store was there, params logged
    assert run.data.params[next(k for k in run.data.params if k.endswith("probe_fingerprint"))] == cb.probe.fingerprint


def test_run_line_names_the_trainers_wandb_run(tmp_path, monkeypatch, no_measuring):
    wandb = pytest.importorskip("wandb")
    from tests.integrations.wandb_runfile import run_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "uma-async")
    (tmp_path / "wb").mkdir()
    wandb.teardown()  # wandb caches its settings (WANDB_DIR) per process
    try:
        cb = UMACallback(metrics=["gradient_flow"], probe=_probe(), probe_size=8, measure="async")
        run_trainer(tmp_path / "out", callbacks=[cb], max_steps=2, save_steps=2, report_to=["wandb"])
        assert not cb.sinks[0].owns_run  # joined the Trainer's run
        wandb.finish()
        path = run_file(tmp_path / "wb")
    finally:
        wandb.teardown()
    ann = read_announcements(tmp_path / "out" / "uma", tmp_path / "out")
    assert ann.run is not None
    entry = ann.run.trackers["wandb"]
    assert path.name == f"run-{entry['run']}.wandb"  # the very run whose file the Trainer wrote
    assert entry["project"] == "uma-async"
    assert Path(entry["dir"]) == tmp_path / "wb" and path.is_relative_to(Path(entry["dir"]) / "wandb")
    assert set(entry) <= {"run", "entity", "project", "dir"}
    assert Journal(tmp_path / "out" / "uma").records() == []


@pytest.mark.parametrize("safe", [True, False])  # torch.save (.bin) rewrites a file in place, safetensors replaces it
def test_attach_announces_after_save_state_returns(tmp_path, no_measuring, appended, safe):
    from accelerate import Accelerator

    from tests.cases import mlp_case

    model, batches, loss_fn = mlp_case()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)  # a state that changes at each step
    model, optimizer = accelerator.prepare(model, optimizer)
    state = {"step": 0}
    handle = attach(
        accelerator,
        ["gradient_flow", "optimizer_state"],  # a metric reads the optimizer: optimizer.bin is held too
        batches,
        global_step=lambda: state["step"],
        trackers=[],
        output_dir=str(tmp_path / "uma"),
        loss_fn=loss_fn,
        measure="async",
    )
    assert not accelerator._save_model_state_pre_hook  # nothing runs before the state is written
    weights_file = "model.safetensors" if safe else "pytorch_model.bin"
    kept, moments = {}, {}
    for step in (10, 20):
        loss = loss_fn(model, batches[0]).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        state["step"] = step
        accelerator.save_state(str(tmp_path / "ckpt"), safe_serialization=safe)  # the same folder both times
        kept[step] = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        moments[step] = [s["exp_avg"].clone() for s in optimizer.state_dict()["state"].values()]
    handle.remove()
    assert "save_state" not in vars(accelerator)  # the wrapper is gone
    accelerator.save_state(str(tmp_path / "after"))
    assert not (tmp_path / "after" / "uma_run.json").exists()

    kinds = [payload["kind"] for payload, _ in appended]
    assert kinds == ["run", "checkpoint", "checkpoint", "finished"]
    for payload, seen in appended[1:3]:
        # written after save_state returned: the optimizer and RNG states came after the pre-hook
        assert {weights_file, "optimizer.bin", "random_states_0.pkl", "uma_run.json", "uma_state.json"} <= set(
            seen["folder_files"]
        )
        assert payload["held"] == f"{HELD_DIR}/ckpt-step-{payload['step']}"
    ann = read_announcements(tmp_path / "uma", tmp_path)
    assert sorted(ann.checkpoints) == [10, 20] and ann.finished == 20 and ann.run.run == handle.session.run
    # one held copy per step, each the weights as saved then (the second save did not rewrite the first's)
    for step in (10, 20):
        held = ann.checkpoints[step].held / weights_file
        weights = load_file(str(held)) if safe else torch.load(held, weights_only=True)
        assert weights and all(torch.equal(t, kept[step][k]) for k, t in weights.items())
    assert any(not torch.equal(kept[10][k], kept[20][k]) for k in kept[10])  # the steps differ
    # the optimizer state as saved at each step: the second save (in place, torch.save) did not rewrite the first's
    for step in (10, 20):
        saved = torch.load(ann.checkpoints[step].held / "optimizer.bin", weights_only=True)
        got = [s["exp_avg"] for s in saved["state"].values()]
        assert len(got) == len(moments[step]) and all(torch.equal(a, b) for a, b in zip(got, moments[step]))
    assert not all(torch.equal(a, b) for a, b in zip(moments[10], moments[20]))
    assert os.path.samefile(tmp_path / "ckpt" / weights_file, ann.checkpoints[20].held / weights_file)
    assert json.loads((tmp_path / "ckpt" / "uma_state.json").read_text())["step"] == 20
    assert handle.records == [] and Journal(tmp_path / "uma").records() == []


@pytest.mark.parametrize("make", [
    lambda: UMAConfig(measure="sometimes"),
    lambda: UMACallback(measure="sometimes"),
    lambda: UMACallback(measure=None),
])  # fmt: skip
def test_bad_measure_names_the_field_and_the_allowed_values(make):
    with pytest.raises(ValueError, match=r"UMAConfig\.measure must be one of \['inline', 'async'\]"):
        make()


def test_attach_bad_measure_is_refused(tmp_path):
    from accelerate import Accelerator

    with pytest.raises(ValueError, match=r"measure must be one of \['inline', 'async'\]"):
        attach(Accelerator(cpu=True), ["gradient_flow"], [{"x": torch.zeros(1)}], measure="sometimes")


@pytest.mark.parametrize("field, value", [("every_n_steps", 2), ("log_scalars", ["fisher/trace"]), ("overhead", 0.05)])
def test_async_refuses_settings_of_inline_measuring(field, value):
    with pytest.raises(ValueError, match=rf"UMAConfig\.{field} cannot be used with measure='async'"):
        UMAConfig(measure="async", **{field: value})


def test_async_refuses_a_metric_the_watcher_cannot_rebuild():
    class Tweaked(GradientFlow):  # not registered: a watcher would build the plain GradientFlow
        pass

    with pytest.raises(ValueError, match="gradient_flow.*cannot be rebuilt"):
        UMAConfig(metrics=[Tweaked()], measure="async")
    UMAConfig(metrics=[Tweaked()])  # measured in process: fine


def test_backfill_refuses_async(tmp_path):
    with pytest.raises(ValueError, match=r"UMAConfig\.measure='async'"):
        Session(UMAConfig(measure="async"), tmp_path / "uma", source="backfill")
    Session(UMAConfig(), tmp_path / "uma", source="backfill")  # the default is not a setting


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_is_rebuilt_from_its_spec(name):
    metric = build_metric(name, seed=3)
    rebuilt = build_metric(json.loads(json.dumps(metric_spec(metric))))  # through the announcement's JSON
    assert type(rebuilt) is type(metric) and rebuilt.config() == metric.config()
