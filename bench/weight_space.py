"""Benchmark: the weight-space metrics (pruning, modularity, task vectors) on CPU.

- ``pruning``: ``LotteryTickets`` (sparsities 0.5, 0.8, 0.9, with two earlier checkpoints
  so the mask distances are computed too) on Qwen2 from config (hidden 128, 2 layers,
  4 heads, vocab 2000, intermediate 512), one probe batch of 16 x 128 tokens, float32,
  against the plain forwards of the same probe it needs (the dense one and one per
  sparsity: S + 1 forwards + per-sample losses, under ``torch.no_grad()``). The plain
  forwards are paired with the metric's: one is timed just before each forward the metric
  makes, inside the same run, so machine load (a shared machine) hits both alike;
  ``pruning_over_forwards`` = median over runs of (run time - plain time) / plain time,
  the metric's time over that of its forwards done plainly (the overhead is the masks,
  zeroing, restore and the two earlier checkpoints' masks: a fresh metric each round, so
  none comes from its cache; in a run only the newest earlier checkpoint's is computed);
- ``modularity``: ``Modularity(n_clusters=4)`` on one d_model 896 / 4864-unit gated MLP
  (Qwen2-0.5B's shape, random init): Q and its shuffled baseline;
- ``task_vectors``: ``TaskVectors`` with a base and one other model (TIES, average and
  Fisher merges; two empirical Fisher diagonals) on the bench Qwen2 and probe;
- peak extra memory of each probe metric over the parameter bytes: the metric's peak
  resident set minus a plain forward's, in a child process with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (allocations >= 64 KiB are mmapped and returned when
  freed, so the resident set follows the live tensors).

Run ``python bench/weight_space.py [--quick]``; it ends with ``name=value`` summary lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# numpy's BLAS follows the bench's one torch thread (set before numpy loads; a shared machine
# oversubscribed by BLAS threads makes the modularity timing meaningless)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch
from child_peaks import peaks_in_child  # bench/ is on sys.path when run as a script

from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.engine.budget import PeakMemory, param_bytes, release_memory
from uma_callbacks.metrics import LotteryTickets, Modularity, TaskVectors
from uma_callbacks.metrics.base import CheckpointState, History

SPARSITIES = (0.5, 0.8, 0.9)


def qwen2_setup():
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


def nearby(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def history(model) -> History:
    return History(previous=(CheckpointState(20, nearby(model, 1e-3, 1), "a"), CheckpointState(10, nearby(model, 2e-3, 2), "b")))


def plain_forwards(model, batches, count: int):
    def run():
        with torch.no_grad():
            for _ in range(count):
                for b in batches:
                    hf_per_sample_loss(model, b).sum().item()

    return run


class PairedForward:
    """The per-sample loss, with one plain forward of the same batch timed just before each
    forward the metric makes (same weights at that moment), so machine load hits both alike;
    ``plain`` sums the plain forwards' seconds."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.plain = model, 0.0

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        start = time.perf_counter()
        with torch.no_grad():
            hf_per_sample_loss(self.model, batch).sum().item()
        self.plain += time.perf_counter() - start
        return hf_per_sample_loss(model, batch)


