"""Block Lanczos against dense eigvalsh; batched Hessian products against one at a time."""

from __future__ import annotations

import pytest
import torch

from tests.cases import TINY_CASES
from uma_callbacks.linalg import lanczos as lanczos_module
from uma_callbacks.linalg.hvp import HessianOperator
from uma_callbacks.linalg.lanczos import block_lanczos_top_k, lanczos_top_k
from uma_callbacks.metrics import HessianSpectrum


@pytest.mark.parametrize("block", [1, 2, 4, 7])
@pytest.mark.parametrize("rank", [60, 5])
def test_block_lanczos_matches_eigvalsh(block, rank):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(60, rank, generator=gen, dtype=torch.float64)
    a = x @ x.T / 60 - 0.2 * torch.eye(60, dtype=torch.float64)  # negative eigenvalues too
    want = torch.linalg.eigvalsh(a).flip(0)[:4]
    r = block_lanczos_top_k(lambda v: a @ v, 60, 4, block_size=block, tol=1e-10, max_matvecs=60, return_vectors=True)
    assert r.converged
    torch.testing.assert_close(r.eigenvalues, want, rtol=1e-9, atol=1e-12)
    true_res = (a @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    torch.testing.assert_close(r.residuals, true_res, rtol=1e-3, atol=1e-10)


def test_batched_products_equal_one_at_a_time():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    params = dict(model.named_parameters())
    op = HessianOperator(model, loss_fn, batches, params, n_total=10, cache_graph=True)
    block = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = op.matmat(block)
    assert op.batched and op.matvecs == 3
    want = torch.stack([op.matvec(block[:, j]) for j in range(3)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_hessian_reports_residuals_per_eigenpair():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    r = HessianSpectrum(top_k=3, hutchinson_samples=4, tol=1e-8, block_size=3).compute(model, batches, loss_fn)
    assert r.meta["lanczos_converged"] and r.meta["lanczos_block_size"] == 3 and r.meta["hvp_batched"]
    assert len(r.meta["lanczos_residuals"]) == 3 and max(r.meta["lanczos_relative_residuals"]) <= 1e-8
    one = HessianSpectrum(top_k=3, hutchinson_samples=4, tol=1e-8, block_size=1).compute(model, batches, loss_fn)
    torch.testing.assert_close(
        torch.tensor(r.arrays["top_eigenvalues"]), torch.tensor(one.arrays["top_eigenvalues"]), rtol=1e-7, atol=0
    )
    assert r.scalars["trace"] == pytest.approx(one.scalars["trace"], rel=1e-10)  # same probes, batched
    # on CPU the default is classical Lanczos from a combination of per-sample gradients
    auto = HessianSpectrum(top_k=3, hutchinson_samples=0, tol=1e-8).compute(model, batches, loss_fn)
    assert auto.meta["lanczos_block_size"] == 1 and auto.meta["lanczos_start"] == "gradients"
    torch.testing.assert_close(
        torch.tensor(auto.arrays["top_eigenvalues"]), torch.tensor(one.arrays["top_eigenvalues"]), rtol=1e-7, atol=0
    )


def test_gradient_sketch_is_the_weighted_sum_of_per_sample_gradients():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    params = dict(model.named_parameters())
    op = HessianOperator(model, loss_fn, batches, params, n_total=10, cache_graph=True)
    got = op.gradient_sketch(3, seed=7)
    gen, want = torch.Generator().manual_seed(7), torch.zeros_like(got)
    for batch in batches:  # weights drawn chunk by chunk, in probe order
        losses = loss_fn(model, batch)
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, list(params.values()), retain_graph=True)])
            for li in losses
        ]
        want += torch.randn(3, losses.shape[0], generator=gen, dtype=torch.float64) @ torch.stack(rows)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert op.matvecs == 0 and all(p.grad is None for p in params.values())


