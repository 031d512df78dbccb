"""Circuits: factored OV copying and composition scores against dense d x d and V x V products (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cases import tiny_qwen2
from uma_callbacks.core.attention_weights import embedding_matrices, find_attention_layers, head_factors
from uma_callbacks.metrics import METRICS, Circuits


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=4, vocab_size=30, n_positions=16)).double()


def bert_model():
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    return BertModel(config).double()


def qwen2_gqa():
    """3 layers, 4 query heads over 2 key/value heads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=24, hidden_size=16, intermediate_size=8, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).double()


MODELS = {"qwen2_gqa": qwen2_gqa, "qwen2_tiny": tiny_qwen2, "gpt2": gpt2_model, "bert": bert_model}
PROBE = [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}]


def dense_circuits(model):
    """OV, QK per head as dense [d, d] matrices; ov_copying from the eigenvalues of W_E OV W_U [V, V]."""
    w_e, w_u, _ = embedding_matrices(model)
    ovs, qks, copying = [], [], []
    for layer in find_attention_layers(model):
        f = head_factors(layer)
        for h in range(layer.n_heads):
            ov = f.W_V[h] @ f.W_O[h]
            ovs.append(ov)
            qks.append(f.W_Q[h] @ f.W_K[h].T)
            eig = torch.linalg.eigvals(w_e @ ov @ w_u)
            copying.append(float(eig.real.sum() / eig.abs().sum()))
    return ovs, qks, np.array(copying)


def dense_composition(ovs, qks, n_heads):
    n = len(ovs)
    out = {m: np.zeros((n, n)) for m in "qkv"}
    for i in range(n):
        for j in range(n):
            if i // n_heads >= j // n_heads:
                continue
            for mode, m2 in (("q", qks[j]), ("k", qks[j].T), ("v", ovs[j])):
                out[mode][i, j] = float(torch.linalg.norm(ovs[i] @ m2) / (torch.linalg.norm(ovs[i]) * torch.linalg.norm(m2)))
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_factored_scores_match_dense_products(name):
    model = MODELS[name]()
    result = Circuits().compute(model, PROBE)
    layers = find_attention_layers(model)
    n_heads = layers[0].n_heads
    ovs, qks, copying = dense_circuits(model)
    np.testing.assert_allclose(result.arrays["ov_copying"].ravel(), copying, rtol=1e-6, atol=1e-12)
    dense = dense_composition(ovs, qks, n_heads)
    for mode in "qkv":
        got = result.arrays[f"{mode}_composition"]
        assert got.shape == (len(ovs), len(ovs))
        np.testing.assert_allclose(got, dense[mode], rtol=1e-6, atol=1e-12)
        later = dense[mode][dense[mode] > 0]
        assert result.scalars[f"max_{mode}_composition"] == pytest.approx(later.max(), rel=1e-6)
    assert result.scalars["mean_ov_copying"] == pytest.approx(copying.mean(), rel=1e-6)
    assert result.meta["work_dtype"] == "torch.float64"


def test_factored_ov_eigenvalues_are_the_dense_nonzero_eigenvalues():
    model = qwen2_gqa()
    w_e, w_u, _ = embedding_matrices(model)
    f = head_factors(find_attention_layers(model)[1])
    for h in range(f.W_V.shape[0]):
        small = torch.linalg.eigvals(f.W_O[h] @ (w_u @ w_e) @ f.W_V[h])
        dense = torch.linalg.eigvals(w_e @ f.W_V[h] @ f.W_O[h] @ w_u)
        dense = dense[dense.abs() > 1e-9 * dense.abs().max()]
        key = lambda z: (round(z.real, 8), round(z.imag, 8))
        assert sorted(map(key, small.tolist())) == sorted(map(key, dense.tolist()))


def test_identity_ov_copies_fully():
    """A head whose OV maps every embedding onto its own unembedding direction has copying 1."""
    model = gpt2_model()
    layer = find_attention_layers(model)[0]
    with torch.no_grad():
        model.lm_head.weight.copy_(model.transformer.wte.weight)  # tied: W_U = W_E^T
        d = layer.d_head
        w = model.transformer.h[0].attn.c_attn.weight
        w[:, 32:48].zero_()
        w[:d, 32 : 32 + d] = torch.eye(d, dtype=w.dtype)  # head 0: W_V = [I; 0]
        model.transformer.h[0].attn.c_proj.weight[:d].zero_()
        model.transformer.h[0].attn.c_proj.weight[:d, :d] = torch.eye(d, dtype=w.dtype)  # W_O = [I, 0]
    result = Circuits().compute(model, PROBE)
    assert result.arrays["ov_copying"][0, 0] == pytest.approx(1.0, rel=1e-9)


def test_registered_and_weights_only():
    assert METRICS["circuits"] is Circuits
    model = qwen2_gqa()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    one = Circuits().compute(model, PROBE)
    two = Circuits().compute(model, [{"input_ids": torch.ones(3, 5, dtype=torch.long)}])
    for key in one.arrays:
        np.testing.assert_array_equal(one.arrays[key], two.arrays[key])
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_float32_model_close_to_float64():
    model = qwen2_gqa()
    r64 = Circuits().compute(model, PROBE)
    r32 = Circuits().compute(model.float(), PROBE)
    assert r32.meta["work_dtype"] == "torch.float32"
    for key in r64.arrays:
        np.testing.assert_allclose(r32.arrays[key], r64.arrays[key], rtol=1e-3, atol=1e-4)
