"""Benchmark: the Fisher diagonal and Lanczos top-10 against training steps, a naive loop and BackPACK.

All timings are medians of repeated runs in one process, on the same samples:

- MLP 256-512-512-10 (ReLU, cross-entropy), batches of 32: ``FisherInformation(top_k=None,
  keep_diagonal=True)`` (the diagonal and traces; per-layer hooks) against (a) a training
  forward+backward of the same batches, (b) one backward per sample, (c) BackPACK
  ``SumGradSquared``;
- Qwen2 from config (hidden 128, 2 layers, 4 heads, vocab 2000), batch 16 x 128 tokens:
  the diagonal (hooks) against a training forward+backward;
- spectrum: top-10 of the MLP's empirical Fisher against the dense answer (eigenvalues of
  the Gram matrix G G^T / N): by the Gram formed in the pass (the default), and by
  Lanczos (forced: several chunks, nothing cached), with the matvecs it took.

Run ``python bench/fisher.py [--quick]``; it ends with ``name=value`` summary lines.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.metrics import FisherInformation


def timeit(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    return timeall({"f": fn}, repeats)["f"]


def timeall(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, called in interleaved rounds after a warm-up, so
    that load from other processes on the machine hits every contender alike."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def ce_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def mlp_setup(n_batches: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    ).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(32, 256, generator=gen), "y": torch.randint(0, 10, (32,), generator=gen)} for _ in range(n_batches)]
    return model, batches


def train_steps(model, batches, loss_fn):
    def run():
        params = [p for p in model.parameters() if p.requires_grad]
        for b in batches:
            torch.autograd.grad(loss_fn(model, b).mean(), params)

    return run


def naive_diag(model, batches, loss_fn):
    def run():
        params = [p for p in model.parameters() if p.requires_grad]
        acc = [torch.zeros_like(p) for p in params]
        for b in batches:
            for i in range(b["x"].shape[0]):
                one = {k: v[i : i + 1] for k, v in b.items()}
                for a, g in zip(acc, torch.autograd.grad(loss_fn(model, one).sum(), params)):
                    a += g * g
        return acc

    return run


def backpack_diag(model, batches):
    """BackPACK SumGradSquared over the batches, or (None, reason)."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared
    except ImportError as err:  # reported as nan with the reason
        return None, f"backpack import failed: {err}"
    bp_model = extend(copy.deepcopy(model))
    lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

    def run():
        acc = [torch.zeros_like(p) for p in bp_model.parameters()]
        for b in batches:
            with backpack(SumGradSquared()):
                lossfunc(bp_model(b["x"]), b["y"]).backward()
            for a, p in zip(acc, bp_model.parameters()):
                a += p.sum_grad_squared
                p.grad = None
        return acc

    return run, ""


def qwen2_setup():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"  # the metric uses eager too: compare like with like
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (16, 128), generator=gen)
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats (< 60 s)")
    args = parser.parse_args()
    reps = 5 if args.quick else 11
    n_batches = 4 if args.quick else 16
    summary: dict[str, float] = {}

    # ---------------------------------------------------------------- MLP
    model, batches = mlp_setup(n_batches)
    metric = FisherInformation(top_k=None, keep_diagonal=True)
    run_bp, why = backpack_diag(model, batches)
    contenders = {"fisher": lambda: metric.compute(model, batches, ce_loss), "train": train_steps(model, batches, ce_loss)}
    if run_bp is not None:
        contenders["backpack"] = run_bp
    times = timeall(contenders, reps)
    t_fisher, t_train = times["fisher"], times["train"]
    naive_batches = batches[:1]  # the naive loop on one batch, scaled
    t_naive = timeit(naive_diag(model, naive_batches, ce_loss), max(1, reps // 2)) * len(batches)
    ours = metric.compute(model, batches, ce_loss)
    n = sum(b["x"].shape[0] for b in batches)
    print(f"MLP 256-512-512-10, {n} samples in batches of 32 ({ours.meta['per_sample_method']}):")
    print(f"  fisher diagonal {t_fisher * 1e3:8.1f} ms   train fwd+bwd {t_train * 1e3:8.1f} ms   naive loop {t_naive * 1e3:8.1f} ms")
    summary["mlp_fisher_diag_over_train_step"] = t_fisher / t_train
    summary["fisher_diag_speedup_vs_naive"] = t_naive / t_fisher
    if run_bp is None:
        print(f"  BackPACK unavailable: {why}")
        summary["fisher_diag_over_backpack"] = float("nan")
    else:
        t_bp = times["backpack"]
        bp = run_bp()
        err = max(
            float(((d * n - b).abs().max() / b.abs().max()))
            for d, b in zip(ours.tensors.values(), bp)
        )
        print(f"  BackPACK SumGradSquared {t_bp * 1e3:8.1f} ms   max rel diff of the diagonals {err:.1e}")
        summary["fisher_diag_over_backpack"] = t_fisher / t_bp
        summary["fisher_diag_vs_backpack_max_rel_diff"] = err

    # ---------------------------------------------------------------- Lanczos on the MLP
    from uma_callbacks.linalg.per_sample import per_sample_grads

    G = torch.cat([per_sample_grads(model, ce_loss, b).flat().double() for b in batches])
    dense = torch.linalg.eigvalsh(G @ G.T / G.shape[0]).flip(0)[:10]
    gram = FisherInformation(top_k=10, seed=0).compute(model, batches, ce_loss)
    got = torch.tensor(gram.arrays["top_eigenvalues"], dtype=torch.float64)
    rel_gram = float(((got - dense).abs() / dense).max())
    print(f"Gram top-10 ({gram.meta['spectrum_method']}): max rel err {rel_gram:.1e}, {gram.meta['seconds']:.2f} s")
    summary["fisher_gram_top10_max_rel_err"] = rel_gram
    lz = FisherInformation(top_k=10, seed=0, cache_bytes=0).compute(model, batches, ce_loss, chunk_size=32)
    got = torch.tensor(lz.arrays["top_eigenvalues"], dtype=torch.float64)
    rel = float(((got - dense).abs() / dense).max())
    print(f"Lanczos top-10 ({lz.meta['spectrum_method']}): {lz.meta['matvecs']} matvecs, max rel err {rel:.1e}, "
          f"{lz.meta['seconds']:.2f} s (cached={lz.meta['cached']}, {lz.meta['lanczos_dtype']})")
    summary["fisher_lanczos_top10_matvecs"] = lz.meta["matvecs"]
    summary["fisher_lanczos_top10_max_rel_err"] = rel

    # ---------------------------------------------------------------- Qwen2
    qmodel, qbatches = qwen2_setup()
    qmetric = FisherInformation(top_k=None, keep_diagonal=True)
    qt = timeall(
        {"fisher": lambda: qmetric.compute(qmodel, qbatches, hf_per_sample_loss),
         "train": train_steps(qmodel, qbatches, hf_per_sample_loss)},
        max(1, reps - 1),
    )
    t_q, t_qt = qt["fisher"], qt["train"]
    n_params = sum(p.numel() for p in qmodel.parameters())
    print(f"Qwen2 ({n_params / 1e6:.2f}M params), 16 x 128 tokens: fisher diagonal {t_q * 1e3:.0f} ms, "
          f"train fwd+bwd {t_qt * 1e3:.0f} ms")
    summary["fisher_diag_over_train_step"] = t_q / t_qt

    for key, value in summary.items():
        print(f"{key}={value:.4g}")


if __name__ == "__main__":
    main()
