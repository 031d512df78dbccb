"""FisherInformation against a float64 brute force (one backward per sample, dense eigvalsh)."""

from __future__ import annotations

import copy
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.cases import TINY_CASES, mlp_case
from tests.oracles import oracle_per_sample_grads, param_slices
from uma_callbacks.metrics import METRICS, FisherInformation
from uma_callbacks.metrics.base import module_of
from uma_callbacks.metrics.fisher import mask_scalars, spectrum_scalars, top_percent_mask

TOP_K = 4


def oracle_fisher(model, batches, loss_fn) -> dict:
    """Diagonal, traces and top eigenvalues of F = G^T G / N from the per-sample oracle."""
    names, G = oracle_per_sample_grads(model, batches, loss_fn)
    n = G.shape[0]
    slices = param_slices(model)
    diag = (G**2).mean(0)
    scalars = {"trace": float(diag.sum())}
    for name in names:
        scalars[f"params/{name}/trace"] = float(diag[slices[name]].sum())
        key = f"layers/{module_of(name)}/trace"
        scalars[key] = scalars.get(key, 0.0) + scalars[f"params/{name}/trace"]
    eig = torch.linalg.eigvalsh(G @ G.T / n).flip(0)  # nonzero spectrum of G^T G / N
    return {"scalars": scalars, "diag": {n_: diag[slices[n_]] for n_ in names}, "eig": eig.numpy(), "G": G}


_ORACLES: dict[str, dict] = {}


def _oracle(case):
    """The oracle on the case's model with eager attention: the metric computes with eager
    attention (vmap needs it), and SDPA differs from it by ~1e-7 relative in float64."""
    if case.name not in _ORACLES:
        model, batches, loss_fn = case.build(dtype=torch.float64)
        if hasattr(model, "config"):
            model.config._attn_implementation = "eager"
        _ORACLES[case.name] = oracle_fisher(model, batches, loss_fn)
    return _ORACLES[case.name]


@pytest.mark.parametrize("case", TINY_CASES, ids=str)
def test_fisher_matches_oracle_for_every_chunk_size(case):
    model, batches, loss_fn = case.build(dtype=torch.float64)
    want = _oracle(case)
    runs = [
        FisherInformation(top_k=TOP_K, keep_diagonal=True, chunk_size=cs).compute(model, batches, loss_fn)
        for cs in (None, 2)
    ]
    for got in runs:
        for key, value in want["scalars"].items():
            assert got.scalars[key] == pytest.approx(value, rel=1e-6), key
        for name, d in want["diag"].items():
            atol = 1e-9 * float(d.abs().max())  # entries that are 0 in exact arithmetic (k_proj.bias)
            torch.testing.assert_close(got.tensors[name].reshape(-1), d, rtol=1e-6, atol=atol, msg=name)
        np.testing.assert_allclose(got.arrays["top_eigenvalues"], want["eig"][:TOP_K], rtol=1e-6)
        assert got.meta["matvecs"] <= want["G"].shape[0] + 2
    for key in want["scalars"]:
        assert runs[0].scalars[key] == pytest.approx(runs[1].scalars[key], rel=1e-12), key
    np.testing.assert_allclose(runs[0].arrays["top_eigenvalues"], runs[1].arrays["top_eigenvalues"], rtol=1e-10)
    lam = want["eig"][:TOP_K]
    q = lam / lam.sum()
    assert runs[0].scalars["top_k_effective_rank"] == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-6)
    assert runs[0].scalars["top_k_condition_number"] == pytest.approx(lam[0] / lam[-1], rel=1e-6)


METHOD_NAMES = {"linear": "linear", "vmap": "vmap(grad)", "hooks": "hooks", "auto": "hooks"}


