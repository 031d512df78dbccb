"""Sharded (FSDP2) memory per rank: the Fisher diagonal on 1 rank and on 2 ranks.

The same float32 Qwen2 (seed 0) and probe, ``fully_shard`` per decoder layer and on the
root, under ``torchrun --nproc_per_node R`` (gloo, CPU) for R = 1 and 2. Each rank reports
its peak: the bytes of its parameter shards plus the peak RSS rise while ``fisher``
(diagonal, traces; per-sample sums reduce-scattered into the shard a bucket of parameters
at a time) runs. After the model is built and sharded, one warm-up run (lazy initialisation),
``gc.collect()`` and glibc's ``malloc_trim(0)`` (the warm-up's freed heap pages go back to
the OS), the high-water mark is reset in the worker (``/proc/self/clear_refs``), so the rise
is what the run allocates (``method`` says if it fell back to sampling).

Without the trim the freed warm-up heap stays in the process's RSS and the measured run
reuses it unseen: the "rise" is then only what exceeds that pool (a lower bound that hides
most of the run, e.g. 36 MiB of a 215 MiB peak at 1 rank). That figure is still printed,
from a run before the trim, as ``..._untrimmed``.

Also printed: the planner's fixed bytes per rank for the same metric (the shard plus the
largest gathered block, :func:`~uma_callbacks.engine.budget.rank_param_bytes`).

    python bench/sharded.py --quick

Ends with ``name=value`` lines; ``fisher_peak_2ranks_over_1rank`` is the largest rank's
peak at 2 ranks over the peak at 1 rank (target <= 0.65: the sharded part halves).
"""

from __future__ import annotations

import argparse
import gc
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
    hidden, layers = (256, 8) if quick else (512, 12)
    config = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return Qwen2ForCausalLM(config)


def worker(out: Path, quick: bool) -> None:
    """One rank: build, shard, reset the high-water mark, run fisher, write its figures."""
    from torch.distributed.fsdp import fully_shard

    from uma_callbacks.core.batches import count_samples
    from uma_callbacks.core.distributed import current_collective
    from uma_callbacks.core.peak_memory import PeakMemory
    from uma_callbacks.core.sharding import shard_bytes
    from uma_callbacks.engine.budget import MemoryBudget, rank_param_bytes
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.metrics import FisherInformation

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = build(quick)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    probe = Probe([{"input_ids": ids, "labels": ids}])
    metric = FisherInformation(top_k=None, keep_diagonal=True, chunk_size=4)
    metric.compute(model, probe.shard(rank, world), collective=current_collective())  # warm-up: lazy inits, arenas
    gc.collect()
    _reset_high_water_mark()
    with PeakMemory() as untrimmed:  # the freed warm-up heap is reused unseen: a lower bound
        metric.compute(model, probe.shard(rank, world), collective=current_collective())
    gc.collect()
    _trim_heap()  # freed memory goes back to the OS: the rise below is what the run allocates
    _reset_high_water_mark()
    started = time.perf_counter()
    with PeakMemory() as meter:
        result = metric.compute(model, probe.shard(rank, world), collective=current_collective())
    seconds = time.perf_counter() - started
    sizes = shard_bytes(model)
    n_local = sum(count_samples(b) for b in probe.shard(rank, world))
    plan = MemoryBudget(max_bytes=2**40).plan(metric, sizes.full, 0, 4, n_params=_entries(model), n_samples=n_local,
                                              sharding=rank_param_bytes(model))  # fmt: skip
    row = {"rank": rank, "world": world, "shard": sizes.shard, "full": sizes.full, "largest_block": sizes.largest_block,
           "metric_peak": meter.peak_bytes, "method": meter.method, "seconds": seconds,
           "untrimmed_peak": untrimmed.peak_bytes, "planned_fixed": plan.fixed_bytes,
           "trace": result.scalars["trace"]}  # fmt: skip
    (out / f"rank{rank}_of{world}.json").write_text(json.dumps(row))
    torch.distributed.destroy_process_group()


def _entries(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _reset_high_water_mark() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: this process is ours
    except OSError:
        pass


def _trim_heap() -> None:
    """Return glibc's free heap pages to the OS (``malloc_trim(0)``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run(world: int, quick: bool, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(Path(__file__).resolve()), "--worker", "--out", str(out)] + (["--quick"] if quick else [])  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads((out / f"rank{r}_of{world}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.out), args.quick)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = {w: run(w, args.quick, Path(tmp)) for w in (1, 2)}
    mib = 2**20
    peaks, untrimmed, planned = {}, {}, {}
    for w, ranks in rows.items():
        for r in ranks:
            total = r["shard"] + r["metric_peak"]
            print(f"{w} rank(s), rank {r['rank']}: shard {r['shard'] / mib:6.1f} MiB of {r['full'] / mib:.1f}, "
                  f"largest gathered block {r['largest_block'] / mib:.1f} MiB, fisher peak rise "
                  f"{r['metric_peak'] / mib:6.1f} MiB ({r['method']}; untrimmed {r['untrimmed_peak'] / mib:.1f}), "
                  f"planned fixed {r['planned_fixed'] / mib:.1f} MiB, total {total / mib:6.1f} MiB, "
                  f"{r['seconds']:.2f} s, trace {r['trace']:.6g}")  # fmt: skip
        peaks[w] = max(r["shard"] + r["metric_peak"] for r in ranks)
        untrimmed[w] = max(r["shard"] + r["untrimmed_peak"] for r in ranks)
        planned[w] = max(r["planned_fixed"] for r in ranks)
    trace_rel = abs(rows[2][0]["trace"] - rows[1][0]["trace"]) / abs(rows[1][0]["trace"])
    summary = {
        "fisher_peak_1rank_mib": peaks[1] / mib,
        "fisher_peak_2ranks_mib": peaks[2] / mib,
        "fisher_peak_2ranks_over_1rank": peaks[2] / peaks[1],
        "fisher_peak_2ranks_over_1rank_untrimmed": untrimmed[2] / untrimmed[1],
        "fisher_planned_fixed_1rank_mib": planned[1] / mib,
        "fisher_planned_fixed_2ranks_over_1rank": planned[2] / planned[1],
        "fisher_trace_rel_diff_2ranks_vs_1": trace_rel,
    }
    for key, value in summary.items():
        print(f"{key}={value:.4g}")


if __name__ == "__main__":
    main()
