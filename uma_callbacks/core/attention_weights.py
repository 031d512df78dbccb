"""Where the attention of an HF transformer lives, and its per-head weight factors.

Row-vector convention throughout (as in TransformerLens): a residual-stream state is a row
x [d]; head h reads q = x W_Q^h, k = x W_K^h, v = x W_V^h (each [d_head]) and writes
z W_O^h [d] for its mixed values z [d_head]. So, per head,

- ``W_Q, W_K, W_V`` have shape [d, d_head] and ``W_O`` [d_head, d];
- QK = W_Q (W_K)^T [d, d] (attention logits x_q QK x_k^T, before scaling and rotary),
  OV = W_V W_O [d, d] (what a head writes for a source state);
- grouped-query attention (``num_key_value_heads < num_attention_heads``): query head h
  uses key/value head h // (H / H_kv), as ``repeat_kv`` does; the factors below are already
  expanded to one K and V per query head;
- biases, layer norms and rotary position embeddings are left out (weights only).

Supported layouts (found by their submodules, not by class name):

- ``"llama"``: Qwen2, Llama, Mistral (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``;
  ``nn.Linear`` weights [out, in]);
- ``"gpt2"``: GPT-2 (``c_attn`` and ``c_proj``, ``Conv1D`` weights [in, out]);
- ``"bert"``: BERT-style encoders (``query``, ``key``, ``value`` in the self-attention,
  the output projection ``dense`` in its sibling ``output``), MiniLM included.

The module :attr:`AttentionLayer.module` is the one whose forward returns
``(output, attention probabilities)`` in eager attention, so a forward hook there sees the
probabilities of one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("llama", "gpt2", "bert")


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention layer of a model.

    Attributes:
        index: the layer's position among the model's attention layers (0-based).
        name: the attention module's name in ``model.named_modules()``.
        module: the module whose eager forward returns ``(output, probabilities [B, H, T, T])``.
        layout: one of :data:`LAYOUTS`.
        n_heads: H, query heads.
        n_kv_heads: H_kv, key/value heads (H for classic multi-head attention).
        d_head: the head dimension.
        out_proj: the output projection (``o_proj``, ``c_proj`` or ``output.dense``).
    """

    index: int
    name: str
    module: torch.nn.Module
    layout: str
    n_heads: int
    n_kv_heads: int
    d_head: int
    out_proj: torch.nn.Module

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads."""
        return head // (self.n_heads // self.n_kv_heads)


@dataclass
class HeadFactors:
    """Per-head weight factors of one layer (row-vector convention, see the module docstring).

    Attributes:
        W_Q: [H, d, d_head].
        W_K: [H, d, d_head] (grouped-query heads: their key/value head's, repeated).
        W_V: [H, d, d_head] (likewise).
        W_O: [H, d_head, d].
    """

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor


def _config_int(module: torch.nn.Module, *names: str) -> int | None:
    config = getattr(module, "config", None)
    for name in names:
        for owner in (module, config):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _llama_layer(index: int, name: str, module: torch.nn.Module) -> AttentionLayer:
    d_head = _config_int(module, "head_dim")
    n_q = module.q_proj.weight.shape[0]
    n_kv = module.k_proj.weight.shape[0]
    if d_head is None:
        heads = _config_int(module, "num_heads", "num_attention_heads")
        if heads is None:
            raise ValueError(f"attention module {name!r}: cannot tell its number of heads")
        d_head = n_q // heads
    if n_q % d_head or n_kv % d_head:
        raise ValueError(f"attention module {name!r}: projections {n_q}, {n_kv} not multiples of head_dim {d_head}")
    return AttentionLayer(index, name, module, "llama", n_q // d_head, n_kv // d_head, d_head, module.o_proj)


def _gpt2_layer(index: int, name: str, module: torch.nn.Module) -> AttentionLayer:
    heads = _config_int(module, "num_heads", "n_head", "num_attention_heads")
    d_model = module.c_proj.weight.shape[1]
    if heads is None or d_model % heads:
        raise ValueError(f"attention module {name!r}: cannot tell its number of heads")
    return AttentionLayer(index, name, module, "gpt2", heads, heads, d_model // heads, module.c_proj)


def _bert_layer(index: int, name: str, module: torch.nn.Module, parent: torch.nn.Module) -> AttentionLayer:
    heads = _config_int(module, "num_attention_heads", "num_heads")
    d_head = _config_int(module, "attention_head_size", "head_dim")
    n_q = module.query.weight.shape[0]
    if d_head is None and heads is not None:
        d_head = n_q // heads
    if d_head is None or n_q % d_head:
        raise ValueError(f"attention module {name!r}: cannot tell its number of heads")
    return AttentionLayer(index, name, module, "bert", n_q // d_head, n_q // d_head, d_head, parent.output.dense)


def find_attention_layers(model: torch.nn.Module) -> list[AttentionLayer]:
    """The self-attention layers of ``model``, in module order (cross-attention left out).

    Args:
        model: an HF model (or any module holding such attention modules).

    Returns:
        One :class:`AttentionLayer` per self-attention layer; empty when none is recognised.

    Raises:
        ValueError: a recognised module whose head count cannot be read.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=30, n_positions=8))
        >>> [(a.index, a.layout, a.n_heads, a.d_head) for a in find_attention_layers(m)]
        [(0, 'gpt2', 4, 4), (1, 'gpt2', 4, 4)]
    """  # noqa: DOC502 (ValueError: from the _llama/_gpt2/_bert_layer readers)
    modules = dict(model.named_modules())
    layers: list[AttentionLayer] = []
    for name, module in modules.items():
        leaf = name.rpartition(".")[2].lower()
        if "cross" in leaf or getattr(module, "is_cross_attention", False):
            continue
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            layers.append(_llama_layer(len(layers), name, module))
        elif hasattr(module, "c_attn") and hasattr(module, "c_proj") and not hasattr(module, "q_attn"):
            layers.append(_gpt2_layer(len(layers), name, module))
        elif all(isinstance(getattr(module, a, None), torch.nn.Linear) for a in ("query", "key", "value")):
            parent = modules.get(name.rpartition(".")[0])
            if "cross" in name.lower() or parent is None or not hasattr(getattr(parent, "output", None), "dense"):
                continue
            layers.append(_bert_layer(len(layers), name, module, parent))
    return layers


def _heads_in(weight: torch.Tensor, heads: int, d_head: int) -> torch.Tensor:
    """``nn.Linear`` weight [heads * d_head, d] -> [heads, d, d_head]."""
    return weight.reshape(heads, d_head, -1).transpose(1, 2)


def head_factors(layer: AttentionLayer, dtype: torch.dtype | None = None) -> HeadFactors:
    """W_Q, W_K, W_V [H, d, d_head] and W_O [H, d_head, d] of one layer (copies, no grad).

    Args:
        layer: from :func:`find_attention_layers`.
        dtype: cast to this dtype (default: the weights').

    Returns:
        The :class:`HeadFactors`; K and V expanded to one per query head (grouped-query).
    """
    m, H, Hkv, dh = layer.module, layer.n_heads, layer.n_kv_heads, layer.d_head
    with torch.no_grad():
        if layer.layout == "llama":
            wq = _heads_in(m.q_proj.weight, H, dh)
            wk = _heads_in(m.k_proj.weight, Hkv, dh)
            wv = _heads_in(m.v_proj.weight, Hkv, dh)
            wo = m.o_proj.weight.T.reshape(H, dh, -1)
        elif layer.layout == "gpt2":
            w = m.c_attn.weight  # Conv1D [d, 3 d]: x @ w
            d = w.shape[0]
            wq, wk, wv = (w[:, i * d : (i + 1) * d].reshape(d, H, dh).permute(1, 0, 2) for i in range(3))
            wo = m.c_proj.weight.reshape(H, dh, -1)  # Conv1D [H dh, d]
        else:
            wq = _heads_in(m.query.weight, H, dh)
            wk = _heads_in(m.key.weight, Hkv, dh)
            wv = _heads_in(m.value.weight, Hkv, dh)
            wo = layer.out_proj.weight.T.reshape(H, dh, -1)
        if Hkv != H:
            index = torch.tensor([layer.kv_head(h) for h in range(H)], device=wk.device)
            wk, wv = wk.index_select(0, index), wv.index_select(0, index)
        out = [t.detach().to(dtype=dtype or t.dtype).clone() for t in (wq, wk, wv, wo)]
    return HeadFactors(*out)


def embedding_matrices(model: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The token embedding W_E [V, d] and unembedding W_U [d, V] (detached views, no copy).

    W_U is the output embedding's weight transposed; a model without one (an encoder
    without a language-model head) gets W_E^T, as if tied, and ``tied_fallback`` says so.

    Args:
        model: an HF model with ``get_input_embeddings``.
        dtype: cast to this dtype (a copy) when given.

    Returns:
        ``(W_E, W_U, tied_fallback)``.

    Raises:
        ValueError: no input embedding, or an output embedding of another width.
    """
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None or not hasattr(emb, "weight"):
        raise ValueError(f"{type(model).__name__} has no input embedding (get_input_embeddings)")
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    w_e = emb.weight.detach()
    fallback = out is None or not hasattr(out, "weight")
    w_u = w_e.T if fallback else out.weight.detach().T
    if w_u.shape[0] != w_e.shape[1]:
        raise ValueError(f"unembedding of width {w_u.shape[0]} does not match the embedding width {w_e.shape[1]}")
    if dtype is not None:
        w_e, w_u = w_e.to(dtype), w_u.to(dtype)
    return w_e, w_u, fallback


def is_causal(model: torch.nn.Module, layers: list[AttentionLayer]) -> bool:
    """Whether the model's self-attention is causal (decoders) rather than bidirectional (encoders)."""
    if layers and layers[0].layout == "bert":
        config = getattr(model, "config", None)
        return bool(getattr(config, "is_decoder", False))
    return True


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (``None``: unknown)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
