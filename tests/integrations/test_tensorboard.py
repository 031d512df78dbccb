"""TensorBoardSink: event files written for real, read back with TensorBoard's own ``event_accumulator``."""

from __future__ import annotations

import builtins
import importlib.util
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest

from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import deliver
from uma_callbacks.engine.journal import Journal

pytest.importorskip("tensorboard")


def _png(path, height=6, width=9):
    from PIL import Image

    Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8)).save(path)


def _record(root, step, metric="gradient_flow", status="ok", figure=True):
    folder = root / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{metric}.json").write_text("{}")
    files = [f"step-{step}/{metric}.json"]
    if figure:
        _png(folder / f"{metric}-layers.png")
        files.append(f"step-{step}/{metric}-layers.png")
    scalars = {"total_norm": 1.0 + step, "layers/model.a/norm": 0.5 * step, "layers/model.b/norm": 2.0 * step,
               "params/heads.c++.weight/norm": 3.0}  # fmt: skip
    return Record(
        step=step, metric=metric, status=status, scalars=scalars if status == "ok" else {}, meta={"seconds": 0.25},
        files=files if status == "ok" else [], cache_key=f"key-{step}-{metric}",
        error=None if status == "ok" else {"type": "RuntimeError", "message": "boom", "traceback": ""},
    )  # fmt: skip


def _read(folder):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def test_scalars_images_histograms_once_each_at_the_checkpoint_step(tmp_path):
    from uma_callbacks.integrations.tensorboard import TensorBoardSink

    journal = Journal(tmp_path / "uma")
    records = [_record(journal.root, 3), _record(journal.root, 6)]
    for r in records:
        journal.append(r)
    sink = TensorBoardSink(fallback_dir=journal.root)
    assert deliver(journal, sink, records) == 2
    assert deliver(journal, sink, records) == 0  # the delivery log
    for r in records:  # the sink itself, same process: the points it holds
        sink.log_record(r, journal.root)
    sink.finish()
    folder = journal.root / "tensorboard"
    assert sink.run_id() == str(folder.resolve())
    # a new process (fresh sink, fresh journal): reads back what the folder holds, adds nothing
    again = TensorBoardSink(run_id=sink.run_id())
    fresh = Journal(tmp_path / "elsewhere")
    assert deliver(fresh, again, [_record(journal.root, 3)]) == 1
    again.finish()

    acc = _read(folder)
    tags = acc.Tags()
    for key, want in (
        ("uma.gradient_flow/total_norm", [(3, 4.0), (6, 7.0)]),
        ("uma.gradient_flow.layers/model.a/norm", [(3, 1.5), (6, 3.0)]),
        ("uma.gradient_flow.cost/seconds", [(3, 0.25), (6, 0.25)]),
        ("uma.gradient_flow.cost/status_code", [(3, 0.0), (6, 0.0)]),
    ):
        assert [(e.step, e.value) for e in acc.Scalars(key)] == want, key
    # the key mapping of the other trackers: an invalid character gets a safe, unique form
    assert any(t.startswith("uma.gradient_flow.params/heads.c__.weight/norm-") for t in tags["scalars"])
    # TensorBoard's groups (the part before the first /): the metric's values apart from its per-item ones
    # and what the measurement cost (seconds, status code) apart from the values
    groups = {"uma.gradient_flow", "uma.gradient_flow.layers", "uma.gradient_flow.params", "uma.gradient_flow.cost"}
    assert {t.split("/")[0] for t in tags["scalars"]} == groups
    assert not {"seconds", "status_code", "peak_mb"} & {t.split("/", 1)[1] for t in tags["scalars"] if t.startswith("uma.gradient_flow/")}
    # per-module values: one histogram per scalar, over the modules
    hist = acc.Histograms("uma.gradient_flow/modules/norm")
    assert [h.step for h in hist] == [3, 6]
    assert hist[0].histogram_value.num == 2 and hist[0].histogram_value.min == 1.5 and hist[0].histogram_value.max == 6.0
    assert hist[1].histogram_value.sum == pytest.approx(3.0 + 12.0)
    images = acc.Images("uma.gradient_flow/figures/layers")
    assert [(i.step, i.width, i.height) for i in images] == [(3, 9, 6), (6, 9, 6)]


