"""Metrics on an FSDP2 (``fully_shard``) tiny Qwen2 under torchrun, against one process.

For ``tests/distributed/test_fsdp.py`` (whose fixture runs it with the other 2-rank scripts, one
torchrun: ``tests/scripts/two_rank_runs.py``), or alone::

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_metrics.py --out DIR

Every rank: a float64 tiny Qwen2 (seed 0), an unsharded copy kept as the reference, then
``fully_shard`` per decoder layer and on the root, two optimizer steps of a training loop
with a :class:`~uma_callbacks.session.Session` measuring after each. Rank 0 writes
``fsdp_result.json``: the sharded records, the one-process values of the same metrics on
the reference copy (same weights, same probe), and the checks made on every rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult


class FailsOnRank1(Metric):
    """A sharded-capable metric whose rank 1 fails before its first FSDP forward."""

    name = "fails_on_rank1"
    supports_sharded = True

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        if ctx.collective.rank == 1:
            raise RuntimeError("rank 1 broke before its forward")
        ctx.collective.agree()
        with torch.no_grad():
            loss = ctx.loss_fn(ctx.model, ctx.batches[0]).sum()  # FSDP all-gathers: would hang unguarded
        return MetricResult(name=self.name, scalars={"loss": float(loss)})


#: the metrics compared with one process
REFERENCED = ("gradient_flow", "fisher", "landscape", "interpolation")


def tiny_qwen() -> torch.nn.Module:
    """A float64 2-layer Qwen2 from config, seed 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return Qwen2ForCausalLM(config).double()


def probe_batches() -> list[dict[str, torch.Tensor]]:
    """7 samples in 2 batches (the ranks get 4 and 3 samples: unequal chunk counts)."""
    ids = torch.randint(0, 64, (7, 8), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}]


