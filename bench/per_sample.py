"""Benchmark: per-sample gradient statistics (hooks) against a training step and Opacus.

Side by side in one process, interleaved rounds (medians), on the same batch:

- Qwen2 from config (hidden 128, 2 layers, 4 heads, vocab 2000, intermediate 512, eager
  attention), 16 x 128 tokens; and a GPT-2 from config (n_embd 128, 2 layers, 4 heads,
  vocab 2000, tied wte/lm_head, Conv1D), 16 x 128 tokens;
- contenders: a training forward+backward (``autograd.grad`` of the mean loss),
  ``FisherInformation(top_k=None, keep_diagonal=True)`` (the diagonal),
  ``FisherInformation(top_k=None)`` (traces only: ghost norms where cheaper),
  ``GradientFlow()`` (norms, SNR, noise scale), the same three with ``chunk_size=16`` (one
  chunk: the speed the default 512-token chunks trade for a quarter of the memory,
  ``*_one_chunk_over_train_step``), and Opacus 1.6 ``GradSampleModule``
  (train mode: its hooks record nothing in eval mode) followed by sum_i grad_sample^2;
- peak extra memory of the Fisher diagonal and of Opacus (each in a child process,
  resident high-water mark above the level before the call, glibc returning freed blocks).

The machine may be shared: only the ratios of contenders measured side by side count.
Run ``python bench/per_sample.py [--quick]``; it ends with ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uma_callbacks.core.losses import hf_per_sample_loss  # noqa: E402
from uma_callbacks.metrics import FisherInformation, GradientFlow  # noqa: E402

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def timeall(fns: dict, repeats: int) -> dict:
    """Median seconds of each function over interleaved rounds, after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def qwen2_setup():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"  # the metrics use eager too: like with like
    return Qwen2ForCausalLM(config).eval(), _batch()


def gpt2_setup():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=2000, n_positions=256, n_embd=128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).eval(), _batch()


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (16, 128), generator=gen)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


SETUPS = {"qwen2": qwen2_setup, "gpt2": gpt2_setup}


