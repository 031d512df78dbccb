"""GradientFlow against a float64 brute force (one backward per sample)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.cases import TINY_CASES
from tests.oracles import oracle_per_sample_grads, param_slices
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.metrics.base import module_of


def oracle_gradient_flow(model, batches, loss_fn) -> dict[str, float]:
    names, G = oracle_per_sample_grads(model, batches, loss_fn)
    n = G.shape[0]
    mean = G.mean(0)
    slices = param_slices(model)
    out = {}
    m2s, vs = {}, {}
    for name in names:
        g = G[:, slices[name]]
        mu = g.mean(0)
        m2 = mu.pow(2).sum().item()
        v = (g - mu).pow(2).sum().item() / (n - 1)
        m2s[name], vs[name] = m2, v
        out[f"params/{name}/norm"] = math.sqrt(m2)
        out[f"params/{name}/snr"] = _ratio(m2, v)
    modules = {}
    for name in names:
        modules.setdefault(module_of(name), []).append(name)
    for mod, members in modules.items():
        out[f"layers/{mod}/norm"] = math.sqrt(sum(m2s[p] for p in members))
        out[f"layers/{mod}/snr"] = _ratio(sum(m2s[p] for p in members), sum(vs[p] for p in members))
    out["total_norm"] = mean.norm().item()
    out["noise_scale"] = (G - mean).pow(2).sum().item() / (n - 1) / mean.pow(2).sum().item()
    return out


def _ratio(a: float, b: float) -> float:
    """a / b, with a layer the loss does not use (0 / 0) as NaN."""
    return a / b if b else (float("nan") if a == 0 else float("inf"))


@pytest.mark.parametrize("case", TINY_CASES, ids=str)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradient_flow_matches_oracle(case, chunk_size):
    model, batches, loss_fn = case.build(dtype=torch.float64)
    got = GradientFlow(chunk_size=chunk_size).compute(model, batches, loss_fn)
    want = oracle_gradient_flow(model, batches, loss_fn)
    assert len(want) > 8
    for key, value in want.items():
        assert got.scalars[key] == pytest.approx(value, rel=1e-6), key


def test_gradient_flow_has_every_named_scalar():
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64)
    r = GradientFlow().compute(model, batches, loss_fn)
    for key in ("total_norm", "noise_scale", "n_vanishing_layers", "n_exploding_layers"):
        assert key in r.scalars
    assert "params/model.layers.0.mlp.up_proj.weight/norm" in r.scalars
    assert "params/model.layers.0.self_attn.q_proj.bias/snr" in r.scalars
    assert "layers/model.layers.0.mlp.up_proj/norm" in r.scalars
    assert "layers/model.layers.1.self_attn.o_proj/vanishing" in r.scalars
    assert r.meta["attn_implementation"] == "sdpa -> eager"
    assert model.config._attn_implementation == "sdpa"


def test_vanishing_and_exploding_flags_against_median():
    model, batches, loss_fn = TINY_CASES[0].build(dtype=torch.float64)
    with torch.no_grad():
        model.fc1.weight.mul_(1e4)  # saturate tanh after fc1: its gradient vanishes, the others do not
    r = GradientFlow(vanishing_ratio=1e-2).compute(model, batches, loss_fn)
    assert r.scalars["layers/fc1/vanishing"] == 1.0
    assert r.scalars["layers/head/vanishing"] == 0.0
    assert r.scalars["n_vanishing_layers"] >= 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vanishing_ratio": 0}, "vanishing_ratio"),
        ({"exploding_ratio": -1}, "exploding_ratio"),
        ({"vanishing_ratio": 10, "exploding_ratio": 5}, "vanishing_ratio"),
        ({"accumulate_dtype": "half"}, "accumulate_dtype"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GradientFlow(**kwargs)


def test_bert_with_padding_masks_matches_oracle():
    """Encoder masks: transformers' "no padding" shortcut branches on data, which vmap refuses;
    the per-sample code has it build the (exact) mask instead."""
    from tests.cases import bert_case

    model, batches, loss_fn = bert_case()
    got = GradientFlow(chunk_size=2).compute(model, batches, loss_fn)
    want = oracle_gradient_flow(model, batches, loss_fn)
    # the key bias shifts every score of a query equally, so softmax ignores it: its gradient is
    # zero up to rounding (~1e-17) and its snr a ratio of rounding errors; compare its norm only
    rounding = [k for k in want if k.endswith("/norm") and want[k] < 1e-12]
    assert rounding == ["params/bert.encoder.layer.0.attention.self.key.bias/norm"]
    for key, value in want.items():
        if key.endswith("key.bias/snr"):
            continue
        assert got.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-14), key
    from transformers import masking_utils

    assert masking_utils._ignore_bidirectional_mask_sdpa(None, 4) is True  # restored afterwards
