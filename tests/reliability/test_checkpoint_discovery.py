"""Issue 17 item 10: broken checkpoint folders are reported, foreign shards refused, duplicate steps kept.

- a ``trainer_state.json`` that is not JSON, and a folder symlink loop, are ``(path, reason)``
  problems of :func:`discover_with_problems` (the backfill's error records), not silence;
- a sharded index naming a shard outside its folder is refused (it would load another
  checkpoint's weights);
- two folders claiming one step are both returned, told apart by their path.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from uma_callbacks.checkpoints import discover_checkpoints, load_weights, weight_files


def _ckpt(root, name, step, weights=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file(weights or {"w": torch.full((2,), float(step))}, str(folder / "model.safetensors"))
    return folder


def test_bad_state_and_symlink_loop_are_problems_not_silence(tmp_path, caplog):
    from uma_callbacks.checkpoints import discover_with_problems

    _ckpt(tmp_path, "checkpoint-1", 1)
    bad = _ckpt(tmp_path, "checkpoint-2", 2)
    (bad / "trainer_state.json").write_text("{not json")
    nostep = _ckpt(tmp_path, "checkpoint-3", 3)
    (nostep / "trainer_state.json").write_text(json.dumps({"global_step": "three"}))
    os.symlink(tmp_path / "checkpoint-9", tmp_path / "checkpoint-9")  # a loop onto itself
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    found, problems = discover_with_problems(tmp_path)
    assert [c.step for c in found] == [1]
    reasons = {p.name: r for p, r in problems}
    assert set(reasons) == {"checkpoint-2", "checkpoint-3", "checkpoint-9", "loop-a", "loop-b"}
    assert "not readable JSON" in reasons["checkpoint-2"] and "global_step" in reasons["checkpoint-3"]
    assert reasons["checkpoint-9"] == "symlink loop"
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        assert [c.step for c in discover_checkpoints(tmp_path)] == [1]  # the old contract, now with warnings
    assert "checkpoint-2" in caplog.text


def test_two_folders_on_one_step_are_both_returned_by_path(tmp_path):
    from uma_callbacks.checkpoints import discover_with_problems

    _ckpt(tmp_path, "checkpoint-5", 5)
    _ckpt(tmp_path, "checkpoint-6", 5)  # e.g. copied from another run, or its state rewritten
    found, problems = discover_with_problems(tmp_path)
    assert problems == []
    assert [(c.step, c.name) for c in found] == [(5, "checkpoint-5"), (5, "checkpoint-6")]
    with pytest.raises(ValueError, match="both claim step 5"):
        discover_checkpoints(tmp_path)  # the old function keeps its contract


@pytest.mark.parametrize("shard", ["../checkpoint-1/model.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_sharded_index_pointing_outside_its_folder_is_refused(tmp_path, shard):
    _ckpt(tmp_path, "checkpoint-1", 1)
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ValueError, match="outside its checkpoint folder"):
        weight_files(folder)
    with pytest.raises(ValueError, match="outside its checkpoint folder"):
        load_weights(folder)


def test_sharded_index_inside_its_folder_loads(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2)}, str(folder / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(load_weights(folder)) == ["a", "b"]
