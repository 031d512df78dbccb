"""Benchmark: Hessian top-1 / top-10 eigenvalues, Lanczos against power iteration with deflation.

A Qwen2 from config (hidden 32, 2 layers, 2 heads, vocab 128, intermediate 64; float64),
one probe batch of 4 x 16 tokens (no padding), CPU. Every method multiplies by the same
Hessian (:class:`~uma_callbacks.linalg.hvp.HessianOperator`, graph cached: one double
backward per product) and is held to the same accuracy: every one of the top-k within
1e-4 relative of a converged reference (Lanczos, residual tol 1e-10).

- Lanczos (``lanczos_top_k``, full reorthogonalisation): the fewest steps m whose top-k
  Ritz values are all within 1e-4 (the Krylov sequence is deterministic, so runs with
  growing ``max_iter`` share their products through a cache);
- power iteration with deflation (PyHessian's method, implemented here): eigenvalue i is
  found by power iteration on vectors kept orthogonal to the i-1 found before, stopped
  as soon as the Rayleigh quotient is within 1e-4 of the reference (an oracle stop: the
  best case for the method; capped at ``--power-cap`` products per eigenvalue, so with
  unconverged eigenvalues its count, and the ratio, are lower bounds). It converges to
  the largest |lambda|, so a large negative eigenvalue can capture it;
- the ``pyhessian`` package where installed (``hessian.eigenvalues(top_n, tol=1e-4)``),
  with its own stopping rule: its products, time and error against the reference.

Run ``python bench/hessian.py [--quick]``; it ends with ``name=value`` summary lines.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch

from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.core.model_state import eager_attention
from uma_callbacks.linalg.hvp import HessianOperator
from uma_callbacks.linalg.lanczos import lanczos_top_k

ACCURACY = 1e-4


def qwen2_setup(seq: int = 16, batch: int = 4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


class CountingCache:
    """``matvec`` through a cache keyed by the vector's bytes; counts real products."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.cache, self.products = op, {}, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(v.detach().cpu().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.op.matvec(v)
            self.products += 1
        return self.cache[key]


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want) / np.abs(want)))


def lanczos_steps_to_accuracy(op, k: int, reference: np.ndarray, limit: int) -> int:
    """The fewest Lanczos steps whose top-k Ritz values are within ACCURACY (shared products)."""
    cached = CountingCache(op)
    for m in range(k, limit + 1):
        r = lanczos_top_k(cached, op.dim, k, max_iter=m, tol=1e-300, seed=0)
        if rel_err(r.eigenvalues.numpy(), reference[:k]) <= ACCURACY:
            return m
    return -1


def power_iteration_deflation(matvec, dim: int, k: int, reference: np.ndarray, cap: int, seed: int = 0):
    """PyHessian-style top-k: power iteration, each vector orthogonalised against the found
    eigenvectors; eigenvalue i stops once within ACCURACY of reference[i] (or after ``cap``)."""
    gen = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    values, products, converged = [], 0, 0
    for i in range(k):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        for u in found:
            v -= torch.dot(v, u) * u
        v /= v.norm()
        lam = 0.0
        for _ in range(cap):
            hv = matvec(v)
            products += 1
            lam = float(torch.dot(hv, v))
            for u in found:
                hv -= torch.dot(hv, u) * u
            v = hv / hv.norm()
            if abs(lam - reference[i]) <= ACCURACY * abs(reference[i]):
                converged += 1
                break
        values.append(lam)
        found.append(v)
    return np.array(values), products, converged


