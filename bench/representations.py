"""Benchmark: Representations and InformationTheory against one plain forward of the same probe.

Qwen2 from config (hidden 128, 2 layers, 4 heads, vocab 2000, intermediate 512), float32 on
CPU, probes of 8 x 128 = 1024 and 32 x 128 = 4096 tokens (``max_tokens`` 2048, the default):

- time of each metric over the time of one plain forward (``model(**inputs)`` under
  ``torch.no_grad()``, SDPA attention as a user runs it) of the same probe, timed side by
  side (forward, metric, forward, ... ; the median ratio of each metric to the mean of the
  forwards around it), so machine load hits both alike. ``representations``: with a previous
  and a first checkpoint that the same object measured (their states are reused, as from
  the third checkpoint of a run on); ``representations_recompute``: a fresh object, so both
  earlier checkpoints' states are recomputed on the moved weights (two more truncated
  forwards: a restarted run, a backfill of a subset); ``representations_nohist``: no history;
- peak extra memory: the peak resident set of each metric (its ``meta["peak_bytes"]``)
  minus that of one plain forward, over the parameter bytes, in a child process started
  with ``MALLOC_MMAP_THRESHOLD_=65536`` (see bench/landscape.py).

Run ``python bench/representations.py [--quick]``; it ends with ``name=value`` summary lines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from child_peaks import peaks_in_child  # bench/ is on sys.path when run as a script

from uma_callbacks.engine.budget import PeakMemory, param_bytes, release_memory
from uma_callbacks.linalg.weights import moved_weights
from uma_callbacks.metrics import InformationTheory, Representations
from uma_callbacks.metrics.base import CheckpointState, History

SIZES = {1024: 8, 4096: 32}  # tokens -> sequences of 128


def qwen2_setup():
    """The bench Qwen2 (as bench/landscape.py) and a history of two perturbed checkpoints."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2000, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    states = [
        CheckpointState(step, {n: p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()},
                        f"fp{step}")
        for step in (100, 0)
    ]
    return model, History(previous=(states[0],), first=states[1])


def probe(tokens: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (SIZES[tokens], 128), generator=gen)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def forward(model, batches) -> None:
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)


class Steady:
    """Representations as from the third checkpoint of a run on: before each timed call the
    same object has measured the first and the previous checkpoint (untimed), so their
    states are reused; ``prime`` does that by moving the weights to theirs and back."""

    def __init__(self, model, history) -> None:
        self.model, self.history, self.metric = model, history, Representations()

    def prime(self, batches) -> None:
        first, prev = self.history.first, self.history.previous[0]
        for state, hist in ((first, History()), (prev, History((first,), first))):
            named = list(self.model.named_parameters())
            with moved_weights([p for _, p in named]) as mover:
                mover.set_lerp([state.weights[n] for n, _ in named], 0.0)
                self.metric.compute(self.model, batches, history=hist)

    def __call__(self, batches):
        return self.metric.compute(self.model, batches, history=self.history)


def contenders(model, history):
    """``{name: (prime or None, run)}``."""
    steady = Steady(model, history)
    return {
        "representations": (steady.prime, steady),
        "representations_recompute": (None, lambda b: Representations().compute(model, b, history=history)),
        "representations_nohist": (None, lambda b: Representations().compute(model, b)),
        "information": (None, lambda b: InformationTheory().compute(model, b)),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratios(model, history, batches, repeats: int, warm_up: bool) -> tuple[dict[str, float], float]:
    """Median over ``repeats`` of metric seconds / mean of the plain forwards just before and after."""
    runs = contenders(model, history)
    forward(model, batches)
    if warm_up:
        for prime, fn in runs.values():
            if prime is not None:
                prime(batches)
            fn(batches)
    out: dict[str, list[float]] = {k: [] for k in runs}
    fwd: list[float] = []
    for _ in range(repeats):
        for key, (prime, fn) in runs.items():
            if prime is not None:
                prime(batches)
            before = timed(lambda: forward(model, batches))
            seconds = timed(lambda fn=fn: fn(batches))
            after = timed(lambda: forward(model, batches))
            fwd += [before, after]
            out[key].append(seconds / ((before + after) / 2))
    return {k: statistics.median(v) for k, v in out.items()}, statistics.median(fwd)


def memory_main() -> None:
    """Child process: ``peak_<name>_<tokens>=<bytes>`` of a plain forward and of each metric."""
    model, history = qwen2_setup()
    runs = contenders(model, history)
    small = probe(min(SIZES))
    forward(model, small)
    for prime, fn in runs.values():  # warm-up (lazy inits, allocator)
        if prime is not None:
            prime(small)
        fn(small)
    for tokens in SIZES:
        batches = probe(tokens)
        release_memory()
        with PeakMemory("cpu") as meter:
            forward(model, batches)
        print(f"peak_forward_{tokens}={meter.peak_bytes}")
        for key, (prime, fn) in runs.items():
            if prime is not None:
                prime(batches)
            release_memory()
            print(f"peak_{key}_{tokens}={fn(batches).meta['peak_bytes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed round per size (< 60 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        memory_main()
        return
    repeats = 1 if args.quick else 5
    model, history = qwen2_setup()
    pbytes = param_bytes(model)
    print(f"Qwen2 {sum(p.numel() for p in model.parameters())} params ({pbytes / 2**20:.1f} MiB), "
          f"threads {torch.get_num_threads()}, max_tokens 2048")
    summary: dict[str, float] = {}
    all_peaks = peaks_in_child(__file__, args.threads)
    for tokens in SIZES:
        batches = probe(tokens)
        rel, fwd = ratios(model, history, batches, repeats, warm_up=tokens == min(SIZES))
        peaks = {k[: -len(str(tokens)) - 1]: v for k, v in all_peaks.items() if k.endswith(f"_{tokens}")}
        print(f"  {tokens} tokens: plain forward {fwd * 1e3:.0f} ms; peak forward {peaks['forward'] / 2**20:.1f} MiB")
        for key, ratio in rel.items():
            extra = (peaks[key] - peaks["forward"]) / pbytes
            print(f"    {key:24s} {ratio:6.2f} x forward   peak {peaks[key] / 2**20:6.1f} MiB "
                  f"({peaks[key] / pbytes:.2f} x params; {extra:+.2f} x params over the forward's)")
            summary[f"{key}_over_forward_{tokens}"] = ratio
            summary[f"{key}_peak_over_params_{tokens}"] = peaks[key] / pbytes
        summary[f"forward_ms_{tokens}"] = fwd * 1e3
    summary["representations_over_forward"] = summary["representations_over_forward_1024"]
    summary["information_over_forward"] = summary["information_over_forward_1024"]
    for key, value in summary.items():
        print(f"{key}={value:.3f}")


if __name__ == "__main__":
    main()