def test_error_status_params_and_a_damaged_figure(tmp_path, caplog):
    from uma_callbacks.integrations.tensorboard import TensorBoardSink

    journal = Journal(tmp_path / "uma")
    sink = TensorBoardSink(log_dir=tmp_path / "tb")
    sink.log_params({"probe_fingerprint": "abc123", "fisher.config": {"top_k": 4}})
    sink.log_params({"probe_fingerprint": "abc123"})  # once per value
    failed = _record(journal.root, 4, metric="fisher", status="error")
    broken = _record(journal.root, 8)
    (journal.root / "step-8" / "gradient_flow-layers.png").write_bytes(b"\x89PNG not really")
    for r in (failed, broken):
        journal.append(r)
    assert deliver(journal, sink, [failed, broken]) == 2  # the damaged figure is left out, the rest goes
    sink.finish()
    assert "unreadable" in caplog.text
    # params in a second process: the same value is not written again, another goes under a key of its own
    again = TensorBoardSink(log_dir=tmp_path / "tb")
    again.log_params({"probe_fingerprint": "abc123", "fisher.config": {"top_k": 8}})
    again.finish()

    acc = _read(tmp_path / "tb")
    texts = {t: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)] for t in acc.Tags()["tensors"]}
    assert texts["uma.fisher/status/text_summary"] == ["error at step 4: boom"]
    assert texts["uma.probe_fingerprint/text_summary"] == ["abc123"]
    assert texts["uma.fisher.config/text_summary"] == ["{'top_k': 4}"]
    assert [k for k in texts if k.startswith("uma.fisher-")] == [next(k for k in texts if k.startswith("uma.fisher-"))]
    assert [e.step for e in acc.Scalars("uma.gradient_flow/total_norm")] == [8]
    assert "uma.gradient_flow/figures/layers" not in acc.Tags()["images"]
    # the outcome at every step, as a number: the failed Fisher at step 4 (5: error), the figure's loss is no failure (0)
    assert [(e.step, e.value) for e in acc.Scalars("uma.fisher.cost/status_code")] == [(4, 5.0)]
    assert [(e.step, e.value) for e in acc.Scalars("uma.gradient_flow.cost/status_code")] == [(8, 0.0)]


def test_a_failed_write_is_retried_without_duplicates(tmp_path):
    from uma_callbacks.integrations.tensorboard import TensorBoardSink

    journal = Journal(tmp_path / "uma")
    records = [_record(journal.root, 2, figure=False), _record(journal.root, 4, figure=False)]
    for r in records:
        journal.append(r)
    sink = TensorBoardSink(fallback_dir=journal.root)
    assert deliver(journal, sink, records[:1]) == 1
    real_flush = sink._writer.flush
    calls = []

    def failing_flush():  # the disk fills after the points were queued
        real_flush()
        calls.append(1)
        raise OSError(28, "No space left on device")

    sink._writer.flush = failing_flush
    assert deliver(journal, sink, records[1:]) == 0  # the record stays pending
    assert calls and sink._writer is None
    assert deliver(journal, sink, records) == 1  # retried: a new writer reads back what reached the disk
    sink.finish()
    acc = _read(journal.root / "tensorboard")
    assert [e.step for e in acc.Scalars("uma.gradient_flow/total_norm")] == [2, 4]


def test_registry_name_and_missing_package(monkeypatch):
    from uma_callbacks.config import UMAConfig
    from uma_callbacks.integrations.registry import tracker_names

    assert "tensorboard" in tracker_names()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"uma-callbacks\[tensorboard\]"):
        UMAConfig(trackers=["tensorboard"])
    real_import = builtins.__import__
    monkeypatch.setattr(importlib.util, "find_spec", real)

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from uma_callbacks.integrations.tensorboard import TensorBoardSink

    with pytest.raises(ModuleNotFoundError, match=r"pip install 'uma-callbacks\[tensorboard\]'"):
        TensorBoardSink()


