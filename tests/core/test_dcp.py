"""Sharded (DCP) checkpoints gathered into full tensors: bit-exact, and hostile files refused.

Unit tests save with ``torch.distributed.checkpoint.save`` in one process (no process group),
laid out as Accelerate lays them out (``<checkpoint>/pytorch_model_fsdp_0/`` holding
``{"model": state_dict}``, ``optimizer_0/`` beside it). The slow test reads real two-rank
files written by Accelerate's ``save_fsdp_model`` from a ``fully_shard`` model under torchrun.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.cases import ragged_lm_batches, tiny_qwen2
from uma_callbacks.checkpoints import discover_checkpoints, load_weights, read_weights, weight_files
from uma_callbacks.core.dcp import GatherExceedsBudget, load_dcp, plan_dcp, read_metadata

MODEL = "pytorch_model_fsdp_0"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _save(checkpoint: Path, state: dict, wrap: bool = True, optimizer: bool = True) -> Path:
    """A checkpoint folder as Accelerate's ``save_fsdp_model`` writes it; returns the DCP folder."""
    folder = checkpoint / MODEL
    dcp.save({"model": state} if wrap else state, checkpoint_id=str(folder))
    if optimizer:  # the optimizer's folder sits beside it and must be ignored
        dcp.save(
            {"optimizer": {"state": {"0": {"momentum": torch.ones(3)}}, "lr": 0.1}},
            checkpoint_id=str(checkpoint / "optimizer_0"),
        )
    return folder


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def qwen_checkpoint(tmp_path):
    """A float64 tiny Qwen2's state saved as a DCP checkpoint folder; ``(folder, state)``."""
    state = {k: v.clone() for k, v in tiny_qwen2().state_dict().items()}
    _save(tmp_path / "checkpoint-3", state)
    return tmp_path / "checkpoint-3", state


def _rewrite(folder: Path, change) -> None:
    """Re-pickle ``folder``'s metadata after ``change(metadata)`` (a forged checkpoint)."""
    metadata = read_metadata(folder)
    change(metadata)
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)


# ---------------------------------------------------------------------- round trips
def test_float64_qwen2_round_trip_is_bit_exact_and_ignores_the_optimizer(qwen_checkpoint):
    folder, state = qwen_checkpoint
    assert weight_files(folder) == [folder / MODEL]
    weights, meta = read_weights(folder)
    assert _bits_equal(weights, state)  # "model." prefix of Accelerate's {"model": ...} removed
    assert meta["format"] == "dcp" and meta["shards"] == 1 and meta["tensors"] == len(state)
    assert meta["gathered_bytes"] == sum(t.numel() * t.element_size() for t in state.values())


def test_unwrapped_state_dict_mixed_dtypes_and_non_tensor_entries(tmp_path):
    """Names as saved when there is no ``"model"`` entry; dtypes kept; a non-tensor entry (a pickle
    inside the data file) is named in meta and never read."""
    state = {
        "a.weight": torch.randn(3, 4, dtype=torch.float64),
        "b": torch.arange(5),
        "c": torch.randn(2).bfloat16(),
    }
    _save(tmp_path, {**state, "note": "not a tensor"}, wrap=False, optimizer=False)
    weights, meta = load_dcp(tmp_path / MODEL)
    assert _bits_equal(weights, state)
    assert meta["ignored_entries"] == ["note"]


def test_accelerate_save_state_folder_is_discovered_and_loaded(tmp_path):
    """``uma_state.json`` (the Accelerate hook's step file) + config.json + the DCP folder."""
    model = tiny_qwen2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "run" / "checkpoint_0"
    _save(folder, state)
    model.config.to_json_file(str(folder / "config.json"))
    (folder / "uma_state.json").write_text(json.dumps({"step": 7}))
    [found] = discover_checkpoints(tmp_path / "run")
    assert (found.step, found.kind) == (7, "accelerate")
    assert _bits_equal(load_weights(found.path), state)


@pytest.mark.slow
def test_two_rank_fully_shard_checkpoints_gather_bit_exact():
    """Real shards: each 2-D weight is split over the two ranks' files; gathered == FSDP's full_tensor()."""
    from safetensors.torch import load_file

    from tests.core.dcp_run import sharded_run

    run = sharded_run()
    for step in (2, 4):
        folder = run / "dcp" / f"checkpoint-{step}"
        plan = plan_dcp(folder / MODEL)
        assert plan.files == ("__0_0.distcp", "__1_0.distcp")
        assert all(len(t.pieces) == 2 for t in plan.tensors if len(t.size) == 2)
        weights, meta = read_weights(folder)
        assert meta["shards"] == 2
        assert _bits_equal(
            weights, load_file(str(run / "safetensors" / f"checkpoint-{step}" / "model.safetensors"))
        )
    assert not _bits_equal(
        *(load_weights(run / "dcp" / f"checkpoint-{s}") for s in (2, 4))
    )  # training moved it