def test_gradient_start_and_random_start_agree():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    kwargs = {"top_k": 4, "hutchinson_samples": 0, "tol": 1e-10, "max_iter": 80}
    a = HessianSpectrum(start="gradients", **kwargs).compute(model, batches, loss_fn)
    b = HessianSpectrum(start="random", **kwargs).compute(model, batches, loss_fn)
    assert a.meta["lanczos_start"] == "gradients" and b.meta["lanczos_start"] == "random"
    torch.testing.assert_close(
        torch.tensor(a.arrays["top_eigenvalues"]), torch.tensor(b.arrays["top_eigenvalues"]), rtol=1e-9, atol=0
    )
    assert a.status == b.status == "ok"


def test_sharded_lanczos_in_two_threads_equals_one_process():
    """Two "ranks" (threads in lockstep) each hold a piece of every vector (uneven: 23 and
    17 entries): ``reduce_sum`` adds their partial inner products, ``matvec`` maps pieces
    to pieces. Same Ritz values as one process from the same start vector, the Ritz
    vectors come back as pieces, and every inner product went through ``reduce_sum``."""
    import threading

    from uma_callbacks.linalg.lanczos import lanczos_top_k

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    a = x @ x.T / 40 + torch.diag(torch.linspace(0.0, 0.1, 40, dtype=torch.float64))
    start = torch.randn(40, generator=gen, dtype=torch.float64)
    cuts = [(0, 23), (23, 40)]
    barrier, slots, calls = threading.Barrier(2, timeout=30), [None, None], [0, 0]
    results: list = [None, None]

    def exchange(rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        slots[rank] = t.clone()
        barrier.wait()
        both = [slots[0], slots[1]]
        barrier.wait()  # both read before either writes again
        return both

    def run(rank: int) -> None:
        lo, hi = cuts[rank]

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            calls[rank] += 1
            first, second = exchange(rank, t)
            return first + second

        def matvec(piece: torch.Tensor) -> torch.Tensor:
            return (a @ torch.cat(exchange(rank, piece)))[lo:hi]

        results[rank] = lanczos_top_k(
            matvec, hi - lo, 3, tol=1e-10, max_iter=40, start=start[lo:hi], return_vectors=True,
            reduce_sum=reduce_sum, total_dim=40,
        )  # fmt: skip

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    one = lanczos_top_k(lambda v: a @ v, 40, 3, tol=1e-10, max_iter=40, start=start, return_vectors=True)
    want = torch.linalg.eigvalsh(a).flip(0)[:3]
    for r in results:
        assert r is not None and r.converged and r.matvecs == one.matvecs
        torch.testing.assert_close(r.eigenvalues, one.eigenvalues, rtol=1e-10, atol=0)
        torch.testing.assert_close(r.eigenvalues, want, rtol=1e-9, atol=0)
    assert [r.eigenvectors.shape for r in results] == [(23, 3), (17, 3)]
    vectors = torch.cat([results[0].eigenvectors, results[1].eigenvectors])
    torch.testing.assert_close(vectors.abs(), one.eigenvectors.abs(), rtol=1e-7, atol=1e-9)
    assert calls[0] == calls[1] > 2 * one.matvecs  # alpha, projections and norms at each step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partial_reorthogonalisation_matches_full_with_fewer_passes(dtype):
    """A 2000 x 2000 operator with the MiniLM Hessian's bunched top-10 (5.2, 2.96, ..., 1.94):
    partial reorthogonalisation (Simon's omega recurrence) gives the full method's Ritz
    values to 1e-6 with a fraction of the passes over the basis, and no spurious copies
    of converged values even when run long past convergence."""
    gen = torch.Generator().manual_seed(0)
    n = 2000
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    top = torch.tensor([5.2, 2.96, 2.47, 2.23, 2.17, 2.08, 2.04, 1.99, 1.97, 1.94, 1.88], dtype=torch.float64)
    ev = torch.cat([top, torch.linspace(1.85, -2.0, n - 11, dtype=torch.float64)])
    a = ((q * ev) @ q.T).to(dtype)
    runs = {
        mode: lanczos_top_k(lambda v: a @ v, n, 10, max_iter=200, tol=1e-12, dtype=dtype, reorthogonalise=mode)
        for mode in ("full", "partial")
    }
    full, partial = runs["full"], runs["partial"]
    assert full.reorthogonalised == full.matvecs and partial.reorthogonalised < full.matvecs / 2
    torch.testing.assert_close(partial.eigenvalues.double(), ev[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(partial.eigenvalues, full.eigenvalues, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="reorthogonalise"):
        lanczos_top_k(lambda v: a @ v, n, 2, reorthogonalise="some")


def test_products_that_carry_a_graph_are_read_as_numbers():
    """A matvec whose result requires grad (the matrix is a Parameter) gives the same
    eigenvalues: the reused Lanczos buffers take its values, not its graph."""
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    a = torch.nn.Parameter(m @ m.T)
    r = lanczos_top_k(lambda v: a @ v, 30, 3, tol=1e-10, max_iter=30, dtype=torch.float64)
    want = torch.linalg.eigvalsh(a.detach()).flip(0)[:3]
    torch.testing.assert_close(r.eigenvalues, want, rtol=1e-9, atol=0)


def _spectrum_operator(n: int = 300, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    ev = torch.cat([torch.tensor([9.0, 7.5, 7.0, 6.8]), torch.linspace(6.0, -3.0, n - 4)]).double()
    return (q * ev) @ q.T


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_scratch_products_and_a_basis_away_from_the_products_give_the_same_values(mode, monkeypatch):
    """The work vector taken from the product (``product_is_scratch``), a product that hands
    back its input or a view of it (never written over), and the two-row ring used when the
    basis lives on another device (forced here on CPU) all give the same Ritz values and
    vectors as the plain run: the recurrence reads q_{j-1} and q_j from wherever they are."""
    a = _spectrum_operator()
    want = torch.linalg.eigvalsh(a).flip(0)[:4]
    kw = dict(tol=1e-10, max_iter=120, dtype=torch.float64, return_vectors=True, reorthogonalise=mode)
    plain = lanczos_top_k(lambda v: a @ v, 300, 4, **kw)
    buffer = torch.empty(300, dtype=torch.float64)
    scratch = lanczos_top_k(lambda v: torch.mv(a, v, out=buffer), 300, 4, product_is_scratch=True, **kw)
    # an operator returning its own input: must be copied, not written over
    ident = lanczos_top_k(lambda v: v, 300, 2, product_is_scratch=True, tol=1e-10, max_iter=5, dtype=torch.float64)
    monkeypatch.setattr(lanczos_module, "_same_device", lambda x, y: False)
    ring = lanczos_top_k(lambda v: a @ v, 300, 4, product_is_scratch=True, **kw)
    for r in (plain, scratch, ring):
        assert r.converged
        torch.testing.assert_close(r.eigenvalues, want, rtol=1e-9, atol=0)
    for r in (scratch, ring):
        assert r.matvecs == plain.matvecs and r.reorthogonalised == plain.reorthogonalised
        torch.testing.assert_close(r.eigenvectors.abs(), plain.eigenvectors.abs(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ident.eigenvalues, torch.ones(1, dtype=torch.float64))
    assert plain.basis_rows_read > 0


def test_is_private_refuses_results_that_share_memory_with_what_lanczos_keeps():
    basis = torch.zeros(4, 10)
    assert not lanczos_module._is_private(basis[1], 10, torch.float32, basis)
    assert not lanczos_module._is_private(torch.zeros(10, dtype=torch.float64), 10, torch.float32, basis)
    assert not lanczos_module._is_private(torch.zeros(20)[::2], 10, torch.float32, basis)
    assert lanczos_module._is_private(torch.zeros(10), 10, torch.float32, basis, None)