@pytest.mark.slow
def test_trainer_report_to_tensorboard_writes_into_the_trainers_log_folder(tmp_path):
    from tests.trainer_cases import run_trainer
    from uma_callbacks import UMACallback

    callback = UMACallback(metrics=["gradient_flow"], probe_size=8, draw_figures=True, seed=0)  # trackers=None: report_to
    trainer, _ = run_trainer(tmp_path, callbacks=[callback], max_steps=4, save_steps=2, report_to=["tensorboard"])
    [sink] = callback.sinks
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1  # transformers' TensorBoardCallback: <output_dir>/runs/<time>_<host>
    assert sink.run_id() == str(runs[0].resolve())
    acc = _read(runs[0])
    scalars = acc.Tags()["scalars"]
    assert "train/loss" in scalars  # the Trainer's own events, same folder: one TensorBoard run
    assert [e.step for e in acc.Scalars("uma.gradient_flow/total_norm")] == [2, 4]
    ours = {r.step: r.scalars["total_norm"] for r in callback.records}
    assert [e.value for e in acc.Scalars("uma.gradient_flow/total_norm")] == pytest.approx([ours[2], ours[4]], rel=1e-6)
    assert [h.step for h in acc.Histograms("uma.gradient_flow/modules/norm")] == [2, 4]
    assert any(t.startswith("uma.gradient_flow/figures/") for t in acc.Tags()["images"])
    assert sink._writer is None  # the session finished its own writer at the end of training
    assert [e.value for e in acc.Scalars("uma.gradient_flow.cost/status_code")] == [0.0, 0.0]


@pytest.mark.slow
def test_trainer_and_sink_share_tensorboard_logging_dir_and_an_older_run_is_not_joined(tmp_path, monkeypatch):
    """``TENSORBOARD_LOGGING_DIR`` (transformers 5's only setting): both write there; else an old run's folder is never taken."""
    from tests.trainer_cases import run_trainer
    from uma_callbacks import UMACallback

    old = tmp_path / "out" / "runs" / "Jan01_00-00-00_elsewhere"  # another process's run, newer by its name
    old.mkdir(parents=True)
    (old / f"events.out.tfevents.9999999999.{socket.gethostname()}.{os.getpid() + 1}.0").write_bytes(b"")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = UMACallback(metrics=["gradient_flow"], probe_size=8, draw_figures=False, seed=0)
    run_trainer(tmp_path / "out", callbacks=[callback], max_steps=2, save_steps=2, report_to=["tensorboard"])
    [sink] = callback.sinks
    assert sink.run_id() == str((tmp_path / "tb").resolve())
    acc = _read(tmp_path / "tb")
    assert "train/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("uma.gradient_flow/total_norm")] == [2]
    assert [p.name for p in (tmp_path / "out" / "runs").iterdir()] == [old.name]  # nothing written beside it


def _args(tmp_path, **kwargs):
    return SimpleNamespace(**{"report_to": ["tensorboard"], "output_dir": str(tmp_path / "out"), **kwargs})


