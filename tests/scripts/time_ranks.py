"""Wall time of the metrics on 1 vs N ranks (same probe, sharded); not a test, a measurement.

Usage::

    OMP_NUM_THREADS=2 torchrun --standalone --nproc_per_node 1 tests/scripts/time_ranks.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/scripts/time_ranks.py

Rank 0 prints one JSON line: world size, threads, per-metric seconds (best of ``--repeats``)
and the values, so runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer_cases import tiny_lm_dataset  # noqa: E402
from uma_callbacks.core.distributed import current_collective  # noqa: E402
from uma_callbacks.engine.probe import Probe, pad_collate  # noqa: E402
from uma_callbacks.engine.suite import MetricSuite  # noqa: E402


def main() -> None:
    """Measure and print (rank 0)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--metrics", default="gradient_flow,fisher")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if "RANK" in __import__("os").environ:
        torch.distributed.init_process_group("gloo")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=200, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    probe = Probe.from_dataset(tiny_lm_dataset(n=args.probe_size, length=32, vocab=200), args.probe_size,
                               batch_size=8, collate_fn=pad_collate)  # fmt: skip
    collective = current_collective()
    suite = MetricSuite(metrics=[__import__("uma_callbacks").metrics.METRICS[m]() for m in args.metrics.split(",")],
                        collective=collective, use_cache=False)  # fmt: skip
    best: dict[str, float] = {}
    values: dict[str, float] = {}
    for _ in range(args.repeats):
        if collective.world_size > 1:
            collective.barrier()
        for metric in suite.metrics:
            suite.metrics = [metric]
            started = time.perf_counter()
            record = suite.run(model, probe, step=0)[0]
            best[metric.name] = min(best.get(metric.name, float("inf")), time.perf_counter() - started)
            values[metric.name] = record.scalars.get("total_norm", record.scalars.get("trace"))
        suite.metrics = [__import__("uma_callbacks").metrics.METRICS[m]() for m in args.metrics.split(",")]
    if collective.rank == 0:
        print(json.dumps({"world_size": collective.world_size, "threads": torch.get_num_threads(),
                          "params": sum(p.numel() for p in model.parameters()), "probe": probe.n_samples,
                          "seconds": best, "values": values}))  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
