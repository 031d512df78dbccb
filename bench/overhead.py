"""Overhead of UMACallback on a real Trainer run, side by side in one process.

Two identical runs (same model init, data, seed): one plain, one with the callback
measuring at every save. Prints the wall times, the share spent in the metrics, and

    callback_overhead=<time with / time without - 1>
    callback_metric_seconds_per_save=<mean seconds of the suite per save>
    train_step_seconds=<mean seconds of a plain training step>

With ``--minilm``: the real MiniLM at ``UMACallback()``'s defaults (a 64-sample probe,
``gradient_flow``), seconds per save over 500 training steps of batch 8 timed alongside:

    minilm_callback_overhead=<seconds per save / (500 x training step)>

Usage: python bench/overhead.py [--quick] [--metrics gradient_flow,fisher] [--minilm]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from uma_callbacks import METRICS, UMACallback  # noqa: E402


def build(vocab: int, hidden: int, layers: int):
    from shakespeare import tiny_qwen2

    return tiny_qwen2(vocab, hidden=hidden, layers=layers, heads=4, seed=0)


def dataset(n: int, length: int, vocab: int):
    import datasets

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=gen).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


class StepTimer(TrainerCallback):
    def __init__(self):
        self.begin = None
        self.end = None

    def on_train_begin(self, *a, **k):
        self.begin = time.perf_counter()

    def on_train_end(self, *a, **k):
        self.end = time.perf_counter()


def run(out: str, steps: int, save_steps: int, callbacks: list, vocab: int, hidden: int, layers: int, seq: int) -> float:
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        save_steps=save_steps,
        per_device_train_batch_size=16,
        logging_steps=10**6,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_only_model=True,
        seed=0,
    )
    timer = StepTimer()
    trainer = Trainer(
        model=build(vocab, hidden, layers), args=args, train_dataset=dataset(2048, seq, vocab), callbacks=[timer, *callbacks]
    )
    trainer.train()
    return timer.end - timer.begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run, under 60 s")
    parser.add_argument("--metrics", default="gradient_flow,fisher")
    parser.add_argument(
        "--minilm", action="store_true",
        help="the real MiniLM case instead: UMACallback() defaults at save_steps=500 "
        "(bench/minilm_defaults.py; prints minilm_callback_overhead)",
    )
    args = parser.parse_args()
    if args.minilm:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench import minilm_defaults

        sys.argv = [sys.argv[0], "--metrics", ",".join(minilm_defaults.CALLBACK_DEFAULT)] + (["--quick"] if args.quick else [])
        minilm_defaults.main()
        return
    logging.disable(logging.WARNING)
    if args.quick:
        vocab, hidden, layers, seq, steps, save_steps, probe = 1000, 64, 2, 64, 60, 30, 16
    else:
        vocab, hidden, layers, seq, steps, save_steps, probe = 2000, 128, 2, 128, 400, 100, 64
    names = [m for m in args.metrics.split(",") if m in METRICS]
    tmp = tempfile.mkdtemp(prefix="uma-bench-")
    try:
        plain = run(os.path.join(tmp, "plain"), steps, save_steps, [], vocab, hidden, layers, seq)
        cb = UMACallback(metrics=names, probe=dataset(probe, seq, vocab), probe_size=probe, trackers=[], draw_figures=False)
        with_cb = run(os.path.join(tmp, "cb"), steps, save_steps, [cb], vocab, hidden, layers, seq)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    metric_seconds = sum(r.meta.get("seconds", 0.0) for r in cb.records)
    saves = len({r.step for r in cb.records})
    print(f"model: Qwen2 hidden {hidden}, {layers} layers, vocab {vocab}; batch 16 x {seq} tokens; "
          f"{steps} steps, save every {save_steps}; probe {probe} samples; metrics {names}")
    print(f"plain run {plain:.1f} s; with callback {with_cb:.1f} s; metrics {metric_seconds:.1f} s over {saves} saves")
    print(f"callback_overhead={with_cb / plain - 1:.3f}")
    print(f"callback_metric_seconds_per_save={metric_seconds / max(saves, 1):.2f}")
    print(f"train_step_seconds={plain / steps:.3f}")


if __name__ == "__main__":
    main()
