"""TaskVectors: norms, TIES against hand-made and numpy oracles, merge losses and the Fisher merge
against brute force (float64), loading with safetensors, bad input, the model restored."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from tests.cases import mlp_case, qwen2_case
from tests.oracles import oracle_per_sample_grads, oracle_probe_loss
from tests.reliability.test_model_safety import Boom, CountingLoss, _assert_same, _snapshot
from uma_callbacks.metrics import METRICS, FisherInformation
from uma_callbacks.metrics.base import CheckpointState, History, MetricSkipped
from uma_callbacks.metrics.task_vectors import (
    TaskVectors,
    elected_signs,
    fisher_merge,
    ties_fractions,
    ties_merge,
    trim_masks,
)


# ---------------------------------------------------------------------- oracles
def numpy_ties(task_vectors: np.ndarray, density: float, lam: float = 1.0) -> np.ndarray:
    """Yadav et al. 2023, directly: ``task_vectors [T, P]`` -> lambda tau_m [P]."""
    t, p = task_vectors.shape
    k = p - round((1 - density) * p)  # entries kept per task
    trimmed = np.zeros_like(task_vectors)
    for i in range(t):
        top = np.argsort(-np.abs(task_vectors[i]), kind="stable")[:k]
        trimmed[i, top] = task_vectors[i, top]
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    counts = agree.sum(0)
    return lam * np.where(counts > 0, (trimmed * agree).sum(0) / np.maximum(counts, 1), 0.0)


def _perturbed(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}


def _flat(weights: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([weights[n].reshape(-1) for n in names])


def _with(model, flat: torch.Tensor):
    out = copy.deepcopy(model)
    start = 0
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(flat[start : start + p.numel()].reshape(p.shape))
            start += p.numel()
    return out


# ---------------------------------------------------------------------- norms
def test_norms_match_direct_computation_and_the_first_checkpoint_is_the_default_base():
    model, batches, loss_fn = qwen2_case()
    base = _perturbed(model, 0.05, 0)
    r = TaskVectors(base=base).compute(model, batches, loss_fn)
    params = dict(model.named_parameters())
    sq = {n: float(((params[n].detach() - base[n]) ** 2).sum()) for n in params}
    assert r.scalars["norm"] == pytest.approx(math.sqrt(sum(sq.values())), rel=1e-12)
    base_norm = math.sqrt(sum(float((b**2).sum()) for b in base.values()))
    assert r.scalars["relative_norm"] == pytest.approx(r.scalars["norm"] / base_norm, rel=1e-12)
    module = "model.layers.0.self_attn.q_proj"
    want = math.sqrt(sq[f"{module}.weight"] + sq[f"{module}.bias"])
    assert r.scalars[f"layers/{module}/norm"] == pytest.approx(want, rel=1e-12)
    live = TaskVectors().compute(model, batches, loss_fn, history=History(first=CheckpointState(0, base, "f")))
    assert live.scalars == r.scalars and live.meta["base"] == "step-0"


def test_first_checkpoint_without_base_is_skipped():
    model, batches, loss_fn = mlp_case()
    with pytest.raises(MetricSkipped, match="first checkpoint"):
        TaskVectors().compute(model, batches, loss_fn)


# ---------------------------------------------------------------------- TIES
def test_ties_on_hand_made_vectors_with_known_conflicts():
    a = torch.tensor([3.0, -2.0, 1.0, 0.1, 0.0, 5.0], dtype=torch.float64)
    b = torch.tensor([-4.0, -1.0, 2.0, 0.0, 0.2, 1.5], dtype=torch.float64)
    ma, mb = trim_masks([a], 0.5)[0], trim_masks([b], 0.5)[0]
    assert ma.tolist() == [True, True, False, False, False, True]
    assert mb.tolist() == [True, False, True, False, False, True]
    ta, tb = a * ma, b * mb
    signs = elected_signs([[ta], [tb]])
    assert signs[0].tolist() == [-1.0, -1.0, 1.0, 0.0, 0.0, 1.0]
    (merged,) = ties_merge([[a], [b]], density=0.5)
    assert merged.tolist() == [-4.0, -2.0, 2.0, 0.0, 0.0, 3.25]
    conflict, kept = ties_fractions([ta], [tb], signs)
    assert conflict == 0.5  # kept in both: entries 0 (3 vs -4, a conflict) and 5 (5 and 1.5)
    assert kept == pytest.approx(2 / 3)  # a's trimmed entries 1 and 5 survive, entry 0 is outvoted
    (scaled,) = ties_merge([[a], [b]], density=0.5, scale=0.5)
    assert torch.equal(scaled, merged * 0.5)


def test_ties_majority_sign_fills_zero_sums():
    a = torch.tensor([1.0, 2.0, 3.0, -1.0])
    b = torch.tensor([1.0, 2.0, 3.0, 1.0])
    signs = elected_signs([[a], [b]])  # entry 3 sums to 0: the majority (+) wins
    assert signs[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert ties_merge([[a], [b]], density=1.0)[0].tolist() == [1.0, 2.0, 3.0, 1.0]


@pytest.mark.parametrize("seed, tasks, density", [(0, 2, 0.2), (1, 3, 0.5), (2, 5, 0.3), (3, 2, 1.0)])
def test_ties_matches_a_direct_numpy_implementation(seed, tasks, density):
    rng = np.random.default_rng(seed)
    shapes = [(7, 5), (11,), (3, 2, 2)]
    tvs = [[torch.from_numpy(rng.standard_normal(s)) for s in shapes] for _ in range(tasks)]
    got = torch.cat([t.reshape(-1) for t in ties_merge(tvs, density, scale=0.7)]).numpy()
    flat = np.stack([torch.cat([t.reshape(-1) for t in tv]).numpy() for tv in tvs])
    np.testing.assert_allclose(got, numpy_ties(flat, density, 0.7), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- merges
def _oracle_fisher(model, batches, loss_fn) -> torch.Tensor:
    _, g = oracle_per_sample_grads(model, batches, loss_fn)
    return (g**2).mean(0)


@pytest.mark.parametrize("case", [mlp_case, qwen2_case], ids=["mlp", "qwen2"])
def test_merge_losses_match_brute_force(case):
    model, batches, loss_fn = case(dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    base, other = _perturbed(model, 0.1, 1), _perturbed(model, 0.1, 2)
    metric = TaskVectors(base=base, others={"b": other}, ties_density=0.3, ties_lambda=0.8)
    r = metric.compute(model, batches, loss_fn, chunk_size=2)
    theta = _flat(dict(model.named_parameters()), names).detach()
    th_b, th_o = _flat(base, names), _flat(other, names)
    tau, tau_o = theta - th_b, th_o - th_b
    assert r.scalars["others/b/cosine"] == pytest.approx(float(tau @ tau_o / (tau.norm() * tau_o.norm())), rel=1e-10)
    assert r.scalars["loss"] == pytest.approx(oracle_probe_loss(model, batches, loss_fn), rel=1e-9)
    other_model = _with(model, th_o)
    assert r.scalars["others/b/loss"] == pytest.approx(oracle_probe_loss(other_model, batches, loss_fn), rel=1e-9)
    avg = oracle_probe_loss(_with(model, (theta + th_o) / 2), batches, loss_fn)
    assert r.scalars["merge/b/average_loss"] == pytest.approx(avg, rel=1e-9)
    ties = th_b + torch.from_numpy(numpy_ties(torch.stack([tau, tau_o]).numpy(), 0.3, 0.8))
    assert r.scalars["merge/b/ties_loss"] == pytest.approx(oracle_probe_loss(_with(model, ties), batches, loss_fn), rel=1e-9)
    f_self, f_other = _oracle_fisher(model, batches, loss_fn), _oracle_fisher(other_model, batches, loss_fn)
    floor = 1e-6 * float(torch.cat([f_self, f_other]).mean())
    fs, fo = f_self.clamp(min=floor), f_other.clamp(min=floor)
    merged = (fs * theta + fo * th_o) / (fs + fo)
    want = oracle_probe_loss(_with(model, merged), batches, loss_fn)
    assert r.scalars["merge/b/fisher_loss"] == pytest.approx(want, rel=1e-8)
    # the TIES fractions from the numpy trim
    k = tau.numel() - round(0.7 * tau.numel())
    ta = np.zeros(tau.numel())
    tb = np.zeros(tau.numel())
    ia, ib = np.argsort(-tau.abs().numpy(), kind="stable")[:k], np.argsort(-tau_o.abs().numpy(), kind="stable")[:k]
    ta[ia], tb[ib] = tau.numpy()[ia], tau_o.numpy()[ib]
    both = (ta != 0) & (tb != 0)
    assert r.scalars["ties/b/conflict_fraction"] == pytest.approx((both & (np.sign(ta) != np.sign(tb))).sum() / both.sum())
    sign = np.sign(ta + tb)
    sign[sign == 0] = np.sign(sign.sum())
    assert r.scalars["ties/b/kept_fraction"] == pytest.approx(((ta != 0) & (np.sign(ta) == sign)).sum() / (ta != 0).sum())


class Quadratic(torch.nn.Module):
    """Per-sample loss l_i(w) = sum_j sqrt(h_j) e_ij (w_j - m_j) + 1/2 sum_j h_j (w_j - m_j)^2, e_ij = +-1
    balanced over samples: L = 1/2 sum_j h_j (w_j - m_j)^2 and F(m) = h exactly."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())


