"""Checkpoint discovery, safetensors loading and the trajectory geometry."""

from __future__ import annotations

import json
import math

import pytest
import torch

from uma_callbacks.checkpoints import (
    INCOMPLETE_SENTINEL,
    UMA_STATE,
    build_model,
    discover_checkpoints,
    load_into,
    load_weights,
)
from uma_callbacks.metrics.trajectory import trajectory_scalars


def tiny_model(seed: int = 0, hidden: int = 16, vocab: int = 50):
    """A one-layer Qwen2 from config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def fake_trainer_run(root, steps=(2, 4, 6), hidden: int = 16):
    """``checkpoint-<N>/`` folders as the Trainer writes them (config, safetensors, trainer_state)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(steps):
        folder = root / f"checkpoint-{step}"
        tiny_model(seed=i, hidden=hidden).save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return root


def test_trainer_folders_ordered_by_global_step_and_incomplete_skipped(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(10, 2))
    (run / "checkpoint-20").mkdir()  # no trainer_state.json: still being written
    tiny_model().save_pretrained(run / "checkpoint-30")
    (run / "checkpoint-30" / "trainer_state.json").write_text(json.dumps({"global_step": 30}))
    (run / "checkpoint-30" / INCOMPLETE_SENTINEL).write_text("")
    found = discover_checkpoints(run)
    assert [(c.name, c.step, c.kind) for c in found] == [("checkpoint-2", 2, "trainer"), ("checkpoint-10", 10, "trainer")]


def test_accelerate_state_folders_and_user_mapping(tmp_path):
    run = tmp_path / "run"
    for name, step in (("state_a", 7), ("state_b", 3)):
        tiny_model().save_pretrained(run / name)
        (run / name / UMA_STATE).write_text(json.dumps({"step": step}))
    tiny_model().save_pretrained(run / "other")
    found = discover_checkpoints(run)
    assert [(c.name, c.step, c.kind) for c in found] == [("state_b", 3, "accelerate"), ("state_a", 7, "accelerate")]
    mapped = discover_checkpoints(run, steps={"other": 1})
    assert [c.name for c in mapped] == ["other", "state_b", "state_a"]


def test_plain_model_list_steps_from_suffix_or_position(tmp_path):
    for name in ("m-5", "m-1"):
        tiny_model().save_pretrained(tmp_path / name)
    found = discover_checkpoints([tmp_path / "m-5", tmp_path / "m-1"])
    assert [(c.name, c.step, c.kind) for c in found] == [("m-1", 1, "model"), ("m-5", 5, "model")]


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_checkpoints(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoints"):
        discover_checkpoints(tmp_path / "empty")


def test_weights_round_trip_bit_exact_with_tied_embeddings(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    rebuilt = build_model(tmp_path / "m")
    load_into(rebuilt, load_weights(tmp_path / "m"))
    for (n, a), (m, b) in zip(model.named_parameters(), rebuilt.named_parameters()):
        assert n == m and torch.equal(a, b)


def test_corrupted_safetensors_is_a_value_error(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read weights"):
        load_weights(tmp_path / "m")


def test_trajectory_scalars_against_hand_values():
    a = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}
    b = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.0])}
    c = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])}
    out = trajectory_scalars(c, a, b, a)
    assert out["distance_from_first"] == pytest.approx(5.0)
    assert out["update_norm"] == pytest.approx(4.0)
    assert out["update_cosine"] == pytest.approx(0.0)
    assert trajectory_scalars(b, a) == {"distance_from_first": 3.0}
    assert math.isnan(trajectory_scalars(b, a, b, a)["update_cosine"])


def test_ensure_config_json_writes_a_missing_config_only(tmp_path):
    """A sharded save writes no config.json; the triggers add the model's so the backfill can rebuild it."""
    from transformers import Qwen2Config

    from uma_callbacks.checkpoints import ensure_config_json, read_config

    class Model:
        config = Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)

    folder = tmp_path / "checkpoint-2"
    assert not ensure_config_json(folder, Model())  # no folder: nothing written
    folder.mkdir()
    assert ensure_config_json(folder, Model()) and read_config(folder)["hidden_size"] == 16
    (folder / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 32}')
    assert not ensure_config_json(folder, Model()) and read_config(folder)["hidden_size"] == 32  # kept
    assert not ensure_config_json(folder, object())  # no config to write
