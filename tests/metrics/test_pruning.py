"""LotteryTickets: masks and pruned losses against weights zeroed by hand (float64), mask distance,
early-bird detection from history, bad input, the model restored also after a failure midway."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.cases import mlp_case, qwen2_case
from tests.reliability.test_model_safety import Boom, CountingLoss, _assert_same, _snapshot
from uma_callbacks.metrics import METRICS
from uma_callbacks.metrics.base import CheckpointState, History
from uma_callbacks.metrics.pruning import (
    LotteryTickets,
    early_bird_found,
    magnitude_masks,
    mask_distance,
    prunable_names,
)


def _oracle_keep(weights: list[np.ndarray], s: float) -> np.ndarray:
    """Flat keep mask: prune the round(s n) smallest |w| (stable sort: ties by position)."""
    flat = np.concatenate([np.abs(w).reshape(-1) for w in weights])
    k = round(s * flat.size)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep


def _oracle_loss(model, batches, loss_fn, s: float) -> float:
    model = copy.deepcopy(model)
    names = prunable_names(model)
    params = dict(model.named_parameters())
    keep = _oracle_keep([params[n].detach().numpy() for n in names], s)
    start = 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            m = torch.from_numpy(keep[start : start + p.numel()].reshape(p.shape))
            p[~m] = 0.0  # zeroed by hand
            start += p.numel()
        return float(torch.cat([loss_fn(model, b) for b in batches]).mean())


@pytest.mark.parametrize("case", [qwen2_case, mlp_case], ids=["qwen2", "mlp"])
def test_pruned_losses_match_weights_zeroed_by_hand(case):
    model, batches, loss_fn = case(dtype=torch.float64)
    r = LotteryTickets(sparsities=[0.9, 0.3, 0.6], chunk_size=2).compute(model, batches, loss_fn)
    with torch.no_grad():
        dense = float(torch.cat([loss_fn(model, b) for b in batches]).mean())
    assert r.scalars["dense_loss"] == pytest.approx(dense, rel=1e-12)
    assert r.arrays["sparsities"].tolist() == [0.3, 0.6, 0.9]
    for j, s in enumerate([0.3, 0.6, 0.9]):
        want = _oracle_loss(model, batches, loss_fn, s)
        assert r.scalars[f"sparsity/{s:g}/loss"] == pytest.approx(want, rel=1e-10)
        assert r.scalars[f"sparsity/{s:g}/loss_ratio"] == pytest.approx(want / dense, rel=1e-10)
        assert r.arrays["losses"][j] == pytest.approx(want, rel=1e-10)


def test_weight_matrices_leave_out_embeddings_norms_and_biases():
    model, _, _ = qwen2_case()
    names = prunable_names(model)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names
    assert all(not n.endswith("bias") and "norm" not in n for n in names)
    assert "model.layers.0.mlp.up_proj.weight" in names


def test_masks_with_ties_break_by_position():
    w = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, -3.0]])]
    (keep,) = magnitude_masks(w, [0.5])
    # 6 entries, prune 3: the three zeros (all tied) go before anything else
    assert keep[0].tolist() == [[True, False], [False, True]] and keep[1].tolist() == [[False, True]]
    (keep,) = magnitude_masks(w, [1 / 3])  # prune 2 of the 3 tied zeros: the first two by position
    assert keep[0].tolist() == [[True, False], [False, True]] and keep[1].tolist() == [[True, True]]


def test_masks_match_the_oracle_on_random_weights():
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)]
    for s, masks in zip([0.25, 0.5, 0.8], magnitude_masks(w, [0.25, 0.5, 0.8])):
        got = torch.cat([m.reshape(-1) for m in masks]).numpy()
        assert np.array_equal(got, _oracle_keep([t.numpy() for t in w], s))


def _perturbed(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}


def test_mask_distance_to_the_previous_checkpoint_by_direct_comparison():
    model, batches, loss_fn = qwen2_case()
    prev = _perturbed(model, 0.02, 1)
    r = LotteryTickets(sparsities=[0.5, 0.8], main_sparsity=0.8).compute(
        model, batches, loss_fn, history=History(previous=(CheckpointState(10, prev, "p"),))
    )
    names = prunable_names(model)
    params = dict(model.named_parameters())
    now = _oracle_keep([params[n].detach().numpy() for n in names], 0.8)
    before = _oracle_keep([prev[n].numpy() for n in names], 0.8)
    want = float((now != before).mean())
    assert want > 0
    assert r.scalars["mask_distance_prev"] == pytest.approx(want, rel=1e-12)
    assert "early_bird_step" not in r.scalars
    assert mask_distance([torch.tensor(now)], [torch.tensor(before)]) == pytest.approx(want, rel=1e-12)


def test_no_history_gives_losses_without_distance():
    model, batches, loss_fn = qwen2_case()
    r = LotteryTickets().compute(model, batches, loss_fn)
    assert "mask_distance_prev" not in r.scalars and "early_bird_step" not in r.scalars
    assert set(r.scalars) >= {"sparsity/0.5/loss", "sparsity/0.8/loss", "sparsity/0.9/loss", "dense_loss"}


def test_early_bird_rule():
    assert early_bird_found([0.05], 0.1, 1)
    assert not early_bird_found([0.05, 0.05], 0.1, 1)
    assert early_bird_found([0.2, 0.05], 0.1, 1)
    assert early_bird_found([0.05, 0.05], 0.1, 2)  # too few earlier distances to have held before
    assert not early_bird_found([0.05, 0.05, 0.05], 0.1, 2)
    assert early_bird_found([0.3, 0.05, 0.05], 0.1, 2)
    assert not early_bird_found([0.3, 0.2, 0.05], 0.1, 2)


def test_early_bird_step_found_once_over_a_run():
    """Checkpoints whose weights drift less and less: the mask settles; the step appears once."""
    model, batches, loss_fn = mlp_case()
    gen = torch.Generator().manual_seed(0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales = [1.0, 1.0, 0.3, 0.0, 0.0, 0.0, 0.0]  # the change from checkpoint t-1 to t
    states, current = [], dict(base)
    metric = LotteryTickets(sparsities=[0.5], eb_threshold=0.1, eb_patience=2)
    assert metric.history_needed == 3
    found = []
    for t, scale in enumerate(scales):
        current = {n: w + scale * torch.randn(w.shape, generator=gen, dtype=w.dtype) for n, w in current.items()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(current[n])
        history = History(previous=tuple(reversed(states[-metric.history_needed :])))
        r = metric.compute(model, batches, loss_fn, history=history)
        if "early_bird_step" in r.scalars:
            found.append((t * 100, r.scalars["early_bird_step"]))
        states.append(CheckpointState(t * 100, dict(current), f"fp{t}"))
    # d[i]: between checkpoints i and i + 1; checkpoint t sees d[t-3 .. t-1] (3 earlier checkpoints)
    names = prunable_names(model)
    keeps = [_oracle_keep([s.weights[n].numpy() for n in names], 0.5) for s in states]
    d = [float((keeps[i] != keeps[i - 1]).mean()) for i in range(1, len(keeps))]
    want = [
        (t * 100, float((t - 2) * 100))
        for t in range(1, len(scales))
        if early_bird_found(d[: t][-3:], 0.1, 2)
    ]
    assert found == want and len(found) == 1


def test_host_copy_mode_gives_the_same_numbers():
    model, batches, loss_fn = qwen2_case()
    a = LotteryTickets().compute(model, batches, loss_fn)
    metric = LotteryTickets()
    metric.use_memory_mode("host")
    b = metric.compute(model, batches, loss_fn)
    assert a.scalars == b.scalars and b.meta["memory_mode"] == "host"


@pytest.mark.parametrize("mode", ["device", "host"])
def test_model_restored_after_a_failure_midway(mode):
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    model.train()
    before = _snapshot(model)
    metric = LotteryTickets()
    metric.use_memory_mode(mode)
    with pytest.raises(Boom):
        metric.compute(model, batches, CountingLoss(loss_fn, fail_at=4), chunk_size=3)  # inside the 2nd sparsity
    _assert_same(model, before)


def test_history_without_a_weight_names_it():
    model, batches, loss_fn = qwen2_case()
    prev = _perturbed(model, 0.01, 0)
    del prev["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight"):
        LotteryTickets().compute(model, batches, loss_fn, history=History(previous=(CheckpointState(1, prev),)))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsities": [0.0]}, "sparsities"),
        ({"sparsities": [1.0]}, "sparsities"),
        ({"sparsities": [0.5, 1.2]}, "sparsities"),
        ({"sparsities": [-0.1]}, "sparsities"),
        ({"sparsities": []}, "sparsities"),
        ({"sparsities": "0.5"}, "sparsities"),
        ({"sparsities": [0.5, 0.5]}, "sparsities"),
        ({"main_sparsity": 1.0}, "main_sparsity"),
        ({"eb_threshold": 0}, "eb_threshold"),
        ({"eb_patience": 0}, "eb_patience"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LotteryTickets(**kwargs)


def test_registered():
    assert METRICS["pruning"] is LotteryTickets


@pytest.mark.slow
def test_trainer_run_finds_the_early_bird_step_once(tmp_path):
    """A tiny Qwen2 trained 12 steps, checkpoints every 2: the mask at 50% sparsity moves by less
    than eb_threshold = 0.5 between checkpoints, so the early bird is found at the third
    checkpoint (step 6), dated to the first (step 2), and logged there only."""
    from tests.trainer_cases import run_trainer, tiny_lm_dataset
    from uma_callbacks import UMACallback

    cb = UMACallback(
        metrics=[LotteryTickets(sparsities=[0.5, 0.9], eb_threshold=0.5, eb_patience=2)],
        probe=tiny_lm_dataset(n=8, seed=1), probe_size=8, draw_figures=False, trackers=[],
    )
    run_trainer(tmp_path / "run", callbacks=[cb], max_steps=12, save_steps=2)
    records = [r for r in cb.records if r.metric == "pruning"]
    assert [r.step for r in records] == [2, 4, 6, 8, 10, 12] and all(r.status == "ok" for r in records)
    assert "mask_distance_prev" not in records[0].scalars
    assert all(0 <= r.scalars["mask_distance_prev"] < 0.5 for r in records[1:])
    found = [(r.step, r.scalars["early_bird_step"]) for r in records if "early_bird_step" in r.scalars]
    assert found == [(6, 2.0)]
    assert all(r.scalars["sparsity/0.9/loss_ratio"] > 0 for r in records)