def timeall(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, in interleaved rounds after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def mlp_896():
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.gate_proj = torch.nn.Linear(896, 4864, bias=False)
    mlp.up_proj = torch.nn.Linear(896, 4864, bias=False)
    mlp.down_proj = torch.nn.Linear(4864, 896, bias=False)
    model = torch.nn.Module()
    model.mlp = mlp
    return model


def peak_of(fn) -> int:
    release_memory()
    with PeakMemory("cpu") as meter:
        fn()
    return meter.peak_bytes


def memory_main() -> None:
    """Child process: ``peak_<what>=<bytes>`` for a plain forward and each probe metric."""
    model, batches = qwen2_setup()
    hist = history(model)
    others = {"other": nearby(model, 0.01, 3)}
    base = nearby(model, 0.01, 4)
    plain_forwards(model, batches, 1)()
    forward = max(peak_of(plain_forwards(model, batches, 1)) for _ in range(2))
    release_memory()
    print(f"peak_pruning={LotteryTickets(sparsities=SPARSITIES).compute(model, batches, history=hist).meta['peak_bytes']}")
    release_memory()
    print(f"peak_task_vectors={TaskVectors(base=base, others=others).compute(model, batches).meta['peak_bytes']}")
    print(f"peak_forward={forward}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (< 60 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        memory_main()
        return
    repeats = 5 if args.quick else 9
    model, batches = qwen2_setup()
    pbytes = param_bytes(model)
    print(f"Qwen2 {sum(p.numel() for p in model.parameters())} params ({pbytes / 2**20:.1f} MiB), batch 16x128, "
          f"threads {torch.get_num_threads()}")
    hist = history(model)
    paired = PairedForward(model)

    def pruning_run() -> None:  # a fresh metric each round: no earlier mask comes from its cache (worst case)
        LotteryTickets(sparsities=SPARSITIES).compute(model, batches, paired.loss, history=hist)

    pruning_run()
    runs = []
    for _ in range(repeats):
        paired.plain = 0.0
        start = time.perf_counter()
        pruning_run()
        total = time.perf_counter() - start
        runs.append((total - paired.plain, paired.plain))
    metric_s, plain_s = (statistics.median(x) for x in zip(*runs))
    times = {"pruning": metric_s, "forwards": plain_s}
    over = statistics.median(m / p for m, p in runs)
    print(f"  pruning {times['pruning']:.3f} s vs {len(SPARSITIES) + 1} plain forwards {times['forwards']:.3f} s: x{over:.3f}")

    big = mlp_896()
    probe = [{"x": torch.zeros(1, 1)}]
    start = time.perf_counter()
    modularity = Modularity(n_clusters=4).compute(big, probe, lambda m, b: b["x"].sum(-1))
    mod_seconds = time.perf_counter() - start
    print(f"  modularity 896/4864 MLP: {mod_seconds:.2f} s, Q {modularity.scalars['mean_q']:.4f}, "
          f"shuffled {modularity.scalars['mean_q_shuffled']:.4f}")

    base, others = nearby(model, 0.01, 4), {"other": nearby(model, 0.01, 3)}
    task_vectors = TaskVectors(base=base, others=others)
    tv = timeall({"task_vectors": lambda: task_vectors.compute(model, batches)}, 1 if args.quick else 3)
    result = task_vectors.compute(model, batches)
    print(f"  task_vectors (1 other): {tv['task_vectors']:.3f} s; merges: average {result.scalars['merge/other/average_loss']:.4f}, "
          f"TIES {result.scalars['merge/other/ties_loss']:.4f}, Fisher {result.scalars['merge/other/fisher_loss']:.4f}")

    peaks = peaks_in_child(__file__, torch.get_num_threads())
    extra = {k: (peaks[k] - peaks["forward"]) / pbytes for k in ("pruning", "task_vectors")}
    print(f"  peak extra over params: pruning {extra['pruning']:.2f}, task_vectors {extra['task_vectors']:.2f} "
          f"(plain forward {peaks['forward'] / 2**20:.1f} MiB, params {pbytes / 2**20:.1f} MiB)")
    print(f"pruning_seconds={times['pruning']:.3f}")
    print(f"pruning_forwards_seconds={times['forwards']:.3f}")
    print(f"pruning_over_forwards={over:.3f}")
    print(f"modularity_seconds={mod_seconds:.3f}")
    print(f"task_vectors_seconds={tv['task_vectors']:.3f}")
    print(f"pruning_peak_extra_over_params={extra['pruning']:.3f}")
    print(f"task_vectors_peak_extra_over_params={extra['task_vectors']:.3f}")


if __name__ == "__main__":
    main()
