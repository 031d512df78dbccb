"""GPU check: Fisher (diagonal + top-5) and an 11x11 landscape on a 0.5B Qwen2, under 20 GiB.

A Qwen2 built from config at Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocab 151936; about 0.49B parameters, random weights) in bf16,
a probe of 64 random sequences of 512 tokens, and ``MemoryBudget(max_gb=20)``: each metric
is planned by ``compute_within_budget`` (memory mode, chunk) and run; the script prints
the plan, the measured peak (``torch.cuda.max_memory_allocated`` above the level at the
metric's start) and the time, then ``name=value`` lines.

``--tiny`` runs the same script on CPU with a 2-layer toy shape, to check that it works.

Run: ``bash bench/gpu_check.sh`` (GPU) or ``python bench/gpu_check.py --tiny`` (CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

QWEN05 = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shape on CPU (a functional check)")
    parser.add_argument("--max-memory-gb", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--fisher-matvecs", type=int, default=8, help="Lanczos products for the Fisher top-5")
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from uma_callbacks.engine.budget import MemoryBudget, compute_within_budget, param_bytes
    from uma_callbacks.metrics import FisherInformation, LossLandscape

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape, samples, length = (TINY, 8, 32) if args.tiny else (QWEN05, args.samples, args.length)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    started = time.perf_counter()
    model = Qwen2ForCausalLM(Qwen2Config(**shape, torch_dtype=dtype)).to(device=device, dtype=dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (samples, length), generator=gen)
    probe = [{"input_ids": c.to(device), "attention_mask": torch.ones_like(c).to(device), "labels": c.to(device)}
             for c in ids.split(8 if not args.tiny else 4)]
    print(f"device={device} params={n / 1e6:.1f}M ({param_bytes(model) / 2**30:.2f} GiB bf16) probe={samples}x{length} "
          f"build={time.perf_counter() - started:.1f}s", flush=True)
    budget = MemoryBudget(max_gb=args.max_memory_gb, device=device)
    metrics = [
        FisherInformation(top_k=5, keep_diagonal=True, max_matvecs=args.fisher_matvecs, lanczos_tol=1e-3),
        LossLandscape(n_points=11, span=0.5),
    ]
    summary = {}
    for metric in metrics:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            result = compute_within_budget(metric, model, probe, None, budget)
        except Exception as err:  # a bench reports, it does not stop: print and go on
            print(f"{metric.name}: FAILED {type(err).__name__}: {err}", flush=True)
            summary[f"{metric.name}_failed"] = 1
            continue
        seconds = time.perf_counter() - t0
        meta = result.meta
        print(f"{metric.name}: mode={meta.get('memory_mode')} chunk={meta['chunk_size']} retries={meta['retries']} "
              f"planned_fixed={meta.get('planned_fixed_bytes', 0) / 2**30:.2f}GiB "
              f"planned_per_sample={meta.get('planned_per_sample_bytes', 0) / 2**20:.0f}MiB "
              f"peak={meta['peak_bytes'] / 2**30:.2f}GiB seconds={seconds:.1f}", flush=True)
        if metric.name == "fisher":
            print(f"  trace={result.scalars['trace']:.4g} top_eigenvalues={result.arrays['top_eigenvalues'].tolist()} "
                  f"matvecs={meta.get('matvecs')} converged={meta.get('lanczos_converged')}", flush=True)
        else:
            print(f"  center_loss={result.scalars['center_loss']:.4f} roughness={result.scalars['roughness']:.4f}", flush=True)
        summary[f"{metric.name}_peak_gb"] = meta["peak_bytes"] / 2**30
        summary[f"{metric.name}_seconds"] = seconds
        summary[f"{metric.name}_chunk"] = meta["chunk_size"]
        summary[f"{metric.name}_under_budget"] = int(meta["peak_bytes"] <= budget.max_bytes)
    if device.type == "cuda":
        summary["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    summary["total_seconds"] = time.perf_counter() - started
    for key, value in summary.items():
        print(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")


if __name__ == "__main__":
    main()
