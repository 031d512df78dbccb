"""Benchmark: LossLandscape against plain forward passes and the loss-landscapes package.

Qwen2 from config (hidden 128, 2 layers, 4 heads, vocab 2000, intermediate 512), one
probe batch of 16 x 128 tokens, float32 on CPU:

- time of an n x n grid (25 x 25; 5 x 5 with ``--quick``) in both modes (``stored``:
  theta, d1, d2 held; ``lean``: only theta held, directions regenerated per point)
  against n^2 plain forward passes + per-sample losses of the same batch, under
  ``torch.no_grad()``. The plain forwards are paired with the grid's: one is timed just
  before each forward the grid makes, inside the same run, so machine load (this is a
  shared machine) hits both alike; ratio = (run time - plain time) / plain time;
- ``loss_landscapes.random_plane`` (3.0.6) on the same grid where installed: time only
  (that release shifts odd grid columns, scales distance inversely and divides by zero
  on Qwen2's zero-initialised biases; when it raises on the stock model we report the
  error and time it on a copy whose zero biases are nudged to 1e-3);
- peak extra memory: the peak resident set during the grid minus the peak during one
  plain forward of the same batch (3 x 3 grids: the peak does not grow with n), over
  the parameter bytes. Measured in a child process started with
  ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every allocation >= 64 KiB by mmap
  and returns it when freed, so the resident set follows the live tensors and no peak
  hides in reused heap. (Not for the timings: an mmap per tensor slows forwards down.)

Run ``python bench/landscape.py [--quick]``; it ends with ``name=value`` summary lines.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from child_peaks import peaks_in_child  # bench/ is on sys.path when run as a script

from uma_callbacks.core.losses import causal_lm_per_sample_loss, hf_per_sample_loss
from uma_callbacks.engine.budget import PeakMemory, param_bytes, release_memory
from uma_callbacks.metrics import LossLandscape


def qwen2_setup():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2000,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (16, 128), generator=gen)
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def plain_forwards(model, batches, count: int):
    def run():
        with torch.no_grad():
            for _ in range(count):
                for b in batches:
                    hf_per_sample_loss(model, b).sum().item()

    return run


class PairedForward:
    """Times one plain forward (+ per-sample losses) of the same batch just before each
    forward the contender makes, so that machine load hits both alike (paired per point).
    ``plain`` accumulates the plain forwards' seconds."""

    def __init__(self, model: torch.nn.Module, batch: dict) -> None:
        self.model, self.batch, self.plain = model, batch, 0.0

    def __deepcopy__(self, memo: dict) -> PairedForward:
        return self  # loss-landscapes deep-copies the wrapper holding us: keep one counter

    def __call__(self) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            hf_per_sample_loss(self.model, self.batch).sum().item()
        self.plain += time.perf_counter() - start


def landscape(model, batches, n: int, mode: str, paired: PairedForward | None = None):
    metric = LossLandscape(n_points=n, span=1.0, normalization="filter", mode=mode, seed=0)

    def loss_fn(m, batch):
        if paired is not None:
            paired()
        return hf_per_sample_loss(m, batch)

    return lambda: metric.compute(model, batches, loss_fn)


class _Logits(torch.nn.Module):
    """``forward(input_ids) -> logits``: the interface loss-landscapes' ``Loss`` metric calls."""

    def __init__(self, model: torch.nn.Module, paired: PairedForward | None = None) -> None:
        super().__init__()
        self.model = model
        self._paired = paired

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._paired is not None:
            self._paired.model = self.model  # its deep copy, perturbed like ours
            self._paired()
        return self.model(input_ids=input_ids).logits


def loss_landscapes_plane(model, batches, n: int, paired: PairedForward | None = None):
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    batch = batches[0]
    metric = Loss(
        lambda logits, labels: causal_lm_per_sample_loss(logits, labels).mean(),
        batch["input_ids"],
        batch["labels"],
    )
    wrapped = _Logits(model, paired)

    def run():
        with torch.no_grad():
            return loss_landscapes.random_plane(
                wrapped, metric, distance=1.0, steps=n, normalization="filter", deepcopy_model=True
            )

    return run


def setpoint_ms(model, repeats: int = 20) -> dict[str, float]:
    """Milliseconds to set one grid point, per mode, without the forward pass."""
    from uma_callbacks.linalg.weights import moved_weights
    from uma_callbacks.metrics.landscape import _RandomDirections

    out = {}
    params = [p for p in model.parameters() if p.dim() >= 2]
    with moved_weights(params) as mover:
        rand = _RandomDirections(mover.theta, 2, 0, "filter")
        stored = rand.materialise()
        for mode, fn in (
            ("stored", lambda: mover.set_combination((0.3, -0.2), stored)),
            ("lean", lambda: rand.set_point(mover, (0.3, -0.2))),
        ):
            fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            out[mode] = (time.perf_counter() - start) / repeats * 1e3
    return out


def peak_of(fn) -> int:
    release_memory()
    with PeakMemory("cpu") as meter:
        fn()
    return meter.peak_bytes


