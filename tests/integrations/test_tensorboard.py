"""TensorBoardSink: event files written for real, read back with TensorBoard's own ``event_accumulator``."""

from __future__ import annotations

import builtins
import importlib.util

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
        ("uma/gradient_flow/total_norm", [(3, 4.0), (6, 7.0)]),
        ("uma/gradient_flow/layers/model.a/norm", [(3, 1.5), (6, 3.0)]),
        ("uma/gradient_flow/seconds", [(3, 0.25), (6, 0.25)]),
    ):
        assert [(e.step, e.value) for e in acc.Scalars(key)] == want, key
    # the key mapping of the other trackers: an invalid character gets a safe, unique form
    assert any(t.startswith("uma/gradient_flow/params/heads.c__.weight/norm-") for t in tags["scalars"])
    # per-module values: one histogram per scalar, over the modules
    hist = acc.Histograms("uma/gradient_flow/modules/norm")
    assert [h.step for h in hist] == [3, 6]
    assert hist[0].histogram_value.num == 2 and hist[0].histogram_value.min == 1.5 and hist[0].histogram_value.max == 6.0
    assert hist[1].histogram_value.sum == pytest.approx(3.0 + 12.0)
    images = acc.Images("uma/gradient_flow/figures/layers")
    assert [(i.step, i.width, i.height) for i in images] == [(3, 9, 6), (6, 9, 6)]
    assert tags["scalars"] and all(t.startswith("uma/") for t in tags["scalars"])


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
    assert texts["uma/fisher/status/text_summary"] == ["error at step 4: boom"]
    assert texts["uma.probe_fingerprint/text_summary"] == ["abc123"]
    assert texts["uma.fisher.config/text_summary"] == ["{'top_k': 4}"]
    assert [k for k in texts if k.startswith("uma.fisher-")] == [next(k for k in texts if k.startswith("uma.fisher-"))]
    assert [e.step for e in acc.Scalars("uma/gradient_flow/total_norm")] == [8]
    assert "uma/gradient_flow/figures/layers" not in acc.Tags()["images"]


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
    assert [e.step for e in acc.Scalars("uma/gradient_flow/total_norm")] == [2, 4]


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
    assert [e.step for e in acc.Scalars("uma/gradient_flow/total_norm")] == [2, 4]
    ours = {r.step: r.scalars["total_norm"] for r in callback.records}
    assert [e.value for e in acc.Scalars("uma/gradient_flow/total_norm")] == pytest.approx([ours[2], ours[4]], rel=1e-6)
    assert [h.step for h in acc.Histograms("uma/gradient_flow/modules/norm")] == [2, 4]
    assert any(t.startswith("uma/gradient_flow/figures/") for t in acc.Tags()["images"])
    assert sink._writer is None  # the session finished its own writer at the end of training