def train_step(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for b in batches:
            torch.autograd.grad(hf_per_sample_loss(model, b).mean(), params)

    return run


def opacus_diag(model, batches):
    """``(run, "")`` computing sum_i grad_sample^2 with Opacus, or ``(None, reason)``."""
    try:
        from opacus import GradSampleModule
    except ImportError as err:
        return None, f"opacus import failed: {err}"
    gs = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")
    params = [p for p in gs.parameters() if p.requires_grad]

    def run():
        out = []
        for b in batches:
            hf_per_sample_loss(gs, b).sum().backward()
            # a parameter whose call broadcasts over the batch (GPT-2's position embedding:
            # input [1, T]) gets a grad_sample with batch dim 1 from Opacus, i.e. the summed
            # gradient, not per-sample ones: marked None, left out of the comparison
            n = b["input_ids"].shape[0]
            out = [p.grad_sample.square().sum(0) if p.grad_sample.shape[0] == n else None for p in params]
            for p in params:
                p.grad = None
                p.grad_sample = None
        return out

    return run, ""


def child(model_name: str, what: str) -> None:
    """Child process: peak extra bytes of one contender, as one JSON line."""
    from uma_callbacks.core.peak_memory import PeakMemory

    torch.set_num_threads(1)
    model, batches = SETUPS[model_name]()
    if what == "fisher_diag":
        metric = FisherInformation(top_k=None, keep_diagonal=True)
        run = lambda: metric.compute(model, batches)  # noqa: E731
    elif what == "opacus":
        run, why = opacus_diag(model, batches)
        if run is None:
            print(json.dumps({"peak": None, "why": why}))
            return
    else:
        run = train_step(model, batches)
    run()  # warm-up
    with PeakMemory("cpu") as meter:
        run()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": meter.peak_bytes, "params": params}), flush=True)


def child_peak(model_name: str, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", model_name, what]
    out = subprocess.run(cmd, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def bench_model(name: str, reps: int, summary: dict, with_memory: bool) -> None:
    model, batches = SETUPS[name]()
    diag = FisherInformation(top_k=None, keep_diagonal=True)
    trace = FisherInformation(top_k=None)
    flow = GradientFlow()
    whole = batches[0]["input_ids"].shape[0]  # the defaults' chunks are 512 tokens; one chunk for the trade-off
    diag_whole = FisherInformation(top_k=None, keep_diagonal=True, chunk_size=whole)
    trace_whole = FisherInformation(top_k=None, chunk_size=whole)
    flow_whole = GradientFlow(chunk_size=whole)
    contenders = {
        "train": train_step(model, batches),
        "fisher_diag": lambda: diag.compute(model, batches),
        "fisher_trace": lambda: trace.compute(model, batches),
        "gradient_flow": lambda: flow.compute(model, batches),
        "fisher_diag_whole": lambda: diag_whole.compute(model, batches),
        "fisher_trace_whole": lambda: trace_whole.compute(model, batches),
        "gradient_flow_whole": lambda: flow_whole.compute(model, batches),
    }
    run_op, why = opacus_diag(model, batches)
    if run_op is not None:
        contenders["opacus"] = run_op
    t = timeall(contenders, reps)
    prefix = "" if name == "qwen2" else f"{name}_"
    n_params = sum(p.numel() for p in model.parameters())
    ours = diag.compute(model, batches)
    print(f"{name} ({n_params / 1e6:.2f}M params), 16 x 128 tokens ({ours.meta['per_sample_method']}):")
    print("  " + "   ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()))
    summary[f"{prefix}fisher_diag_over_train_step"] = t["fisher_diag"] / t["train"]
    summary[f"{prefix}fisher_trace_only_over_train_step"] = t["fisher_trace"] / t["train"]
    summary[f"{prefix}gradient_flow_over_train_step"] = t["gradient_flow"] / t["train"]
    for key in ("fisher_diag", "fisher_trace", "gradient_flow"):  # one chunk of 16 x 128: faster, ~3x the memory
        summary[f"{prefix}{key}_one_chunk_over_train_step"] = t[f"{key}_whole"] / t["train"]
    if run_op is None:
        print(f"  Opacus unavailable: {why}")
        return
    summary[f"{prefix}fisher_diag_over_opacus"] = t["fisher_diag"] / t["opacus"]
    summary[f"{prefix}opacus_over_train_step"] = t["opacus"] / t["train"]
    theirs = run_op()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    err = max(
        float((ours.tensors[n] * 16 - o).abs().max() / o.abs().max().clamp_min(1e-30))
        for n, o in zip(names, theirs)
        if o is not None
    )
    skipped = [n for n, o in zip(names, theirs) if o is None]
    print(f"  max rel diff of the diagonals against Opacus {err:.1e}"
          + (f" (left out, Opacus has no per-sample gradient for a batch-broadcast call: {skipped})" if skipped else ""))
    summary[f"{prefix}fisher_diag_vs_opacus_max_rel_diff"] = err
    if with_memory:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:  # peaks are per process: children may overlap
            mine, op, train = pool.map(lambda what: child_peak(name, what), ("fisher_diag", "opacus", "train"))
        print(
            f"  peak extra MiB: fisher diag {mine['peak'] / 2**20:.1f}, Opacus {op['peak'] / 2**20:.1f}, "
            f"train step {train['peak'] / 2**20:.1f} (params {mine['params'] / 2**20:.1f})"
        )
        summary[f"{prefix}fisher_diag_peak_over_opacus_peak"] = mine["peak"] / op["peak"]
        summary[f"{prefix}fisher_diag_peak_over_params"] = mine["peak"] / mine["params"]
        summary[f"{prefix}opacus_peak_over_params"] = op["peak"] / op["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    started = time.perf_counter()
    summary: dict[str, float] = {}
    for name in SETUPS:
        bench_model(name, 3 if args.quick else 9, summary, with_memory=True)
    print("(shared machine: ratios of contenders timed side by side are what count)")
    for key, value in summary.items():
        print(f"{key}={value:.4g}")
    print(f"seconds={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