@pytest.mark.parametrize("method", ["linear", "vmap", "hooks"])
@pytest.mark.parametrize("cache_bytes, mode", [(1 << 30, "cached"), (0, "cached"), (1 << 30, "streamed")])
def test_every_gradient_method_cached_or_recomputed_matches_oracle(method, cache_bytes, mode):
    """Several chunks: the Gram's off-diagonal blocks come from the cached chunks, or without
    the cache from chunks recomputed a block at a time; the streamed mode (nothing kept) and
    the linear factors (no Gram blocks) take Lanczos, recomputing the chunks per product."""
    case = TINY_CASES[0]
    model, batches, loss_fn = case.build(dtype=torch.float64)
    metric = FisherInformation(top_k=TOP_K, method=method, cache_bytes=cache_bytes, chunk_size=3)
    metric.use_memory_mode(mode)
    got = metric.compute(model, batches, loss_fn)
    want = _oracle(case)
    assert got.meta["per_sample_method"] == METHOD_NAMES[method]
    assert got.meta["cached"] is (cache_bytes > 0 and mode == "cached")
    gram = mode == "cached" and method != "linear"
    assert got.meta["spectrum_method"] == ("gram" if gram else "lanczos")
    assert ("gram_chunks_recomputed" in got.meta) is (gram and cache_bytes == 0)
    assert got.scalars["trace"] == pytest.approx(want["scalars"]["trace"], rel=1e-6)
    np.testing.assert_allclose(got.arrays["top_eigenvalues"], want["eig"][:TOP_K], rtol=1e-6)


class _SeqMLP(torch.nn.Module):
    """Linear layers on [B, T, d] inputs: exercises the per-layer [B, out, in] branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 4)
        self.fc2 = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _seq_loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).sum((1, 2))


@pytest.mark.parametrize("method", ["linear", "hooks"])
def test_linear_factors_on_sequence_inputs_match_oracle(method):
    torch.manual_seed(1)
    model = _SeqMLP().double()
    batches = [{"x": torch.randn(4, 5, 3, dtype=torch.float64), "y": torch.randn(4, 5, 2, dtype=torch.float64)}]
    got = FisherInformation(top_k=3, keep_diagonal=True, method=method).compute(model, batches, _seq_loss)
    assert got.meta["per_sample_method"] == method
    want = oracle_fisher(model, batches, _seq_loss)
    assert got.scalars["trace"] == pytest.approx(want["scalars"]["trace"], rel=1e-6)
    for name, d in want["diag"].items():
        torch.testing.assert_close(got.tensors[name].reshape(-1), d, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got.arrays["top_eigenvalues"], want["eig"][:3], rtol=1e-6)


def test_auto_falls_back_to_vmap_when_a_parameter_is_used_outside_its_layer():
    model, batches, loss_fn = mlp_case()

    def loss_with_extra(m, b):
        return loss_fn(m, b) + (m.head.bias**2).sum()  # bias used outside nn.Linear.forward

    # chunks of 2: the uses are checked on the first chunk only, and the later ones follow it
    got = FisherInformation(top_k=2, keep_diagonal=True, chunk_size=2).compute(model, batches, loss_with_extra)
    assert got.meta["per_sample_method"] == "hooks+vmap(grad)"
    assert got.meta["vmap_params"] == {"head.bias": "used outside its layers' forward"}
    want = oracle_fisher(model, batches, loss_with_extra)
    assert got.scalars["trace"] == pytest.approx(want["scalars"]["trace"], rel=1e-6)
    for name, d in want["diag"].items():
        torch.testing.assert_close(got.tensors[name].reshape(-1), d, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="method='linear'"):
        FisherInformation(top_k=2, method="linear").compute(model, batches, loss_with_extra)


def test_top_k_is_capped_at_the_rank(caplog):
    model, batches, loss_fn = mlp_case()  # N = 10 samples
    with caplog.at_level(logging.WARNING):
        got = FisherInformation(top_k=25).compute(model, batches, loss_fn)
    assert "capped at 10" in got.meta["top_k_capped"]
    assert "capped" in caplog.text
    assert got.arrays["top_eigenvalues"].shape == (10,)
    np.testing.assert_allclose(got.arrays["top_eigenvalues"], _oracle(TINY_CASES[0])["eig"], rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ MC Fisher
class _Classifier(torch.nn.Module):
    """HF-style: forward(x=...) returns an object with .logits [B, C]."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 5)
        self.head = torch.nn.Linear(5, c)

    def forward(self, x):
        return SimpleNamespace(logits=self.head(torch.tanh(self.body(x))))


