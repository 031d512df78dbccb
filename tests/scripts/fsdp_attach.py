"""``attach()`` on an FSDP2 (``fully_shard``) tiny Qwen2 in an Accelerate training loop under torchrun.

For ``tests/distributed/test_fsdp_attach.py`` (whose fixture runs it with the other 2-rank scripts,
one torchrun: ``tests/scripts/two_rank_runs.py``), or alone::

    MLFLOW_TRACKING_URI=sqlite:///DIR/mlflow.db \
        torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_attach.py --out DIR

Every rank: ``Accelerator(cpu=True)`` (``MULTI_CPU``, gloo), a float64 tiny Qwen2 (seed 0)
sharded per decoder layer and on the root. ``accelerator.prepare(model)`` would wrap it in
DDP, which fails on DTensor parameters (checked on a second sharded copy), so only the
optimizer and the dataloader are prepared and the model is given to
``attach(..., model=model)``. Four optimizer steps with ``accelerator.save_state`` at steps
2 and 4 (the metrics run inside it, planned by the memory budget), then ``handle.measure``
at step 6 on the same weights (the cache answers). Rank 0 writes ``fsdp_attach.json``: the
records, the one-process values of the same metrics on the gathered weights, and the
checks made on every rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scripts.fsdp_metrics import probe_batches, tiny_qwen


def metrics() -> list:
    """The attached metrics, all planned by the memory budget (no chunk sizes given); fresh
    objects, the same configs give the same cache keys."""
    from uma_callbacks.metrics import CheckpointInterpolation, FisherInformation, GradientFlow, LossLandscape

    return [GradientFlow(), FisherInformation(top_k=3, keep_diagonal=True), LossLandscape(n_points=3, span=0.5),
            CheckpointInterpolation(n_points=3, extend=0.0)]  # fmt: skip


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` per decoder layer, then the root (as users wrap it)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    """Parse ``--out`` and run (the Accelerator starts the process group)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, project_dir=args.out)
    try:
        run(accelerator, Path(args.out))
    finally:
        accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(accelerator, out: Path) -> None:
    """The training loop, the measurements and the checks."""
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from uma_callbacks.core.sharding import is_dtensor, local
    from uma_callbacks.engine.budget import RankParamBytes, planned_bytes, rank_param_bytes
    from uma_callbacks.engine.snapshot import weights_fingerprint
    from uma_callbacks.metrics import CheckpointInterpolation
    from uma_callbacks.triggers.accelerate import attach

    rank, world = accelerator.process_index, accelerator.num_processes
    checks: dict[str, object] = {"distributed_type": str(accelerator.distributed_type)}

    # what Accelerate does with a fully_shard-ed model on MULTI_CPU (a throwaway accelerator and copy)
    try:
        Accelerator(cpu=True).prepare(shard(tiny_qwen()))
        checks["prepare_model"] = "accepted"
    except RuntimeError as err:
        checks["prepare_model"] = f"{type(err).__name__}: {err}"[:300]

    model = shard(tiny_qwen())
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(2))  # 4 batches of 2 per rank
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer, loader = accelerator.prepare(optimizer, loader)
    state = {"step": 0}
    handle = attach(accelerator, metrics(), probe_batches(), model=model, global_step=lambda: state["step"],
                    trackers=["mlflow"], output_dir=str(out / "uma"), use_cache=True, draw_figures=False,
                    timeout_seconds=120)  # fmt: skip
    checks["journal"] = handle.journal is not None

    steps, previous_full = [], None
    batches = iter(loader)
    for step in (1, 2, 3, 4):
        model.train()
        loss = model(**next(batches)).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        if step % 2:
            continue
        before = {n: local(p).detach().clone() for n, p in model.named_parameters()}
        accelerator.save_state(str(out / f"ckpt-{step}"))
        same = all(torch.equal(before[n], local(p)) for n, p in model.named_parameters())
        checks[f"bit_identical_{step}"] = same and all(is_dtensor(p) and p.grad is None for p in model.parameters())
        # the one-process reference on the gathered weights (gathered here, for the test only)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        reference = tiny_qwen()
        reference.load_state_dict(full, strict=False)
        single = {m.name: m.compute(reference, probe_batches()) for m in metrics()[:3]}
        if previous_full is not None:
            single["interpolation"] = CheckpointInterpolation(n_points=3, extend=0.0, previous=previous_full).compute(
                reference, probe_batches()
            )
        previous_full = full
        steps.append({"step": step, "single": {k: v.scalars for k, v in single.items()},
                      "single_eigs": single["fisher"].arrays["top_eigenvalues"].tolist(),
                      "reference_fingerprint": weights_fingerprint(reference)})  # fmt: skip

    # the fingerprint: shard by shard, never a full_tensor() of a Shard(0) parameter
    gathered_calls: list[int] = []
    original = DTensor.full_tensor

    def counting(self, *args, **kwargs):
        gathered_calls.append(1)
        return original(self, *args, **kwargs)

    DTensor.full_tensor = counting
    try:
        fingerprint = weights_fingerprint(model)
    finally:
        DTensor.full_tensor = original
    checks["fingerprint"] = fingerprint
    checks["fingerprint_full_tensor_calls"] = len(gathered_calls)
    checks["reference_fingerprint"] = steps[-1]["reference_fingerprint"]

    # the same weights again: every metric whose key is unchanged comes from the cache
    cached = handle.measure(step=6)
    checks["statuses_6"] = {r.metric: r.status for r in cached}

    # planned bytes per rank: these 2 ranks against the same model on 1 rank (shard = full)
    here = rank_param_bytes(model)
    one = RankParamBytes(held=here.full, held_entries=here.full_entries, full=here.full,
                         full_entries=here.full_entries, gathered=here.gathered)  # fmt: skip
    checks["rank_param_bytes"] = [here.held, here.full, here.gathered]
    planned = {}
    for record in handle.records:
        if record.step != 4 or record.status != "ok":
            continue
        metric = next(m for m in handle.session.config.metric_objects if m.name == record.metric)
        cost = dict(metric.memory_modes())[record.meta["memory_mode"]]
        sizes = {"n_params": here.full_entries, "n_samples": 7, "on_host": True}
        fixed_1, _ = planned_bytes(cost, here.full, record.meta["measured_sample_bytes"], sizes, one)
        # before the calibration by the metric's earlier peak (a measured peak over its plan, which
        # the load on the machine sways): the plan itself, on 2 ranks and on 1
        planned[record.metric] = [record.meta["planned_base_fixed_bytes"], fixed_1]
    checks["planned_fixed_bytes_2_vs_1"] = planned
    handle.remove()

    records = [r.to_json_dict() if hasattr(r, "to_json_dict") else vars(r) for r in handle.records]
    everyone: list[object] = [None] * world
    torch.distributed.all_gather_object(everyone, checks)
    if rank == 0:
        run_ids = [s.run_id() for s in handle.sinks if hasattr(s, "run_id")]
        summary = {"world_size": world, "checks": everyone, "steps": steps, "records": records, "mlflow_run_ids": run_ids,
                   "journal_lines": len((out / "uma" / "journal.jsonl").read_text().splitlines())}  # fmt: skip
        (out / "fsdp_attach.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
