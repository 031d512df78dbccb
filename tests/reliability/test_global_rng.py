"""Issue 17 item 2: no entry point consumes the global RNGs (Python ``random``, NumPy, torch).

MLflow names a new run with Python's ``random``; a collator drawing from ``random`` then
gave other batches from step 1. A Trainer run with a collator that draws from all three
RNGs, ``trackers=["mlflow"]`` and no run open, must log the same losses as one without
the callback.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.trainer_cases import tiny_lm, tiny_lm_dataset, training_args
from uma_callbacks import UMACallback
from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal

pytest.importorskip("mlflow")


def _states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def _assert_same(a, b):
    assert a[0] == b[0], "Python random consumed"
    assert a[1] == b[1], "NumPy RNG consumed"
    assert torch.equal(a[2], b[2]), "torch RNG consumed"


def noisy_collate(rows):
    """Masks a random share of labels, with a draw from each global RNG."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = ids.clone()
    share = 0.2 + 0.2 * random.random() + 0.2 * float(np.random.rand())
    labels[torch.rand(labels.shape) < share] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train(folder, callbacks):
    from transformers import Trainer

    trainer = Trainer(
        model=tiny_lm(),
        args=training_args(folder, max_steps=6, save_steps=3),
        train_dataset=tiny_lm_dataset(),
        data_collator=noisy_collate,
        callbacks=callbacks,
    )
    trainer.train()
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def test_mlflow_sink_leaves_every_global_rng_as_it_was(tmp_path, monkeypatch):
    from uma_callbacks.integrations.mlflow import MLflowSink

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    journal = Journal(tmp_path / "uma")
    (journal.root / "step-1").mkdir()
    (journal.root / "step-1" / "m.json").write_text("{}")
    record = Record(step=1, metric="m", status="ok", scalars={"x": 1.0}, files=["step-1/m.json"], cache_key="k")
    journal.append(record)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = _states()
    sink = MLflowSink(fallback_dir=tmp_path / "mlruns")  # no run open: the sink creates one (a random name)
    sink.start()
    sink.log_params({"a": 1})
    sink.log_record(record, journal.root)
    journal.mark_delivered(sink.name, sink.run_id(), record.record_id)
    journal.records(), journal.lookup("k"), journal.delivered(sink.name, sink.run_id())
    sink.finish()
    _assert_same(_states(), before)


@pytest.mark.slow
def test_trainer_with_mlflow_and_a_random_collator_trains_as_without_the_callback(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plain = _train(tmp_path / "plain", [])
    cb = UMACallback(metrics=["gradient_flow"], probe_size=4, trackers=["mlflow"])
    measured = _train(tmp_path / "uma", [cb])
    assert [r.status for r in cb.records] == ["ok", "ok"]
    assert measured == plain