def _classifier_case(n: int = 8):
    torch.manual_seed(3)
    model = _Classifier().double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return model, [{"x": x, "labels": torch.randint(0, 3, (n,), generator=gen)}]


def exact_classification_fisher_diag(model, batches) -> torch.Tensor:
    """(1/N) sum_i diag(J_i^T (diag(p_i) - p_i p_i^T) J_i), J_i = d logits_i / d theta, float64."""
    from torch.func import functional_call, jacrev

    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.cat([b["x"] for b in batches])

    def logits(theta, xi):
        return functional_call(model, theta, (xi[None],)).logits[0]

    rows = []
    for xi in x:
        jac = jacrev(logits)(params, xi)
        J = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], dim=1)  # [C, P]
        p = torch.softmax(logits(params, xi), -1)
        H = torch.diag(p) - torch.outer(p, p)
        rows.append(((J.T @ H) * J.T).sum(1))
    return torch.stack(rows).mean(0)


def test_mc_fisher_converges_to_the_exact_fisher():
    model, batches = _classifier_case()
    exact = exact_classification_fisher_diag(model, batches)
    mc = FisherInformation(kind="mc", top_k=None, mc_samples=400, seed=7, keep_diagonal=True, chunk_size=1600)
    got = mc.compute(model, batches)
    assert got.meta["rows"] == 8 * 400 and got.meta["seed"] == 7
    # the rows are independent given the samples: the estimate's error is within a few standard errors
    assert abs(got.scalars["trace"] - float(exact.sum())) < 4 * got.scalars["trace_stderr"]
    mc = torch.cat([t.reshape(-1) for t in got.tensors.values()])
    assert float(torch.nn.functional.cosine_similarity(mc, exact, dim=0)) > 0.99
    empirical = FisherInformation(top_k=None).compute(model, batches)
    assert abs(empirical.scalars["trace"] - float(exact.sum())) > abs(got.scalars["trace"] - float(exact.sum()))


def test_mc_fisher_is_reproducible_bit_for_bit_and_independent_of_chunking():
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64)
    runs = [FisherInformation(kind="mc", top_k=3, seed=11, chunk_size=cs).compute(model, batches) for cs in (None, None, 2)]
    assert runs[0].scalars == runs[1].scalars
    np.testing.assert_array_equal(runs[0].arrays["top_eigenvalues"], runs[1].arrays["top_eigenvalues"])
    assert runs[2].scalars["trace"] == pytest.approx(runs[0].scalars["trace"], rel=1e-12)
    other = FisherInformation(kind="mc", top_k=None, seed=12).compute(model, batches)
    assert other.scalars["trace"] != runs[0].scalars["trace"]
    assert runs[0].meta["seed"] == 11 and runs[0].meta["kind"] == "mc"


def test_mc_needs_labels_and_logits():
    model, batches, loss_fn = mlp_case()
    with pytest.raises(ValueError, match="kind='mc'"):
        FisherInformation(kind="mc").compute(model, batches, loss_fn)