def pyhessian_top_k(model, batches, k: int, max_iter: int):
    """The pyhessian package's eigenvalues(top_n=k, tol=1e-4): (values, products, seconds)."""
    import sys

    import pyhessian  # noqa: F401  (its __init__ shadows the submodule with the class)

    ph = sys.modules["pyhessian.hessian"]

    batch = batches[0]

    class Shifted(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).logits[:, :-1].reshape(-1, self.m.config.vocab_size)

    targets = batch["labels"][:, 1:].reshape(-1)
    counter = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        h = ph.hessian(
            Shifted(model), torch.nn.CrossEntropyLoss(), data=(batch["input_ids"], targets), cuda=False
        )
        values, _ = h.eigenvalues(maxIter=max_iter, tol=ACCURACY, top_n=k)
        seconds = time.perf_counter() - start
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)
    return np.array(values, dtype=np.float64), counter["n"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter sequences, tighter caps (< 60 s)")
    parser.add_argument(
        "--power-cap", type=int, default=None, help="most products per eigenvalue (power iteration)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cap = args.power_cap or (50 if args.quick else 500)
    model, batches = qwen2_setup(seq=12 if args.quick else 16)
    params = dict(model.named_parameters())
    n = batches[0]["input_ids"].shape[0]
    with eager_attention(model):
        op = HessianOperator(model, hf_per_sample_loss, batches, params, n, cache_graph=True)
        ref = lanczos_top_k(op.matvec, op.dim, 10, max_iter=200, tol=1e-10, seed=1)
        reference = ref.eigenvalues.numpy()
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        start = time.perf_counter()
        for _ in range(10):
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
        hvp_seconds = (time.perf_counter() - start) / 10
        print(
            f"Qwen2 {op.dim} params, batch {tuple(batches[0]['input_ids'].shape)}, one HVP {hvp_seconds * 1e3:.1f} ms"
        )
        print(
            f"reference top-10 ({ref.matvecs} products, converged {ref.converged}): {np.round(reference, 5).tolist()}"
        )
        summary = {}
        for k in (1, 10):
            steps = lanczos_steps_to_accuracy(op, k, reference, 150)
            start = time.perf_counter()
            lz = lanczos_top_k(op.matvec, op.dim, k, max_iter=steps, tol=1e-300, seed=0)
            lanczos_seconds = time.perf_counter() - start
            start = time.perf_counter()
            values, products, converged = power_iteration_deflation(op.matvec, op.dim, k, reference, cap)
            power_seconds = time.perf_counter() - start
            print(
                f"top-{k}: Lanczos {steps} HVPs, {lanczos_seconds:.2f} s, err {rel_err(lz.eigenvalues.numpy(), reference[:k]):.1e}; "
                f"power+deflation {products} HVPs ({converged}/{k} within {ACCURACY:g}), {power_seconds:.2f} s, "
                f"err {rel_err(values, reference[:k]):.1e}"
            )
            summary[k] = (steps, lanczos_seconds, products, power_seconds, converged)
    pyh = None
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("pyhessian: not installed")
    else:
        pyh = {}
        for k in (1, 10):
            values, products, seconds = pyhessian_top_k(model, batches, k, cap)
            order_ok = bool(np.all(np.diff(values) <= 0))
            pyh[k] = (products, seconds, rel_err(np.sort(values)[::-1], reference[:k]))
            print(
                f"pyhessian top-{k}: {products} HVPs, {seconds:.2f} s, sorted {order_ok}, "
                f"err (sorted) {pyh[k][2]:.1e}, values {np.round(values, 5).tolist()}"
            )
    for k in (1, 10):
        steps, ls, products, ps, converged = summary[k]
        print(f"hessian_lanczos_hvps_top{k}={steps}")
        print(f"hessian_lanczos_seconds_top{k}={ls:.3f}")
        print(f"hessian_power_hvps_top{k}={products}")
        print(f"hessian_power_seconds_top{k}={ps:.3f}")
        print(f"hessian_power_converged_top{k}={converged}/{k}")
        if pyh is not None:
            print(f"hessian_pyhessian_hvps_top{k}={pyh[k][0]}")
            print(f"hessian_pyhessian_seconds_top{k}={pyh[k][1]:.3f}")
            print(f"hessian_pyhessian_rel_err_top{k}={pyh[k][2]:.2e}")
    print(f"hessian_hvp_ms={hvp_seconds * 1e3:.3f}")
    # with eigenvalues left unconverged at the cap, the power count is a lower bound
    bound = summary[10][4] < 10
    print(f"hessian_hvp_ratio_power_over_lanczos={summary[10][2] / summary[10][0]:.2f}")
    print(f"hessian_hvp_ratio_is_lower_bound={int(bool(bound))}")
    print(f"hessian_hvp_ratio_power_over_lanczos_top1={summary[1][2] / summary[1][0]:.2f}")


if __name__ == "__main__":
    main()
