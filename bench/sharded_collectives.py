"""Sharded (FSDP2) Fisher spectrum: collectives in buckets against one per parameter, side by side.

A float32 Qwen2 (seed 0), ``fully_shard`` per decoder layer and on the root, under
``torchrun --nproc_per_node 2`` (gloo, CPU). Each rank runs ``FisherInformation(top_k=3)``
(Lanczos on the ranks' pieces: every product gathers the vector's pieces and
reduce-scatters the result) twice, alternating, after a warm-up:

- ``buckets``: as shipped (:mod:`uma_callbacks.core.buckets`: one all-gather and one
  reduce-scatter per bucket of at most the largest parameter's entries or 1 MiB);
- ``per_parameter``: every bucket one parameter (the cap forced to 1 entry), which is what
  the metric did before the buckets.

The collectives are counted (``all_reduce`` and ``reduce_scatter_tensor`` calls of rank 0).

    python bench/sharded_collectives.py --quick

Ends with ``name=value`` lines: the seconds of each (the faster of two runs), their
ratio, the collectives per run, and the eigenvalues' largest relative difference (the
sums are the same, entry by entry: 0 or rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(quick: bool) -> torch.nn.Module:
    """A float32 Qwen2 from config, seed 0 (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hidden, layers = (64, 4) if quick else (128, 8)
    config = Qwen2Config(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return Qwen2ForCausalLM(config)


def worker(out: Path, quick: bool) -> None:
    """One rank: shard, warm up, time both ways twice; rank 0 writes the figures."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import uma_callbacks.linalg.fisher_products as products
    from uma_callbacks.core.distributed import current_collective
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.metrics import FisherInformation

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(quick)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    probe = Probe([{"input_ids": ids, "labels": ids}])
    calls = {"n": 0}
    for name in ("all_reduce", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    shipped_cap = products.bucket_cap

    def spectrum(way: str) -> tuple[float, int, list[float]]:
        products.bucket_cap = shipped_cap if way == "buckets" else (lambda params: 1)
        dist.barrier()
        calls["n"] = 0
        started = time.perf_counter()
        result = FisherInformation(top_k=3, max_matvecs=20, chunk_size=4).compute(
            model, probe.shard(rank, 2), collective=current_collective()
        )
        seconds = time.perf_counter() - started
        return seconds, calls["n"], result.arrays["top_eigenvalues"].tolist()

    spectrum("buckets")  # warm-up: lazy initialisation, first all-gathers
    runs: dict[str, list[tuple[float, int, list[float]]]] = {"buckets": [], "per_parameter": []}
    for _ in range(2):
        for way in runs:
            runs[way].append(spectrum(way))
    products.bucket_cap = shipped_cap
    if rank == 0:
        summary = {way: {"seconds": min(r[0] for r in got), "collectives": got[0][1], "eigs": got[0][2]}
                   for way, got in runs.items()}  # fmt: skip
        summary["params"] = sum(1 for _ in model.parameters())
        (out / "result.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model, under a minute")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.quick)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", tmp] + (["--quick"] if args.quick else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, env=env, check=True, cwd=REPO, capture_output=True)
        summary = json.loads((Path(tmp) / "result.json").read_text())
    fast, slow = summary["buckets"], summary["per_parameter"]
    diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(fast["eigs"], slow["eigs"]))
    print(f"{summary['params']} parameters; Fisher top-3 by sharded Lanczos on 2 ranks (gloo)")
    figures = {
        "sharded_fisher_topk_seconds_buckets": fast["seconds"],
        "sharded_fisher_topk_seconds_per_parameter": slow["seconds"],
        "sharded_fisher_topk_buckets_over_per_parameter": fast["seconds"] / slow["seconds"],
        "sharded_fisher_topk_collectives_buckets": fast["collectives"],
        "sharded_fisher_topk_collectives_per_parameter": slow["collectives"],
        "sharded_fisher_topk_eig_rel_diff": diff,
    }
    for key, value in figures.items():
        print(f"{key}={value:.4g}")


if __name__ == "__main__":
    main()
