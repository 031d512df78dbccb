"""Benchmark: AttentionHeads against one plain forward, and Circuits on a small and a 0.5B-shaped Qwen2.

- ``attention_over_forward``: the time of ``AttentionHeads().compute`` (defaults: eager
  attention over the probe with the per-layer reductions, plus the induction pass on 8
  repeated sequences of 50 tokens) over the time of one plain forward (SDPA, no grad) of
  the same probe, on the bench Qwen2 (hidden 128, 2 layers, 4 heads, vocab 2000,
  intermediate 512; probe 16 x 128 tokens, float32, CPU). The two are timed in turn, the
  plain forward just before each metric run, so machine load (a shared machine) hits both;
  the ratio of the medians is reported. ``eager_over_sdpa`` is the share of it that eager
  attention alone costs.
- ``circuits_seconds``: ``Circuits().compute`` (weights only) on the bench Qwen2 and on a
  Qwen2 with Qwen2-0.5B's attention shape (24 layers, 14 heads over 2 key/value heads,
  d_model 896); its MLP is shrunk to 64 and, with ``--quick``, its vocabulary to 2000 (the
  circuits never read the MLP; the vocabulary only enters W_U W_E, d^2 V multiply-adds;
  without ``--quick`` the real 151936 tokens, tied, are used).
- peak memory: ``meta["peak_bytes"]`` (the process's resident high-water mark above its
  level at the start, see :mod:`uma_callbacks.core.peak_memory`) measured in child processes
  (one for the bench Qwen2, one for the big one) started with ``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation of 64 KiB or
  more is returned to the system when freed, so the resident set follows live tensors).

Run ``python bench/mechanistic.py [--quick]``; it ends with ``name=value`` summary lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from uma_callbacks.metrics import AttentionHeads, Circuits

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def bench_qwen2():
    """The bench Qwen2 and its probe, one batch of 16 x 128 tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2000, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (16, 128), generator=gen)
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def big_qwen2(vocab: int):
    """Qwen2-0.5B's attention shape (24 x 14 heads, 2 key/value heads, d 896), MLP 64, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=896, intermediate_size=64, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


PROBE = [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}]


def plain_forward(model, batches) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    return time.perf_counter() - start


def attention_ratio(repeats: int) -> dict[str, float]:
    model, batches = bench_qwen2()
    metric = AttentionHeads()
    plain_forward(model, batches)
    metric.compute(model, batches)  # warm-up
    plains, runs, eagers = [], [], []
    for _ in range(repeats):
        plains.append(plain_forward(model, batches))
        start = time.perf_counter()
        metric.compute(model, batches)
        runs.append(time.perf_counter() - start)
        model.config._attn_implementation = "eager"
        eagers.append(plain_forward(model, batches))
        model.config._attn_implementation = "sdpa"
    plain = statistics.median(plains)
    return {
        "plain_forward_seconds": plain,
        "attention_seconds": statistics.median(runs),
        "attention_over_forward": statistics.median(runs) / plain,
        "eager_over_sdpa": statistics.median(eagers) / plain,
    }


def child(name: str, quick: bool) -> None:
    """Child process: one JSON line per figure with its seconds and peak (``small``: attention
    then circuits on the bench Qwen2, each peak from its own start; ``big``: circuits)."""
    torch.set_num_threads(1)
    out = {}
    if name == "small":
        model, batches = bench_qwen2()
        runs = {"attention": lambda: AttentionHeads().compute(model, batches), "circuits": lambda: Circuits().compute(model, PROBE)}
    else:
        model = big_qwen2(2000 if quick else 151936)
        runs = {"circuits_big": lambda: Circuits().compute(model, PROBE)}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    for key, run in runs.items():
        result = run()
        out[key] = {"seconds": result.meta["seconds"], "peak": result.meta["peak_bytes"], "params": params}
    print(json.dumps(out))


def run_child(name: str, quick: bool) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, __file__, "--child", name] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, the big model with a 2000-token vocabulary")
    parser.add_argument("--child", choices=("small", "big"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    ratio = attention_ratio(3 if args.quick else 10)
    figures = {**run_child("small", args.quick), **run_child("big", args.quick)}
    print(
        f"attention: plain forward {ratio['plain_forward_seconds'] * 1e3:.1f} ms, metric "
        f"{ratio['attention_seconds'] * 1e3:.1f} ms (x{ratio['attention_over_forward']:.2f}; eager forward alone "
        f"x{ratio['eager_over_sdpa']:.2f})"
    )
    for name, fig in figures.items():
        print(f"{name:13s} {fig['seconds']:7.2f} s  peak {fig['peak'] / 2**20:8.1f} MiB  params {fig['params'] / 2**20:8.1f} MiB")
    print(f"(total {time.perf_counter() - started:.0f} s)")
    print(f"attention_over_forward={ratio['attention_over_forward']:.3f}")
    print(f"eager_over_sdpa={ratio['eager_over_sdpa']:.3f}")
    print(f"attention_peak_mb={figures['attention']['peak'] / 2**20:.1f}")
    print(f"circuits_seconds={figures['circuits']['seconds']:.3f}")
    print(f"circuits_peak_mb={figures['circuits']['peak'] / 2**20:.1f}")
    print(f"circuits_big_seconds={figures['circuits_big']['seconds']:.3f}")
    print(f"circuits_big_peak_mb={figures['circuits_big']['peak'] / 2**20:.1f}")


if __name__ == "__main__":
    main()