def test_the_trainers_log_folder_is_passed_explicitly(tmp_path, monkeypatch):
    """What ``UMACallback`` passes the sink: ``args.logging_dir`` (transformers 4.x), the env, or the folder this process's writer opened."""
    from torch.utils.tensorboard import SummaryWriter

    from uma_callbacks.triggers.trainer_tensorboard import opened_log_dir, tensorboard_run, trainer_tensorboard_dir

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert trainer_tensorboard_dir(_args(tmp_path, logging_dir="logs/tb")) == str(tmp_path / "logs" / "tb")
    assert trainer_tensorboard_dir(_args(tmp_path, report_to=["mlflow"], logging_dir="logs/tb")) is None
    assert trainer_tensorboard_dir(_args(tmp_path, report_to="none")) is None
    assert trainer_tensorboard_dir(_args(tmp_path)) is None  # no runs/ folder yet: the sink's default
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "~/tb-env")
    assert trainer_tensorboard_dir(_args(tmp_path)) == os.path.expanduser("~/tb-env")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")

    # transformers 5: the folder holding this process's newest event file under <output_dir>/runs
    runs = tmp_path / "out" / "runs"
    host, pid = socket.gethostname(), os.getpid()
    SummaryWriter(log_dir=str(runs / "Dec01_10-00-00_host")).close()  # a real writer of this process
    for name in (f"{host}.{pid + 1}.0", f"{host}.{pid}.0.uma", f"elsewhere.{pid}.0"):  # other process, our own sink, other host
        (runs / f"later-{name}").mkdir()
        (runs / f"later-{name}" / f"events.out.tfevents.9999999999.{name}").write_bytes(b"")
    (runs / "link").symlink_to(tmp_path / "out")  # links are not followed
    assert trainer_tensorboard_dir(_args(tmp_path)) == str((runs / "Dec01_10-00-00_host").resolve())
    trial = runs / "Dec01_11-00-00_host" / "trial-3"  # a hyperparameter search's trial, one level deeper
    trial.mkdir(parents=True)
    (trial / f"events.out.tfevents.9999999999.{host}.{pid}.7").write_bytes(b"")
    assert opened_log_dir(runs) == trial
    assert tensorboard_run(_args(tmp_path)) == {"tensorboard": {"run": str(trial.resolve()), "uri": ""}}
    assert opened_log_dir(tmp_path / "missing") is None


def test_the_callback_hands_its_sink_the_trainers_log_folder(tmp_path, monkeypatch):
    """``UMACallback.on_train_begin`` with ``report_to=["tensorboard"]``: the sink writes into ``args.logging_dir``, nothing else."""
    from tests.trainer_cases import tiny_lm, tiny_lm_dataset
    from uma_callbacks import UMACallback

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cb = UMACallback(metrics=["gradient_flow"], probe=tiny_lm_dataset(n=8), probe_size=8, draw_figures=False)
    args = _args(tmp_path, logging_dir=str(tmp_path / "trainer-tb"))
    model = tiny_lm()
    cb.on_train_begin(args, SimpleNamespace(global_step=0), None)
    cb.on_save(args, SimpleNamespace(global_step=2, log_history=[]), None, model=model)
    cb.on_train_end(args, SimpleNamespace(global_step=2), None, model=model)
    [sink] = cb.sinks
    assert sink.run_id() == str((tmp_path / "trainer-tb").resolve())
    assert [e.step for e in _read(tmp_path / "trainer-tb").Scalars("uma.gradient_flow/total_norm")] == [2]
    assert not (tmp_path / "out" / "uma" / "tensorboard").exists()  # the default folder is left alone


def test_tags_name_the_metric_in_tensorboards_group():
    from uma_callbacks.integrations.tensorboard import tensorboard_tag

    assert tensorboard_tag("fisher", "uma/fisher/trace") == "uma.fisher/trace"
    assert tensorboard_tag("fisher", "uma/fisher/layers/model.layers.0.mlp/trace") == "uma.fisher.layers/model.layers.0.mlp/trace"
    assert tensorboard_tag("information", "uma/information/pid/synergy") == "uma.information/pid/synergy"
    assert tensorboard_tag("pruning", "uma/pruning/sparsity/0.5/loss") == "uma.pruning.sparsity/0.5/loss"
    assert tensorboard_tag("spike", "uma/spike/z") == "uma.spike/z"
    assert tensorboard_tag("spike/gradient_flow", "uma/spike/gradient_flow/layers/m/norm") == "uma.spike.gradient_flow.layers/m/norm"
    assert tensorboard_tag("fisher", "uma/hessian/trace") == "uma/hessian/trace"  # not the record's metric: as it is