def _quadratic_task(h: torch.Tensor, m: torch.Tensor):
    p = h.numel()
    e = torch.tensor([[1.0] * p, [-1.0] * p, [1.0, -1.0] * (p // 2), [-1.0, 1.0] * (p // 2)], dtype=torch.float64)

    def loss_fn(model, batch):
        d = model.w - m
        return (h.sqrt() * batch["e"] * d).sum(-1) + 0.5 * (h * d * d).sum()

    return [{"e": e}], loss_fn


def test_fisher_merge_lands_on_the_minimiser_of_two_quadratics():
    h1 = torch.tensor([1.0, 4.0, 0.5, 2.0], dtype=torch.float64)
    h2 = torch.tensor([3.0, 1.0, 0.5, 8.0], dtype=torch.float64)
    m1 = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    m2 = torch.tensor([-1.0, 2.0, 4.0, 1.0], dtype=torch.float64)
    fishers = []
    for h, m in ((h1, m1), (h2, m2)):
        probe, loss_fn = _quadratic_task(h, m)
        r = FisherInformation(top_k=None, keep_diagonal=True, accumulate_dtype="float64").compute(Quadratic(m), probe, loss_fn)
        fishers.append(r.tensors["w"])
        torch.testing.assert_close(r.tensors["w"], h, rtol=1e-12, atol=0)
    merged = fisher_merge([m1, m2], fishers)
    minimiser = (h1 * m1 + h2 * m2) / (h1 + h2)
    torch.testing.assert_close(merged, minimiser, rtol=1e-12, atol=1e-15)
    w = merged.clone().requires_grad_(True)
    total = 0.5 * (h1 * (w - m1) ** 2).sum() + 0.5 * (h2 * (w - m2) ** 2).sum()
    (grad,) = torch.autograd.grad(total, w)
    assert float(grad.abs().max()) < 1e-12


def test_fisher_merge_without_fishers_is_the_average():
    assert fisher_merge([torch.tensor([0.0]), torch.tensor([2.0])], [None, None]).tolist() == [1.0]


# ---------------------------------------------------------------------- loading, bad input, safety
def test_others_from_safetensors_file_and_folder(tmp_path):
    from safetensors.torch import save_file

    model, batches, loss_fn = mlp_case()
    base, other = _perturbed(model, 0.1, 1), _perturbed(model, 0.1, 2)
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    want = TaskVectors(base=base, others={"o": other}).compute(model, batches, loss_fn).scalars
    by_file = TaskVectors(base=tmp_path / "base.safetensors", others={"o": tmp_path / "other.safetensors"})
    by_folder = TaskVectors(base=str(tmp_path / "base.safetensors"), others={"o": str(tmp_path / "ckpt")})
    assert by_file.compute(model, batches, loss_fn).scalars == want
    assert by_folder.compute(model, batches, loss_fn).scalars == want
    assert "base.safetensors" in by_file.config()["base"]


def test_a_base_file_rewritten_under_the_same_name_is_another_base(tmp_path):
    """The label in the config (the cache key) follows the file's content, not only its name."""
    from safetensors.torch import save_file

    model, _, _ = mlp_case()
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in _perturbed(model, 0.1, 1).items()}, str(path))
    first = TaskVectors(base=path).config()["base"]
    assert TaskVectors(base=path).config()["base"] == first
    save_file({k: v.contiguous() for k, v in _perturbed(model, 0.1, 2).items()}, str(path))
    assert TaskVectors(base=path).config()["base"] != first


@pytest.mark.parametrize("change", ["missing", "shape", "extra"])
def test_other_of_another_architecture_names_the_parameter(change):
    model, batches, loss_fn = qwen2_case()
    other = _perturbed(model, 0.1, 2)
    name = "model.layers.1.mlp.up_proj.weight"
    if change == "missing":
        del other[name]
    elif change == "shape":
        other[name] = other[name][:-1]
    else:
        name = "model.layers.2.mlp.up_proj.weight"
        other[name] = torch.zeros(3, 3)
    before = _snapshot(model)
    metric = TaskVectors(base=_perturbed(model, 0.1, 1), others={"o": other})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        metric.compute(model, batches, loss_fn)
    _assert_same(model, before)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"base": "/no/such/checkpoint"}, "base"),
        ({"base": 3}, "base"),
        ({"others": {"o": "/no/such/file.safetensors"}}, "others"),
        ({"others": {"a/b": {"w": torch.zeros(1)}}}, "others"),
        ({"others": ["x"]}, "others"),
        ({"ties_density": 0}, "ties_density"),
        ({"ties_density": 1.5}, "ties_density"),
        ({"ties_lambda": -1.0}, "ties_lambda"),
        ({"fisher_floor": -1.0}, "fisher_floor"),
        ({"n_batches": 0}, "n_batches"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TaskVectors(**kwargs)


def test_model_restored_after_a_failure_midway_and_after_success():
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    model.train()
    model.lm_head.weight.requires_grad_(False)
    base, other = _perturbed(model, 0.05, 1), _perturbed(model, 0.05, 2)
    before = _snapshot(model)
    counting = CountingLoss(loss_fn)
    r = TaskVectors(base=base, others={"o": other}).compute(model, batches, counting)
    _assert_same(model, before)
    assert math.isfinite(r.scalars["merge/o/fisher_loss"])
    for fail_at in (counting.calls // 2, counting.calls - 1):  # during the merges, and the last one
        with pytest.raises(Boom):
            TaskVectors(base=base, others={"o": other}).compute(model, batches, CountingLoss(loss_fn, fail_at=fail_at))
        _assert_same(model, before)


def test_registered():
    assert METRICS["task_vectors"] is TaskVectors and TaskVectors.needs_first


@pytest.mark.slow
def test_backfill_adds_task_vectors_and_pruning_at_every_checkpoint(tmp_path):
    """A Trainer run's folder (checkpoints at steps 3 and 6), backfilled twice: by name (the base is
    the first checkpoint, so task_vectors starts at the second) and with base= the initial model."""
    from tests.trainer_cases import run_trainer, tiny_lm, tiny_lm_dataset
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.triggers.backfill import backfill

    model = tiny_lm()
    model.save_pretrained(tmp_path / "initial")
    run_trainer(tmp_path / "run", model=model)
    data = tiny_lm_dataset(n=8, seed=1)
    probe = [{k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}]
    summary = backfill(tmp_path / "run", metrics=["task_vectors", "pruning"], probe=Probe(probe), trajectory=False,
                       output_dir=tmp_path / "by_name", draw_figures=False, progress=False, trackers=[])
    got = {(r.step, r.metric): r for r in summary.records}
    assert got[(3, "pruning")].status == "ok" and got[(6, "pruning")].status == "ok"
    assert "mask_distance_prev" in got[(6, "pruning")].scalars
    assert got[(3, "task_vectors")].status == "skipped"
    assert got[(6, "task_vectors")].status == "ok" and got[(6, "task_vectors")].scalars["norm"] > 0
    based = backfill(tmp_path / "run", metrics=[TaskVectors(base=tmp_path / "initial")], probe=Probe(probe),
                     trajectory=False, output_dir=tmp_path / "based", draw_figures=False, progress=False, trackers=[])
    norms = {r.step: r.scalars["norm"] for r in based.records if r.metric == "task_vectors" and r.status == "ok"}
    assert sorted(norms) == [3, 6] and 0 < norms[3] < norms[6]
