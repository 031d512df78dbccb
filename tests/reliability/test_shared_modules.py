"""Issue 17 item 1: shared modules / Parameters / tied embeddings come back as the very same Parameters.

``torch.func.functional_call`` (torch 2.13) leaves a module reachable under two names
holding the detached plain tensors it was given; the optimizer would then update orphans.
:func:`uma_callbacks.core.model_state.preserved_model_state` puts every module's entries
back by identity.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer_cases import run_trainer
from uma_callbacks import UMACallback
from uma_callbacks.metrics import METRICS

SMALL = {"gradient_flow": {}, "fisher": {"top_k": 2}}


def _shared_mlp(second_holder: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    blk = torch.nn.Linear(6, 6)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), blk, torch.nn.Tanh(), blk, torch.nn.Linear(6, 2))
    model[4].weight = torch.nn.Parameter(torch.randn(2, 6))
    if second_holder:
        other = torch.nn.Linear(6, 6)
        other.weight = blk.weight  # one Parameter held by a second module
        model.append(other)  # registered, not used in forward
    return model


def _mlp_loss(model, batch):
    out = model[4](model[3](model[2](model[1](model[0](batch["x"])))))
    return ((out - batch["y"]) ** 2).sum(-1)


def _tied_lm() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        use_cache=False,  # the repeated layer keeps one layer_idx: a KV cache would see it twice
    )
    model = Qwen2ForCausalLM(config)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.layers[1] = model.model.layers[0]  # the same decoder layer twice in one forward
    return model


def _identity(model):
    return [
        (mname, pname, id(p), type(p), p.detach().clone())
        for mname, m in model.named_modules(remove_duplicate=False)
        for pname, p in list(m._parameters.items()) + list(m._buffers.items())
        if p is not None
    ]


def _assert_same_objects(model, before):
    after = _identity(model)
    assert [(a[0], a[1], a[2], a[3]) for a in after] == [(b[0], b[1], b[2], b[3]) for b in before]
    for a, b in zip(after, before):
        assert torch.equal(a[4], b[4]), f"{a[0]}.{a[1]} changed"
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


@pytest.mark.parametrize("second_holder", [False, True])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_shared_module_and_parameter_come_back_identical(name, second_holder):
    model = _shared_mlp(second_holder)
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(5, 3, generator=gen), "y": torch.randn(5, 2, generator=gen)}]
    before = _identity(model)
    result = METRICS[name](**SMALL[name]).compute(model, batches, loss_fn=_mlp_loss)
    assert result.status == "ok"
    _assert_same_objects(model, before)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_tied_embeddings_and_repeated_layer_come_back_identical(name):
    model = _tied_lm()
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = _identity(model)
    result = METRICS[name](**SMALL[name]).compute(model, [batch])
    assert result.status == "ok", result.error
    _assert_same_objects(model, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
def test_trainer_with_shared_modules_trains_as_without_the_callback(tmp_path):
    # HF refuses to save a model whose layers are shared: measure between saves instead
    _, plain = run_trainer(tmp_path / "plain", model=_tied_lm(), max_steps=6, save_strategy="no")
    cb = UMACallback(
        metrics=["gradient_flow", METRICS["fisher"](top_k=2)], probe_size=4, trackers=[], draw_figures=False, every_n_steps=3
    )
    trainer, measured = run_trainer(tmp_path / "uma", callbacks=[cb], model=_tied_lm(), max_steps=6, save_strategy="no")
    assert [r.status for r in cb.records] == ["ok"] * 4, [r.error for r in cb.records]
    assert measured == plain  # bit for bit: the optimizer kept updating the model's own Parameters
    assert all(isinstance(p, torch.nn.Parameter) for p in trainer.model.parameters())
