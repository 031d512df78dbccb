"""Benchmark: which Lanczos start and stopping rule take the fewest Hessian products to a correct top-10.

For the bench Qwen2 (float64) and the real MiniLM (float32, 16-sentence probe) of
``bench/spectra.py``, one Lanczos run per start (the metric's single-vector Lanczos:
partial reorthogonalisation, a convergence check after every product) is followed product
by product; at each product m, the top Ritz values theta_j and their residuals
|beta_m y_j[m]| give

- ``products``: the first m at which every top-10 relative residual |beta_m y_j[m]| /
  |theta_1| is within 1e-2 (what ``HessianSpectrum(tol=1e-2)`` stops at), plus any product
  spent on the start itself;
- ``eigenvalue_err``: max_j |theta_j - lambda_j| / |lambda_1| there, against a converged
  reference (full reorthogonalisation to 1e-9 in float64, 1e-3 in float32). A Ritz pair
  with residual r lies within r of an eigenvalue, so an error above 1e-2 means a top-10
  eigenvalue was missed although every residual passed;
- ``values_1e-2``: the first m whose top-10 values are within 1e-2 of the reference, what a
  stop that knew the answer would take (no stopping rule can do better from that start).

Default run (``--model``): the starts. The gradient sketch (the metric's default), a Gaussian
vector, the full-batch gradient, and combinations of the empirical Fisher's top eigenvectors
u_j (Gram path: u_j = G^T w_j from eigh(G G^T); at most N of them): their sum, weighted by
lambda_F,j or sqrt(lambda_F,j), and the Fisher sum plus the sketch; full reorthogonalisation
from the sketch. First, how much of each top-10 Hessian eigenvector h_j lies in span(U)
(||P_U h_j||^2) and the u_j's Rayleigh quotients u_j^T H u_j: what bounds any Fisher start.

``--sketch-seeds S...``: the default start for several seeds of the sketch, and two other
stopping rules on the same runs: the top-12 residuals (``top12``) and the top-10 residuals at
three consecutive products (``stable``), and every top-10 residual within 5e-3 (``half``:
``HessianSpectrum(tol=residual_tol / 2)``).

``--warm``: on the Qwen2, the next checkpoint 1 / 10 / 30 / 100 AdamW steps (lr 1e-4) later,
started from this checkpoint's top-10 Ritz vectors y_j: their sum (``start="previous"``),
block Lanczos from all ten, from five rows y_j + y_{j+5}, from the top five, from two half
sums, Rayleigh-Ritz on the ten alone, against the default start and curvlinops + eigsh from
the same sum.

Run ``python bench/spectra_starts.py [--model qwen2|minilm|both] [--sketch-seeds ...] [--warm]``;
it ends with ``name=value`` lines. Product counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.spectra import load_minilm, moved_copy  # noqa: E402
from uma_callbacks.core import seeds  # noqa: E402
from uma_callbacks.core.losses import hf_per_sample_loss  # noqa: E402
from uma_callbacks.core.model_state import eager_attention  # noqa: E402
from uma_callbacks.linalg.hvp import HessianOperator  # noqa: E402
from uma_callbacks.linalg.lanczos import LanczosProgress, lanczos_top_k  # noqa: E402

RESIDUAL = 1e-2
K = 10
EXTRA = 2  # Ritz pairs followed beyond the top-K (the stopping rule on the top K + EXTRA)
STABLE = 3  # consecutive products the stopping rule "stable" asks the top-K residuals to pass at


def per_sample_gradients(model, batch) -> torch.Tensor:
    """G [N, P] in the parameters' dtype, one backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        one = {key: value[i : i + 1] for key, value in batch.items()}
        grads = torch.autograd.grad(hf_per_sample_loss(model, one).sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def gram64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b^T in float64, by column blocks (no float64 copy of the whole of a or b)."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for lo in range(0, a.shape[1], 1 << 21):
        out += a[:, lo : lo + (1 << 21)].double() @ b[:, lo : lo + (1 << 21)].double().T
    return out


def fisher_eig(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda_F [m] descending, U [m, P] unit rows): the empirical Fisher G^T G / N's nonzero eigenpairs."""
    n = g.shape[0]
    vals, w = torch.linalg.eigh(gram64(g, g) / n)
    vals, w = vals.flip(0), w.flip(1)
    keep = vals > 1e-12 * vals[0]
    vals, w = vals[keep], w[:, keep]
    u = (w.T.to(g.dtype) @ g)  # [m, P]
    u = u / u.norm(dim=1, keepdim=True)
    return vals, u


def trajectory(op: HessianOperator, start, max_iter: int, seed: int = 0, reorthogonalise: str = "partial"):
    """One Lanczos run (the metric's settings, never stopping early): per product m, (Ritz values
    top-K descending, residual estimates |beta_m y_j[m]|). Also the result (vectors when asked)."""
    progress = LanczosProgress()
    steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_step(m: int, residuals: torch.Tensor) -> None:
        a = progress.alphas
        b = progress.betas[: len(a) - 1]
        t = torch.diag(torch.tensor(a, dtype=torch.float64))
        if len(a) > 1:
            off = torch.tensor(b, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        vals = torch.linalg.eigvalsh(t).flip(0)[: K + EXTRA]
        steps.append((m, vals, residuals.double().cpu().clone()))

    lanczos_top_k(op.matvec, op.dim, K + EXTRA, max_iter=max_iter, tol=1e-30, seed=seed, dtype=op.dtype, check_every=1,
                  start=None if start is None else start.to(op.dtype), on_step=on_step, progress=progress,
                  reorthogonalise=reorthogonalise)
    return steps


def first_within(steps, reference: torch.Tensor) -> dict[str, float]:
    """Where each stopping rule stops and the top-K eigenvalue error there (max_j |theta_j - lambda_j| / |lambda_1|).

    Rules: ``products`` (the metric's: every top-K relative residual <= RESIDUAL), ``top12`` (every
    top-(K + EXTRA) residual), ``stable`` (the top-K residuals within RESIDUAL at STABLE consecutive
    products), ``half`` (every top-K residual within RESIDUAL / 2: ``tol=residual_tol / 2``); also the first product whose top-K values are within 1e-2 / 1e-3 of the reference
    (whatever the residuals: what a stop that knew the answer would take).
    """
    lam1 = float(reference.abs().max())
    out = {"products": math.inf, "eigenvalue_err": math.nan, "residual": math.nan,
           "top12_products": math.inf, "top12_eigenvalue_err": math.nan,
           "stable_products": math.inf, "stable_eigenvalue_err": math.nan,
           "half_products": math.inf, "half_eigenvalue_err": math.nan,
           "values_1e-2": math.inf, "values_1e-3": math.inf}
    run = 0
    for m, vals, res in steps:
        if vals.numel() < K:
            continue
        err = float((vals[:K] - reference[:K]).abs().max() / lam1)
        if err <= 1e-2 and math.isinf(out["values_1e-2"]):
            out["values_1e-2"] = m
        if err <= 1e-3 and math.isinf(out["values_1e-3"]):
            out["values_1e-3"] = m
        rel = res / max(float(vals.abs().max()), 1e-300)
        top = bool((rel[:K] <= RESIDUAL).all())
        run = run + 1 if top else 0
        if math.isinf(out["products"]) and top:
            out.update(products=m, eigenvalue_err=err, residual=float(rel[:K].max()))
        if math.isinf(out["half_products"]) and bool((rel[:K] <= RESIDUAL / 2).all()):
            out.update(half_products=m, half_eigenvalue_err=err)
        if math.isinf(out["stable_products"]) and run >= STABLE:
            out.update(stable_products=m, stable_eigenvalue_err=err)
        if math.isinf(out["top12_products"]) and rel.numel() >= K + EXTRA and bool((rel <= RESIDUAL).all()):
            out.update(top12_products=m, top12_eigenvalue_err=err)
    return out


def reference_pairs(op: HessianOperator, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs converged far below RESIDUAL (full reorthogonalisation, random start)."""
    tol, most = (1e-9, 300) if op.dtype == torch.float64 else (1e-3, 110)  # float32: 110 basis vectors of [P] at most
    lz = lanczos_top_k(op.matvec, op.dim, k, max_iter=min(op.dim, most), tol=tol, seed=1, dtype=op.dtype,
                       check_every=1, reorthogonalise="full", return_vectors=True)
    print(f"    reference: {lz.matvecs} products, converged={lz.converged}")
    return lz.eigenvalues.double().cpu(), lz.eigenvectors.T.contiguous()  # [k], [k, P]


def section(label: str, model, batches, max_iter: int, names=None) -> dict[str, float]:
    batch = batches[0]
    n = batch["input_ids"].shape[0]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    out: dict[str, float] = {}
    with eager_attention(model):
        op = HessianOperator(model, hf_per_sample_loss, batches, params, n, cache_graph=True)
        t0 = time.perf_counter()
        ref_vals, ref_vecs = reference_pairs(op, K + 2)
        print(f"  {label}: P={op.dim}, N={n}; reference top-{K + 2} {[round(float(x), 5) for x in ref_vals]} "
              f"({time.perf_counter() - t0:.0f} s)")
        g = per_sample_gradients(model, batch)
        grad = g.mean(0)
        f_vals, u = fisher_eig(g)
        del g
        print(f"    Fisher eigenvalues {[round(float(x), 5) for x in f_vals[:K]]}")
        # how much of each top Hessian eigenvector lies in span(U): ||U h_j||^2 (U's rows orthonormal)
        uq, _ = torch.linalg.qr(u.double().T)
        cover = [float((uq.T @ ref_vecs[j].double()).norm() ** 2) for j in range(K)]
        print(f"    ||P_Fisher h_j||^2, j = 1..{K}: {[round(c, 3) for c in cover]}")
        out["fisher_span_cover_mean"] = sum(cover) / K
        out["fisher_span_cover_min"] = min(cover)
        # the top Fisher eigenvectors as Hessian Rayleigh quotients
        rq = torch.stack([u[j] @ op.matvec(u[j]) for j in range(min(K, u.shape[0]))])
        del ref_vecs, uq
        print(f"    u_j^T H u_j: {[round(float(x), 5) for x in rq[:K]]}")
        sketch = op.gradient_sketch(1, int(seeds.DEFAULT_SEED))[0]
        fk = u[:K]
        lam = f_vals[:K].to(u.dtype)
        starts = {
            "gradients": sketch,
            "random": None,
            "mean_gradient": grad,
            "fisher_sum": fk.sum(0),
            "fisher_weighted": (lam[:, None] * fk).sum(0),
            "fisher_sqrt_weighted": (lam.sqrt()[:, None] * fk).sum(0),
            "fisher_sum_plus_gradients": fk.sum(0) / fk.sum(0).norm() + sketch / sketch.norm(),
            "random_seed1": "seed1",
            "random_seed2": "seed2",
            "gradients_full_reorth": sketch,
        }
        for name, start in starts.items():
            if names and name not in names:
                continue
            seed = 0
            if isinstance(start, str):
                seed, start = int(start[-1]), None
            t0 = time.perf_counter()
            steps = trajectory(op, start, max_iter, seed=seed, reorthogonalise="full" if "full" in name else "partial")
            got = first_within(steps, ref_vals)
            for key, value in got.items():
                out[f"{name}_{key}"] = value
            print(f"    start {name:>28}: {got['products']} products (residual {got['residual']:.1e}, eigenvalue err "
                  f"{got['eigenvalue_err']:.1e}); values within 1e-2 at {got['values_1e-2']}, 1e-3 at {got['values_1e-3']} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        op.close()
    return out


def sketch_seeds(label: str, model, batches, seed_list, max_iter: int, reference: list[float] | None) -> dict[str, float]:
    """The metric's default start (the gradient sketch) for several seeds: how much the products vary
    with the random combination of the per-sample gradients alone."""
    n = batches[0]["input_ids"].shape[0]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    out: dict[str, float] = {}
    with eager_attention(model):
        op = HessianOperator(model, hf_per_sample_loss, batches, params, n, cache_graph=True)
        ref_vals = torch.tensor(reference, dtype=torch.float64) if reference else reference_pairs(op, K + 2)[0]
        print(f"  {label} reference top-{K} {[round(float(x), 5) for x in ref_vals[:K]]}")
        for seed in seed_list:
            steps = trajectory(op, op.gradient_sketch(1, int(seed))[0], max_iter)
            got = first_within(steps, ref_vals)
            at = {m: float((res[:K] / vals.abs().max()).max()) for m, vals, res in steps}
            print(f"    gradient sketch seed {seed}: {got['products']} products (eigenvalue err {got['eigenvalue_err']:.1e}); "
                  f"top-{K + EXTRA} rule {got['top12_products']} (err {got['top12_eigenvalue_err']:.1e}); "
                  f"{STABLE} in a row {got['stable_products']} (err {got['stable_eigenvalue_err']:.1e}); "
                  f"residual {RESIDUAL / 2:g} {got['half_products']} (err {got['half_eigenvalue_err']:.1e}); "
                  f"values within 1e-2 at {got['values_1e-2']}; relative residual at 52 / 55 products "
                  f"{at.get(52, math.nan):.1e} / {at.get(55, math.nan):.1e}", flush=True)
            for key in ("products", "eigenvalue_err", "top12_products", "top12_eigenvalue_err", "stable_products",
                        "stable_eigenvalue_err", "half_products", "half_eigenvalue_err", "values_1e-2"):
                out[f"sketch_seed{seed}_{key}"] = got[key]
            out[f"sketch_seed{seed}_residual_at_55"] = at.get(55, math.nan)
        op.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("qwen2", "minilm", "both"), default="qwen2")
    parser.add_argument("--starts", nargs="*", default=None, help="MiniLM: only these starts (default all)")
    parser.add_argument("--sketch-seeds", nargs="*", type=int, default=None,
                        help="instead: the default start's trajectory for these seeds of the gradient sketch")
    parser.add_argument("--reference", nargs="*", type=float, default=None,
                        help="with --sketch-seeds: the converged top-10 (from an earlier run) instead of recomputing it")
    parser.add_argument("--warm", action="store_true", help="instead: the next checkpoint's warm starts (Qwen2)")
    args = parser.parse_args()
    summary: dict[str, float] = {}
    if args.warm:
        warm_main()
        return
    if args.sketch_seeds is not None:
        if args.model in ("qwen2", "both"):
            from bench.hessian import qwen2_setup

            summary.update({f"qwen2_{k}": v for k, v in sketch_seeds("Qwen2", *qwen2_setup(), args.sketch_seeds, 150, None).items()})
        if args.model in ("minilm", "both"):
            summary.update({f"minilm_{k}": v for k, v in sketch_seeds("MiniLM", *load_minilm(16), args.sketch_seeds, 72, args.reference).items()})
        for key, value in summary.items():
            print(f"{key}={value:.4g}")
        return
    if args.model in ("qwen2", "both"):
        from bench.hessian import qwen2_setup

        model, batches = qwen2_setup()
        summary.update({f"qwen2_{k}": v for k, v in section("Qwen2", model, batches, 150).items()})
    if args.model in ("minilm", "both"):
        model, batches = load_minilm(16)
        summary.update({f"minilm_{k}": v for k, v in section("MiniLM", model, batches, 72, names=args.starts).items()})
    for key, value in summary.items():
        print(f"{key}={value:.4g}")


def rayleigh_ritz(op: HessianOperator, rows: torch.Tensor):
    """Rayleigh-Ritz on span(rows [b, P]): b products. (Ritz values descending, relative residuals ||H y - theta y|| / |theta_1|)."""
    q, _ = torch.linalg.qr(rows.T.to(op.dtype))  # [P, b]
    hq = op.matmat(q)
    t = q.T @ hq
    vals, y = torch.linalg.eigh((t + t.T) / 2)
    vals, y = vals.flip(0), y.flip(1)
    res = (hq @ y - q @ y * vals).norm(dim=0)
    return vals.double(), (res / vals.abs().max()).double()


def block_products(op: HessianOperator, rows: torch.Tensor, reference: torch.Tensor, max_matvecs: int = 200):
    """Block Lanczos (b = rows of ``rows``) from ``rows`` to RESIDUAL: (products, residual, eigenvalue err)."""
    from uma_callbacks.linalg.lanczos import block_lanczos_top_k, relative_residuals

    before = op.matvecs
    bl = block_lanczos_top_k(op.matmat_rows, op.dim, K, block_size=rows.shape[0], max_matvecs=max_matvecs, tol=RESIDUAL,
                             dtype=op.dtype, rows=True, start=rows.to(op.dtype))
    err = float((bl.eigenvalues.double()[:K] - reference[:K]).abs().max() / reference.abs().max())
    return op.matvecs - before, float(relative_residuals(bl).max()), err


def warm_section(model, batches, steps_list=(1, 10, 30, 100)) -> dict[str, float]:
    """Next checkpoint after s steps: products from the previous Ritz vectors (sum; blocks; Rayleigh-Ritz alone),
    against the default start and curvlinops + eigsh from the same sum (bench/spectra.py's peer)."""
    from bench.spectra import composite_silu, curvlinops_operator, eigsh_products

    composite_silu(model)
    n = batches[0]["input_ids"].shape[0]
    out: dict[str, float] = {}
    with eager_attention(model):
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        op = HessianOperator(model, hf_per_sample_loss, batches, params, n, cache_graph=True)
        sketch = op.gradient_sketch(1, int(seeds.DEFAULT_SEED))[0]
        lz = lanczos_top_k(op.matvec, op.dim, K, max_iter=150, tol=RESIDUAL, dtype=op.dtype, check_every=1,
                           start=sketch, return_vectors=True)
        prev = lz.eigenvectors.T.contiguous()  # [K, P]
        op.close()
    print(f"  warm starts: this checkpoint {lz.matvecs} products")
    for s in steps_list:
        moved = moved_copy(model, batches, s)
        with eager_attention(moved):
            params = {k: p for k, p in moved.named_parameters() if p.requires_grad}
            op = HessianOperator(moved, hf_per_sample_loss, batches, params, n, cache_graph=True)
            ref_vals, _ = reference_pairs(op, K + 2)
            lam1 = float(ref_vals.abs().max())
            sketch = op.gradient_sketch(1, int(seeds.DEFAULT_SEED))[0]
            row = {}
            for name, start in {"gradients": sketch, "previous_sum": prev.sum(0)}.items():
                got = first_within(trajectory(op, start, 150), ref_vals)
                row[name] = (got["products"], got["residual"], got["eigenvalue_err"])
            vals, rel = rayleigh_ritz(op, prev)
            row["rr_only"] = (K, float(rel[:K].max()), float((vals[:K] - ref_vals[:K]).abs().max() / lam1))
            row["block10"] = block_products(op, prev, ref_vals)
            row["block5_pairs"] = block_products(op, prev[:5] + prev[5:], ref_vals)
            row["block5_top"] = block_products(op, prev[:5], ref_vals)
            row["block2_halves"] = block_products(op, torch.stack([prev[:5].sum(0), prev[5:].sum(0)]), ref_vals)
            products, res, values, _tol = eigsh_products(curvlinops_operator(moved, batches[0]), op, K, lam1,
                                                         v0=prev.sum(0).double().numpy().copy(), reference=ref_vals[:K])
            row["eigsh_previous_v0"] = (products, res, float((torch.as_tensor(values.copy()).sort(descending=True).values[:K]
                                                              - ref_vals[:K]).abs().max() / lam1))
            op.close()
        print(f"    after {s} AdamW step(s): " + "; ".join(
            f"{name} {p} (res {r:.1e}, err {e:.1e})" for name, (p, r, e) in row.items()), flush=True)
        for name, (p, _r, e) in row.items():
            out[f"warm_{s}_{name}_products"] = p
            out[f"warm_{s}_{name}_eigenvalue_err"] = e
    return out


def warm_main() -> None:
    from bench.hessian import qwen2_setup

    model, batches = qwen2_setup()
    for key, value in warm_section(model, batches).items():
        print(f"qwen2_{key}={value:.4g}")


if __name__ == "__main__":
    main()
