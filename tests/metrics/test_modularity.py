"""Modularity: Newman's Q against networkx, planted blocks recovered, shuffled baseline, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cases import qwen2_case
from uma_callbacks.metrics import METRICS
from uma_callbacks.metrics.modularity import (
    MLPBlock,
    Modularity,
    bipartite_adjacency,
    bipartite_modularity_q,
    kmeans,
    mlp_blocks,
    modularity_q,
    spectral_coclusters,
)


def _nx_q(adjacency: np.ndarray, labels: np.ndarray) -> float:
    nx = pytest.importorskip("networkx")
    graph = nx.from_numpy_array(adjacency)
    communities = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    return nx.community.modularity(graph, communities, weight="weight")


def test_q_matches_networkx_on_a_random_weighted_graph():
    rng = np.random.default_rng(0)
    a = rng.random((30, 30)) * (rng.random((30, 30)) < 0.3)
    a = np.triu(a, 1)
    a = a + a.T
    labels = rng.integers(0, 4, 30)
    assert modularity_q(a, labels) == pytest.approx(_nx_q(a, labels), abs=1e-9)


def test_bipartite_q_matches_networkx_and_the_full_graph():
    rng = np.random.default_rng(1)
    b = rng.random((12, 20))
    rows, cols = rng.integers(0, 3, 12), rng.integers(0, 3, 20)
    full = bipartite_adjacency(b).toarray()
    labels = np.concatenate([rows, cols])
    want = _nx_q(full, labels)
    assert bipartite_modularity_q(b, rows, cols) == pytest.approx(want, abs=1e-9)
    assert modularity_q(full, labels) == pytest.approx(want, abs=1e-9)


def test_spectral_partition_q_matches_networkx_for_a_qwen2_mlp():
    model, _, _ = qwen2_case()
    block = mlp_blocks(model)["model.layers.0.mlp"]
    b = block.biadjacency()
    rows, cols = spectral_coclusters(b, 3, seed=0)
    result = Modularity(n_clusters=3, shuffle_baseline=False, seed=0).block_q(block, 0)
    assert result["q"] == pytest.approx(_nx_q(bipartite_adjacency(b).toarray(), np.concatenate([rows, cols])), abs=1e-9)


def _planted(d: int, hidden: int, k: int, seed: int = 0) -> MLPBlock:
    """A block-diagonal MLP: k disjoint groups of inputs -> hidden units -> outputs."""
    gen = torch.Generator().manual_seed(seed)
    up = torch.block_diag(*[torch.rand(hidden // k, d // k, generator=gen, dtype=torch.float64) + 0.5 for _ in range(k)])
    down = torch.block_diag(*[torch.rand(d // k, hidden // k, generator=gen, dtype=torch.float64) + 0.5 for _ in range(k)])
    return MLPBlock([up], down)


@pytest.mark.parametrize("k", [2, 4])
def test_spectral_partition_recovers_planted_blocks(k):
    d, hidden = 32, 128
    b = _planted(d, hidden, k).biadjacency()
    rows, cols = spectral_coclusters(b, k, seed=0)
    true_rows = np.concatenate([np.arange(d) // (d // k), np.arange(d) // (d // k)])
    true_cols = np.arange(hidden) // (hidden // k)
    # the same partition up to relabelling: a one-to-one map between found and planted labels
    pairs = set(zip(np.concatenate([rows, cols]).tolist(), np.concatenate([true_rows, true_cols]).tolist()))
    assert len(pairs) == k and len({p[0] for p in pairs}) == k
    q = bipartite_modularity_q(b, rows, cols)
    assert q == pytest.approx(bipartite_modularity_q(b, true_rows, true_cols), abs=1e-12)
    assert q > (1 - 1 / k) - 1e-3  # the maximum for k equal disjoint blocks is 1 - 1/k


def test_metric_on_planted_blocks_and_shuffled_baseline_near_zero():
    block = _planted(64, 256, 2)
    mlp = torch.nn.Module()
    mlp.up_proj = torch.nn.Linear(64, 256, bias=False).double()
    mlp.down_proj = torch.nn.Linear(256, 64, bias=False).double()
    with torch.no_grad():
        mlp.up_proj.weight.copy_(block.inputs[0])
        mlp.down_proj.weight.copy_(block.output)
    model = torch.nn.Module()
    model.mlp = mlp
    r = Modularity(n_clusters=2).compute(model, [{"x": torch.zeros(1, 1)}], lambda m, b: b["x"].sum(-1))
    assert r.scalars["layers/mlp/q"] > 0.499
    assert abs(r.scalars["layers/mlp/q_shuffled"]) < 0.1
    assert r.scalars["mean_q"] == r.scalars["layers/mlp/q"]


def test_blocks_of_qwen2_gpt2_and_bert():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    model, _, _ = qwen2_case()
    blocks = mlp_blocks(model)
    assert list(blocks) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert len(blocks["model.layers.0.mlp"].inputs) == 2  # gate and up
    assert blocks["model.layers.0.mlp"].biadjacency().shape == (16 + 16, 24)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=10, n_positions=8))
    g = mlp_blocks(gpt2)
    assert list(g) == ["transformer.h.0.mlp"] and g["transformer.h.0.mlp"].biadjacency().shape == (16, 32)
    bert = BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12))
    assert [(k, v.biadjacency().shape) for k, v in mlp_blocks(bert).items()] == [("encoder.layer.0.intermediate", (16, 12))]


def test_deterministic_and_model_untouched():
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = Modularity(n_clusters=2, seed=3).compute(model, batches, loss_fn)
    b = Modularity(n_clusters=2, seed=3).compute(model, batches, loss_fn)
    assert a.scalars == b.scalars
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_kmeans_separates_clear_groups():
    pts = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0], [-10.0, 5.0], [-10.0, 5.1]])
    labels = kmeans(pts, 3, seed=0)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == labels[5]
    assert len(set(labels.tolist())) == 3


@pytest.mark.parametrize("kwargs, field", [({"n_clusters": 1}, "n_clusters"), ({"n_clusters": 2.5}, "n_clusters"),
                                            ({"seed": -1}, "seed"), ({"n_init": 0}, "n_init")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Modularity(**kwargs)


def test_too_many_clusters_or_no_mlp_is_a_clear_error():
    model, batches, loss_fn = qwen2_case()
    with pytest.raises(ValueError, match="n_clusters"):
        Modularity(n_clusters=40).compute(model, batches, loss_fn)
    with pytest.raises(ValueError, match="no MLP blocks"):
        Modularity().compute(torch.nn.Linear(2, 2), [{"x": torch.zeros(1, 2)}], lambda m, b: m(b["x"]).sum(-1))


def test_registered():
    assert METRICS["modularity"] is Modularity