# ------------------------------------------------------------------ contract and errors
def test_model_comes_back_untouched():
    model, batches = _classifier_case()
    model.train()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    FisherInformation(kind="mc", top_k=3).compute(model, batches)
    FisherInformation(top_k=3, method="vmap").compute(model, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_registered_under_its_name():
    assert METRICS["fisher"] is FisherInformation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "emp"}, "kind"),
        ({"top_k": 0}, "top_k"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"accumulate_dtype": "half"}, "accumulate_dtype"),
        ({"method": "backpack"}, "method"),
        ({"top_percent": 0}, "top_percent"),
        ({"top_percent": 101}, "top_percent"),
        ({"cache_bytes": -1}, "cache_bytes"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FisherInformation(**kwargs)


def test_bad_kind_message_lists_the_choices():
    with pytest.raises(ValueError, match=r"FisherInformation.kind must be one of \('empirical', 'mc'\); got 'emp'"):
        FisherInformation(kind="emp")


def test_one_sample_probe_raises():
    model, batches, loss_fn = mlp_case(n_batches=1, batch_size=1)
    with pytest.raises(ValueError, match="n_samples=1"):
        FisherInformation().compute(model, batches, loss_fn)


def test_nan_gradient_raises_naming_the_parameter():
    model, batches, loss_fn = mlp_case()
    with torch.no_grad():
        model.head.bias.zero_()

    def loss_nan_in_bias(m, b):  # d sqrt(|b|) / db at b = 0 is 0 * inf = nan, only in head.bias
        return loss_fn(m, b) + 0.0 * m.head.bias.abs().sqrt().sum()

    with pytest.raises(FloatingPointError, match="head.bias"):
        FisherInformation(method="vmap").compute(model, batches, loss_nan_in_bias)


# ------------------------------------------------------------------ importance
def test_top_percent_mask_and_scalars():
    diag = {"a.w": torch.tensor([[4.0, 0.0], [1.0, 3.0]]), "b.w": torch.tensor([2.0, 0.5])}
    masks = top_percent_mask(diag, 50)
    assert masks["a.w"].tolist() == [[True, False], [False, True]] and masks["b.w"].tolist() == [True, False]
    s = mask_scalars(diag, masks)
    assert s["top_percent_mass"] == pytest.approx(9.0 / 10.5)
    assert s["layers/a/top_percent_fraction"] == 0.5 and s["layers/b/top_percent_fraction"] == 0.5
    model, batches, loss_fn = mlp_case()
    got = FisherInformation(top_k=None, top_percent=10).compute(model, batches, loss_fn)
    assert 0.1 < got.scalars["top_percent_mass"] <= 1.0 and "top_eigenvalues" not in got.arrays


def test_spectrum_scalars():
    assert spectrum_scalars(np.array([4.0, 1.0])) == pytest.approx(
        {"top_k_effective_rank": float(np.exp(-(0.8 * np.log(0.8) + 0.2 * np.log(0.2)))), "top_k_condition_number": 4.0}
    )
    assert spectrum_scalars(np.array([1.0, 0.0]))["top_k_condition_number"] == float("inf")


@pytest.mark.parametrize("case", TINY_CASES, ids=str)
def test_grouped_memory_mode_gives_the_same_fisher(case):
    """Per-parameter-group accumulation (the leanest memory mode) changes memory, not numbers."""
    from uma_callbacks.linalg.fisher_products import parameter_groups

    model, batches, loss_fn = case.build(dtype=torch.float64)
    want = _oracle(case)
    metric = FisherInformation(top_k=TOP_K, keep_diagonal=True, chunk_size=2)
    assert [m for m, _ in metric.memory_modes()][-1] == "grouped"
    metric.use_memory_mode("grouped")
    got = metric.compute(model, batches, loss_fn)
    assert got.meta["memory_mode"] == "grouped" and got.meta["parameter_groups"] > 1
    for key, value in want["scalars"].items():
        assert got.scalars[key] == pytest.approx(value, rel=1e-6), key
    for name, d in want["diag"].items():
        atol = 1e-9 * float(d.abs().max())
        torch.testing.assert_close(got.tensors[name].reshape(-1), d, rtol=1e-6, atol=atol, msg=name)
    np.testing.assert_allclose(got.arrays["top_eigenvalues"], want["eig"][:TOP_K], rtol=1e-6)
    params = dict(model.named_parameters())
    groups = parameter_groups(params, 4)
    assert [n for g in groups for n in g] == list(params) and 1 < len(groups) <= 4


def test_unconverged_lanczos_spectrum_is_partial_with_its_residuals():
    from tests.cases import qwen2_case

    model, batches, loss_fn = qwen2_case(dtype=torch.float64)
    # the streamed mode (no cached rows): the spectrum comes from Lanczos, here capped at 2 products for the top 3
    metric = FisherInformation(top_k=3, max_matvecs=2, cache_bytes=0)
    metric.use_memory_mode("streamed")
    result = metric.compute(model, batches, loss_fn, chunk_size=1)
    assert result.status == "partial" and result.ok
    assert result.meta["spectrum_method"] == "lanczos"
    assert max(result.meta["lanczos_relative_residuals"]) > 1e-2 and "residual" in result.meta["partial_reason"]
    assert math.isfinite(result.scalars["trace"])  # the values are kept


def test_the_gram_path_is_planned_without_a_lanczos_basis():
    """All N eigenvalues from the Gram matrix need no Lanczos basis: the cached mode counts
    only the chunks it keeps between chunks (at most cache_bytes, none for one chunk), so a
    2 GiB budget is not refused on a 22.7M model (it was: the planner counted 40 basis
    vectors, 3.6 GB)."""
    from uma_callbacks.metrics.fisher import GRAM_MAX_ROWS, WORKSPACE_BYTES

    metric = FisherInformation(top_k=10, cache_bytes=1 << 20)
    cached = dict(metric.memory_modes())["cached"]
    n = 22_700_000
    assert cached.extra_bytes(n, 4, 16) == 0  # no basis, no diagonal (nobody asked for it)
    assert cached.kept_chunks(n, 4, 16) == 1 << 20  # the cache cap, when there are several chunks
    assert cached.kept_chunks(n, 4, GRAM_MAX_ROWS + 1) is None  # Lanczos: its rows are in extra_bytes
    assert cached.extra_bytes(n, 4, GRAM_MAX_ROWS + 1) >= 40 * n * 4  # Lanczos: the basis counts
    sizes = {"n_params": n, "n_samples": 16, "factor_bytes": 1000, "backward_sample_bytes": 0}
    P, W = 4 * n, WORKSPACE_BYTES
    # one chunk: the factors' phase, F + the per-sample gradient (over A = 100)
    assert cached.bytes_needed(P, 100, 16, one_chunk=True, **sizes) == W + 16 * (P + 1000)
    # several chunks, all kept (16 x 1000 <= 1 MiB): a chunk's own factors are among the kept ones
    assert cached.bytes_needed(P, 100, 8, **sizes) == W + 16 * 1000 + 8 * P
    # several, not all kept: the cap, and one more chunk's factors held while the next is recomputed
    big = {**sizes, "factor_bytes": 10**6}
    assert cached.bytes_needed(P, 100, 8, **big) == W + (1 << 20) + 8 * (P + 10**6 + 10**6)
    # the hooks' pass, when measured, stands for the forward/backward's bytes
    assert cached.bytes_needed(P, 100, 16, one_chunk=True, factor_peak_bytes=P + 5000, **sizes) == W + 16 * (P + 5000)


@pytest.mark.parametrize("method", ["vmap", "hooks"])
@pytest.mark.parametrize("held", [0, 1, 2])
def test_gram_blocks_past_the_cache_are_recomputed_not_left_to_lanczos(method, held):
    """Several chunks whose gradients do not all fit ``cache_bytes``: the first ``held`` chunks
    are kept, their blocks with every later chunk formed as it comes, the rest recomputed a block
    at a time; the spectrum is still the exact Gram's (before, it fell back to a Lanczos with a
    full basis: 22.3 GB on GPT-2 124M)."""
    from uma_callbacks.core.batches import split_batch
    from uma_callbacks.linalg.fisher_products import chunk_gradients
    from uma_callbacks.linalg.layer_grads import hook_plan

    case = TINY_CASES[0]
    model, batches, loss_fn = case.build(dtype=torch.float64)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    chunk = split_batch(batches[0], 2)[0]
    plan = hook_plan(model, params) if method == "hooks" else None
    one = chunk_gradients(model, loss_fn, chunk, params, None, plan=plan).nbytes()  # one chunk of 2
    got = FisherInformation(top_k=TOP_K, method=method, cache_bytes=held * one + 1, chunk_size=2).compute(
        model, batches, loss_fn
    )
    want = _oracle(case)
    n_chunks = sum(math.ceil(len(next(iter(b.values()))) / 2) for b in batches)
    assert n_chunks > held + 1
    assert got.meta["spectrum_method"] == "gram" and got.meta["cached"] is False
    assert got.meta["gram_chunks_recomputed"] > 0
    np.testing.assert_allclose(got.arrays["top_eigenvalues"], want["eig"][:TOP_K], rtol=1e-6)
    np.testing.assert_allclose(got.arrays["gram_eigenvalues"], want["eig"], rtol=1e-6, atol=1e-12 * want["eig"][0])