# ---------------------------------------------------------------------- hostile files
class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["whole file", "inside the metadata"])
def test_metadata_pickle_calling_os_system_is_refused_and_never_runs(qwen_checkpoint, tmp_path, where):
    folder, _ = qwen_checkpoint
    marker = tmp_path / "pwned"
    if where == "whole file":
        (folder / MODEL / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    else:
        _rewrite(folder / MODEL, lambda md: setattr(md, "planner_data", {"x": _Boom(marker)}))
    with pytest.raises(ValueError, match=r"\.metadata refused: .*(posix|os)\.system"):
        load_weights(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["../outside.distcp", "/tmp/outside.distcp", "sub/__0_0.distcp", "..", "link.distcp"]
)
def test_metadata_naming_a_data_file_outside_the_folder_is_refused(qwen_checkpoint, tmp_path, name):
    folder, _ = qwen_checkpoint
    data = (folder / MODEL / "__0_0.distcp").read_bytes()
    (folder / "outside.distcp").write_bytes(data)  # a valid copy, one folder up
    (folder / MODEL / "link.distcp").symlink_to(folder / "outside.distcp")

    def point_outside(md):
        for info in md.storage_data.values():
            info.relative_path = name

    _rewrite(folder / MODEL, point_outside)
    with pytest.raises(ValueError, match="outside its checkpoint folder"):
        load_weights(folder)


def test_truncated_data_file_is_a_clear_error(qwen_checkpoint):
    folder, _ = qwen_checkpoint
    path = folder / MODEL / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"__0_0\.distcp, which holds \d+ bytes \(truncated or damaged\)"):
        load_weights(folder)


def test_damaged_chunk_bytes_are_a_clear_error(qwen_checkpoint):
    folder, _ = qwen_checkpoint
    path = folder / MODEL / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot be read"):
        load_weights(folder)


def test_chunk_of_another_tensor_is_refused(qwen_checkpoint):
    """The norm's chunk pointed at the embedding's bytes (long enough): caught by the shape check."""
    folder, _ = qwen_checkpoint

    def point_elsewhere(md):
        infos = {k.fqn: v for k, v in md.storage_data.items()}
        a, b = infos["model.model.embed_tokens.weight"], infos["model.model.norm.weight"]
        b.relative_path, b.offset, b.length = a.relative_path, a.offset, a.length

    _rewrite(folder / MODEL, point_elsewhere)
    with pytest.raises(ValueError, match="the metadata says"):
        load_weights(folder)


@pytest.mark.parametrize(
    ("forgery", "message"),
    [
        ("overlap", "two chunks of .* overlap"),
        ("outside", "lies outside its size"),
        ("range", "truncated or damaged"),
        ("inflated", "claims 8000000000000 bytes of torch.float64 data but its byte range holds only"),
    ],
)
def test_inconsistent_chunks_and_ranges_are_refused(qwen_checkpoint, forgery, message):
    folder, _ = qwen_checkpoint

    def forge(md):
        entry = md.state_dict_metadata["model.lm_head.weight"]
        if forgery == "overlap":
            entry.chunks = entry.chunks * 2
            entry.size = torch.Size([entry.size[0] * 2, entry.size[1]])
        elif forgery == "outside":
            entry.size = torch.Size([1, 1])
        elif forgery == "inflated":  # a size no file backs: refused before anything is allocated
            entry.size = entry.chunks[0].sizes = torch.Size([10**6, 10**6])
        else:
            for key, info in md.storage_data.items():
                if key.fqn == "model.lm_head.weight":
                    info.length = 2**40

    _rewrite(folder / MODEL, forge)
    with pytest.raises(ValueError, match=message):
        load_weights(folder)


def test_gathering_above_the_budget_is_refused_before_reading(qwen_checkpoint):
    folder, state = qwen_checkpoint
    total = sum(t.numel() * t.element_size() for t in state.values())
    for name in ("__0_0.distcp",):  # nothing is read: even a damaged data file is not touched
        path = folder / MODEL / name
        path.write_bytes(bytes(path.stat().st_size))
    with pytest.raises(GatherExceedsBudget, match=r"needs 0\.\d+ MiB, above the memory budget"):
        load_weights(folder, max_bytes=total - 1)


@pytest.mark.slow
def test_backfill_with_a_too_small_budget_records_the_reason(qwen_checkpoint, tmp_path):
    from uma_callbacks.triggers.backfill import backfill

    folder, _ = qwen_checkpoint
    tiny_qwen2().config.to_json_file(str(folder / "config.json"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    summary = backfill(
        folder.parent,
        metrics=["gradient_flow"],
        probe=ragged_lm_batches(),
        memory_budget=1e-5,
        output_dir=tmp_path / "uma",
        progress=False,
        draw_figures=False,
    )
    [record] = summary.records
    assert (record.metric, record.status, record.step) == ("checkpoint", "error", 3)
    assert (
        record.error["type"] == "GatherExceedsBudget" and "above the memory budget" in record.error["message"]
    )


def test_missing_config_of_a_sharded_checkpoint_says_what_to_do(qwen_checkpoint):
    from uma_callbacks.checkpoints import read_config

    folder, _ = qwen_checkpoint
    with pytest.raises(FileNotFoundError, match="beside a sharded FSDP checkpoint"):
        read_config(folder)
