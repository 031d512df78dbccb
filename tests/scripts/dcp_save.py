"""Sharded (DCP) checkpoints of an FSDP2 tiny Qwen2, written the way Accelerate writes them.

Run by ``tests/core/test_dcp.py`` and ``tests/triggers/test_dcp_backfill.py`` (through
``tests/core/dcp_run.py``)::

    torchrun --standalone --nproc_per_node 2 tests/scripts/dcp_save.py --out DIR

Every rank builds the float64 tiny Qwen2 of ``tests/cases.py`` (seed 0), shards it with
``fully_shard`` per decoder layer and on the root, and takes SGD steps on a fixed batch.
After steps 2 and 4 the model and the optimizer are saved by Accelerate's own
``save_fsdp_model`` / ``save_fsdp_optimizer`` (a ``FullyShardedDataParallelPlugin`` with
``fsdp_version=2, state_dict_type="SHARDED_STATE_DICT"``) into
``DIR/dcp/checkpoint-<N>/pytorch_model_fsdp_0/`` and ``.../optimizer_0/``; rank 0 adds
``trainer_state.json`` and ``config.json`` as the Trainer does. The oracle: each parameter's
``DTensor.full_tensor()`` (all-gathered by FSDP itself, not by DCP), written by rank 0 with
safetensors into ``DIR/safetensors/checkpoint-<N>/model.safetensors`` beside the same
``config.json`` and ``trainer_state.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

STEPS = (2, 4)


def main() -> None:
    """Train 4 steps sharded over the ranks; save at steps 2 and 4."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    try:
        run(Path(args.out))
    finally:
        torch.distributed.destroy_process_group()


def run(out: Path) -> None:
    """The body of :func:`main` (the process group is up)."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model, save_fsdp_optimizer
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from tests.cases import tiny_qwen2

    PartialState(cpu=True)  # Accelerate's logger (used by save_fsdp_*) needs its state
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = tiny_qwen2()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(3))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    accelerator = SimpleNamespace(process_index=rank, num_processes=world)  # what save_fsdp_* read
    for step in range(1, max(STEPS) + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step not in STEPS:
            continue
        folder = out / "dcp" / f"checkpoint-{step}"
        save_fsdp_model(plugin, accelerator, model, str(folder))
        save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder))
        full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        if rank == 0:
            oracle = out / "safetensors" / f"checkpoint-{step}"
            oracle.mkdir(parents=True)
            save_file(full, str(oracle / "model.safetensors"))
            for target in (folder, oracle):
                model.config.to_json_file(str(target / "config.json"))
                (target / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.distributed.barrier()
    if rank == 0:
        (out / "done.json").write_text(json.dumps({"world_size": world, "steps": list(STEPS)}))


if __name__ == "__main__":
    main()