def main() -> None:
    """Train two steps sharded, measure, compare; rank 0 writes the summary."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    torch.distributed.init_process_group("gloo")
    try:
        run(out)
    finally:
        torch.distributed.destroy_process_group()


def run(out: Path) -> None:
    """The body of :func:`main` (the process group is up)."""
    from torch.distributed.fsdp import fully_shard

    from uma_callbacks.config import UMAConfig
    from uma_callbacks.core.distributed import current_collective
    from uma_callbacks.core.sharding import is_dtensor, local, local_entries, local_rows, shard_bytes
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.metrics import (
        METRICS,
        CheckpointInterpolation,
        FisherInformation,
        GradientFlow,
        LossLandscape,
    )
    from uma_callbacks.metrics import fisher as fisher_module
    from uma_callbacks.session import Session

    rank = torch.distributed.get_rank()
    model = tiny_qwen()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    probe = Probe(probe_batches())

    def metrics() -> list[Metric]:
        return [GradientFlow(), FisherInformation(top_k=3, keep_diagonal=True), FailsOnRank1(), METRICS["hessian"](),
                LossLandscape(n_points=3, span=0.5), CheckpointInterpolation(n_points=3, extend=0.0)]  # fmt: skip

    def lean() -> LossLandscape:  # regenerated directions, layer norms, 1-D tensors split over ranks
        return LossLandscape(n_points=3, span=0.5, dims=1, normalization="layer", include_1d_params=True, mode="lean")

    config = UMAConfig(metrics=metrics(), use_cache=False, draw_figures=False, timeout_seconds=120,
                       chunk_sizes={"fisher": 1, "gradient_flow": 2, "landscape": 3, "interpolation": 1})  # fmt: skip
    session = Session(config, out / "uma", source="callback")
    session.open(probe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train = {"input_ids": probe.batches[0]["input_ids"][rank::2], "labels": probe.batches[0]["labels"][rank::2]}
    checks: dict[str, object] = {"all_dtensor": all(is_dtensor(p) for p in model.parameters())}
    steps = []
    previous_full: dict[str, torch.Tensor] | None = None
    for step in (1, 2):
        model.train()
        model(**train).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        before = {n: local(p).detach().clone() for n, p in model.named_parameters()}
        records = session.measure(model, step)
        after = {n: local(p) for n, p in model.named_parameters()}
        same = all(torch.equal(before[n], after[n]) for n in before) and all(p.grad is None for p in model.parameters())
        checks[f"bit_identical_{step}"] = same and all(is_dtensor(p) for p in model.parameters())
        # the one-process reference: the full weights (gathered here, for the test only)
        reference = tiny_qwen()
        reference.load_state_dict({n: p.full_tensor() for n, p in model.named_parameters()}, strict=False)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        single = {m.name: m.compute(reference, probe.batches) for m in metrics() if m.name in REFERENCED[:3]}
        if previous_full is not None:
            single["interpolation"] = CheckpointInterpolation(n_points=3, extend=0.0, previous=previous_full).compute(
                reference, probe.batches
            )
        previous_full = full
        lean_one = lean().compute(reference, probe.batches).arrays["grid_losses"]
        lean_sharded = lean().compute(model, probe.shard(rank, 2), collective=current_collective(), chunk_size=1)
        checks[f"lean_rel_err_{step}"] = float(abs(lean_sharded.arrays["grid_losses"] - lean_one).max() / abs(lean_one).max())
        # the Fisher diagonal: this rank's shard against the reference's rows
        ref_diag = single["fisher"].tensors
        params = dict(model.named_parameters())
        diag_err = 0.0
        direct = FisherInformation(top_k=None, keep_diagonal=True, chunk_size=1).compute(
            model, probe.shard(rank, 2), collective=current_collective()
        )
        for name, shard in direct.tensors.items():
            want = local_rows(ref_diag[name], params[name])
            diag_err = max(diag_err, float((shard - want).abs().max() / want.abs().max().clamp_min(1e-300)))
        checks[f"diag_rel_err_{step}"] = diag_err
        # top-k by Lanczos on sharded vectors: each rank's basis holds its shards' entries only;
        # the same top eigenvalues as one process by Lanczos (the Gram path switched off) and by
        # the exact Gram matrix. At the second step only: the costliest check of this script
        # (two more sharded Lanczos runs), and the first step's weights would show nothing more
        if step == 2:
            spectrum = {"top_k": 3, "max_matvecs": 40, "lanczos_tol": 1e-10, "chunk_size": 1}
            sharded_top = FisherInformation(**spectrum).compute(model, probe.shard(rank, 2), collective=current_collective())
            streamed = FisherInformation(**spectrum, cache_bytes=0).compute(  # products recompute the chunks (ghosts too)
                model, probe.shard(rank, 2), collective=current_collective()
            )
            gram_rows, fisher_module.GRAM_MAX_ROWS = fisher_module.GRAM_MAX_ROWS, 0
            try:
                lanczos_one = FisherInformation(**spectrum).compute(reference, probe.batches)
            finally:
                fisher_module.GRAM_MAX_ROWS = gram_rows
            gram_one = single["fisher"].arrays["top_eigenvalues"]
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            record = {r.metric: r for r in records}["fisher"]
            checks[f"lanczos_{step}"] = {
                "methods": [sharded_top.meta["spectrum_method"], lanczos_one.meta["spectrum_method"],
                            record.meta.get("spectrum_method")],
                "converged": bool(sharded_top.meta["lanczos_converged"]),
                "eigs": sharded_top.arrays["top_eigenvalues"].tolist(),
                "streamed": [streamed.arrays["top_eigenvalues"].tolist(), streamed.meta["cached"]],
                "lanczos_one": lanczos_one.arrays["top_eigenvalues"].tolist(),
                "gram_one": gram_one.tolist(),
                "entries": [sharded_top.meta["lanczos_vector_entries"], record.meta.get("lanczos_vector_entries"),
                            local_entries(trainable), sum(p.numel() for p in trainable.values()),
                            lanczos_one.meta["lanczos_vector_entries"]],
            }  # fmt: skip
        checks[f"statuses_{step}"] = [[r.metric, r.status] for r in records]
        checks[f"errors_{step}"] = {r.metric: (r.error or {}).get("message", "") for r in records}
        steps.append({"step": step, "records": [r.to_json_dict() if hasattr(r, "to_json_dict") else vars(r) for r in records],
                      "single": {k: v.scalars for k, v in single.items()},
                      "single_eigs": single["fisher"].arrays["top_eigenvalues"].tolist()})  # fmt: skip
    sizes = shard_bytes(model)
    checks["shard_bytes"] = [sizes.shard, sizes.full, sizes.largest_block]
    checks["planned_lanczos"] = planned_lanczos(model)
    checks["journal"] = session.journal is not None
    gathered: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, checks)
    session.finish()
    if rank == 0:
        summary = {"world_size": torch.distributed.get_world_size(), "checks": gathered, "steps": steps,
                   "journal_lines": len((out / "uma" / "journal.jsonl").read_text().splitlines())}  # fmt: skip
        (out / "fsdp_result.json").write_text(json.dumps(summary, default=str))


def planned_lanczos(model: torch.nn.Module) -> dict[str, int]:
    """The planner's Fisher Lanczos basis on this rank: ``basis_full`` / ``basis_shard`` (the
    basis priced on the full model and on this rank's entries) and ``saved``, what the
    ``"streamed"`` mode's sharded fixed bytes drop by once the basis and its work vectors are
    priced on the shard (expected ``expected_saved``)."""
    import dataclasses

    from uma_callbacks.engine.budget import planned_bytes, rank_param_bytes
    from uma_callbacks.metrics import FisherInformation

    sizes = rank_param_bytes(model)
    fisher = FisherInformation(top_k=3, max_matvecs=40)
    n, held, itemsize = sizes.full_entries, sizes.held_entries, sizes.full / sizes.full_entries
    cost = dict(fisher.memory_modes())["streamed"]
    plain_extra = dataclasses.replace(cost, extra_bytes=lambda *a: cost.extra_bytes(*a))  # no on_shard
    shape = {"n_params": n, "n_samples": 4, "on_host": True}
    fixed = planned_bytes(cost, sizes.full, 1000, shape, sizes)[0]
    before = planned_bytes(plain_extra, sizes.full, 1000, shape, sizes)[0]
    basis = [fisher._lanczos_bytes(n, itemsize, 4), fisher._lanczos_bytes(n, itemsize, 4, held)]
    work = [fisher._lanczos_work_bytes(n, itemsize, 4), fisher._lanczos_work_bytes(n, itemsize, 4, held)]
    return {"basis_full": basis[0], "basis_shard": basis[1], "saved": before - fixed,
            "expected_saved": basis[0] - basis[1] + work[0] - work[1]}  # fmt: skip


if __name__ == "__main__":
    main()