def memory_main() -> None:
    """Child process: print ``peak_<what>=<bytes>`` for a plain forward and both grids."""
    model, batches = qwen2_setup()
    plain_forwards(model, batches, 1)()  # warm-up (lazy inits, thread pools)
    landscape(model, batches, 3, "lean")()
    forward = max(peak_of(plain_forwards(model, batches, 1)) for _ in range(2))
    for mode in ("stored", "lean"):
        release_memory()
        print(f"peak_{mode}={landscape(model, batches, 3, mode)().meta['peak_bytes']}")
    print(f"peak_forward={forward}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 x 5 grid (< 60 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.memory:
        memory_main()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 5 if args.quick else 25
    repeats = 1  # paired timings need no rounds; raise for medians
    model, batches = qwen2_setup()
    pbytes = param_bytes(model)
    print(
        f"Qwen2 {sum(p.numel() for p in model.parameters())} params ({pbytes / 2**20:.1f} MiB), "
        f"batch 16x128, grid {n}x{n}, threads {torch.get_num_threads()}"
    )

    # each contender's grid, with one plain forward of the same batch timed just before
    # each of its forwards (paired per point): ratio = (total - plain) / plain
    lossland_status, lossland_model = "not installed", None
    try:
        import loss_landscapes  # noqa: F401
    except ImportError:
        pass
    else:
        try:
            loss_landscapes_plane(model, batches, 3)()
            lossland_model, lossland_status = model, "ok"
        except ZeroDivisionError as err:  # its filter normalisation divides by Qwen2's zero biases
            lossland_status = f"{type(err).__name__} on the stock model; timed with zero biases set to 1e-3"
            lossland_model = copy.deepcopy(model)
            with torch.no_grad():
                for p in lossland_model.parameters():
                    if p.dim() == 1 and p.abs().sum() == 0:
                        p.fill_(1e-3)
    plain_forwards(model, batches, 2)()  # warm-up
    landscape(model, batches, 3, "stored")()
    landscape(model, batches, 3, "lean")()
    times, plain = {}, {}
    for key in ("stored", "lean", "loss_landscapes"):
        if key == "loss_landscapes" and lossland_model is None:
            continue
        totals, plains = [], []
        for _ in range(repeats):
            paired = PairedForward(model, batches[0])
            if key == "loss_landscapes":
                fn = loss_landscapes_plane(lossland_model, batches, n, paired)
            else:
                fn = landscape(model, batches, n, key, paired)
            start = time.perf_counter()
            fn()
            totals.append(time.perf_counter() - start - paired.plain)
            plains.append(paired.plain)
        times[key], plain[key] = statistics.median(totals), statistics.median(plains)
        print(
            f"  {key:16s} {times[key]:8.3f} s  ({times[key] / (n * n) * 1e3:.1f} ms per point; "
            f"paired plain forwards {plain[key]:.3f} s, ratio {times[key] / plain[key]:.3f})"
        )
    print(f"  loss-landscapes: {lossland_status}")
    times["forwards"] = plain["stored"]

    per_point = setpoint_ms(model)
    forward_ms = times["forwards"] / (n * n) * 1e3
    print(
        f"  setting one point: stored {per_point['stored']:.2f} ms, lean {per_point['lean']:.2f} ms "
        f"(a plain forward: {forward_ms:.1f} ms)"
    )
    peaks = peaks_in_child(__file__, torch.get_num_threads())
    forward_peak = peaks["forward"]
    print(
        f"  peak: plain forward {forward_peak / 2**20:.1f} MiB, grid stored {peaks['stored'] / 2**20:.1f} MiB, "
        f"lean {peaks['lean'] / 2**20:.1f} MiB; params {pbytes / 2**20:.1f} MiB"
    )

    print(f"landscape_grid={n}x{n}")
    print(f"landscape_seconds={times['stored']:.3f}")
    print(f"landscape_lean_seconds={times['lean']:.3f}")
    print(f"landscape_forwards_seconds={times['forwards']:.3f}")
    print(f"landscape_over_forwards={times['stored'] / plain['stored']:.3f}")
    print(f"landscape_lean_over_forwards={times['lean'] / plain['lean']:.3f}")
    print(f"landscape_setpoint_ms={per_point['stored']:.3f}")
    print(f"landscape_lean_setpoint_ms={per_point['lean']:.3f}")
    print(f"landscape_forward_ms={forward_ms:.3f}")
    if "loss_landscapes" in times:
        print(f"loss_landscapes_seconds={times['loss_landscapes']:.3f}")
        print(f"loss_landscapes_over_forwards={times['loss_landscapes'] / plain['loss_landscapes']:.3f}")
        ratio_ll = times["loss_landscapes"] / plain["loss_landscapes"]
        print(f"loss_landscapes_over_landscape={ratio_ll / (times['stored'] / plain['stored']):.3f}")
    print(f"loss_landscapes_status={lossland_status.split(' ')[0]}")
    print(f"landscape_peak_extra_over_params={(peaks['stored'] - forward_peak) / pbytes:.3f}")
    print(f"landscape_lean_peak_extra_over_params={(peaks['lean'] - forward_peak) / pbytes:.3f}")


if __name__ == "__main__":
    main()
