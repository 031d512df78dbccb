"""Attention heads: entropy, previous-token, first-token and induction scores per head."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import numpy as np
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.core.attention_weights import (
    AttentionLayer,
    find_attention_layers,
    is_causal,
    max_positions,
)
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult
from uma_callbacks.metrics.time_cost import UnitCosts

#: induction_len when none is given (TransformerLens's demos use 50), shortened to fit the model.
DEFAULT_INDUCTION_LEN = 50
#: the keys of a probe batch passed to the model's forward.
FORWARD_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
#: the score arrays, in order, each [L, H].
PROBE_SCORES = ("entropy", "prev_token", "bos")


class AttentionHeads(Metric):
    r"""Per-head attention statistics on the probe, and induction heads (Olsson et al. 2022).

    Attention probabilities A^{l,h}[t, s] (query t, key s) come from eager attention: a
    forward hook on each attention module reads them one layer at a time, for one chunk of
    the probe at a time, so at most one [B_chunk, H, T, T] tensor exists at once (no
    ``output_attentions``, which would hold every layer's). Only non-padding queries count.
    For a query t, K_t = the keys it may attend (non-padding, and s <= t in causal models),
    f = the sequence's first non-padding position. Per head, over the probe:

    - ``entropy`` = mean over queries with |K_t| >= 2 of
      -sum_s A[t, s] log A[t, s] / log |K_t|  (1 = uniform over the allowed keys);
    - ``prev_token`` = mean over queries t with t - 1 non-padding of A[t, t - 1];
    - ``bos`` = mean over queries t != f of A[t, f]  (the first-token "attention sink").

    Induction (causal models only), as TransformerLens computes it: ``n_induction_seqs``
    sequences of ``induction_len`` = n tokens drawn uniformly (special tokens excluded, from
    a generator seeded with ``seed``), repeated twice, after the model's BOS token when its
    config has one (p = 1, else p = 0): length S = p + 2n. ``induction`` = mean over the
    second copy's queries i in [p + n, p + 2n) of A[i, i - n + 1] (the token after the
    query's earlier occurrence). ``icl_loss_drop`` = mean next-token loss (nats) on the
    first copy's tokens 1..n-1 minus on the second copy's tokens 1..n-1 (causal LMs with
    ``logits``); ``icl_loss_first`` and ``icl_loss_second`` are both parts.

    Scalars: ``mean_entropy`` (mean over heads), ``bos_fraction`` (mean ``bos`` over heads:
    the share of attention that goes to the first token), ``n_prev_token_heads`` and
    ``n_induction_heads`` (heads whose score exceeds ``head_threshold``), ``max_induction``,
    ``icl_loss_drop``, ``layers/<l>/entropy`` (mean over the layer's heads),
    ``layers/<l>/induction`` (max over the layer's heads). Arrays: ``entropy``,
    ``prev_token``, ``bos``, ``induction``, each [L, H]. Encoders (bidirectional attention)
    get the probe scores only; ``meta["skipped"]`` says why induction is left out.

    Cross-rank: the probe sums and counts are all-reduced; the induction sequences are
    the same on every rank (seeded) and computed by each.

    Args:
        induction_len: n, tokens per copy (>= 2; ``None``: 50, or the most that fits the
            model's positions). Longer than fits the model: ``ValueError`` at compute time.
        n_induction_seqs: repeated sequences to average over.
        head_threshold: score in (0, 1] above which a head counts as induction /
            previous-token head.
        seed: seed of the random tokens.
        chunk_size: samples per forward pass (probe and induction sequences).
        timeout_seconds: stop between chunks past this time.

    Raises:
        ValueError: ``induction_len`` < 2, ``n_induction_seqs`` < 1, ``head_threshold``
            outside (0, 1], a non-integer ``seed``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16))
        >>> batch = {"input_ids": torch.randint(0, 40, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        >>> r = AttentionHeads(induction_len=5, n_induction_seqs=2).compute(m, [batch])
        >>> r.arrays["induction"].shape, 0 < r.scalars["mean_entropy"] <= 1
        ((2, 2), True)
    """

    name = "attention"
    #: each layer's probabilities [b, H, T, T] and their entropy terms (xlogy) are alive at once
    cost = Cost(forward_only=True, activation_copies=1.0)
    needs_grad = False
    needs_eager_attention = True

    def __init__(
        self,
        induction_len: int | None = None,
        n_induction_seqs: int = 8,
        head_threshold: float = 0.4,
        seed: int = seeds.DEFAULT_SEED,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        validate.check_int("AttentionHeads.induction_len", induction_len, 2, validate.MAX_TOKENS, allow_none=True)
        validate.check_int("AttentionHeads.n_induction_seqs", n_induction_seqs, 1, validate.MAX_DRAWS)
        validate.check_number("AttentionHeads.head_threshold", head_threshold, 0, 1, lo_open=True)
        validate.check_seed("AttentionHeads.seed", seed)
        self.induction_len = induction_len
        self.n_induction_seqs = n_induction_seqs
        self.head_threshold = float(head_threshold)
        self.seed = seed

    def time_cost(self, units: UnitCosts) -> float:
        """Eager-attention forwards that keep every head's probabilities: about three forwards."""
        return 3 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        model = ctx.model
        layers = find_attention_layers(model)
        if not layers:
            raise ValueError(f"AttentionHeads: no attention module recognised in {type(model).__name__}")
        heads = {layer.n_heads for layer in layers}
        if len(heads) != 1:
            raise ValueError(f"AttentionHeads: layers with different head counts {sorted(heads)}")
        n_layers, n_heads = len(layers), heads.pop()
        causal = is_causal(model, layers)
        sums, counts = probe_sums(ctx, layers, n_heads, causal)
        ctx.collective.sum_([sums, counts])
        scores = {name: (sums[k] / counts[k]).numpy() for k, name in enumerate(PROBE_SCORES)}
        ctx.meta.update(causal=causal, n_layers=n_layers, n_heads=n_heads, query_counts=counts.tolist())
        induction = icl = None
        if causal:
            n, bos = self._induction_setup(model)
            tokens = repeated_tokens(model, n, self.n_induction_seqs, self.seed, bos)
            induction, icl = induction_scores(ctx, layers, n_heads, tokens, n, 0 if bos is None else 1)
            ctx.meta.update(induction_len=n, induction_bos=bos, n_induction_seqs=self.n_induction_seqs)
            if icl is None:
                ctx.meta["skipped"] = {"icl_loss_drop": "the model returns no logits"}
        else:
            reason = "bidirectional (encoder) attention: induction needs a causal model"
            ctx.meta["skipped"] = {"induction": reason, "icl_loss_drop": reason}
        return attention_result(scores, induction, icl, self.head_threshold)

    def _induction_setup(self, model: torch.nn.Module) -> tuple[int, int | None]:
        """``(n, bos id or None)``, n checked against the model's positions.

        Raises:
            ValueError: ``induction_len`` (given or the default) does not fit the model's
                positions twice, after a BOS token when it has one.
        """
        bos = _bos_token(model)
        prefix = 0 if bos is None else 1
        limit = max_positions(model)
        room = None if limit is None else (limit - prefix) // 2
        if self.induction_len is None:
            n = DEFAULT_INDUCTION_LEN if room is None else min(DEFAULT_INDUCTION_LEN, room)
            if n < 2:
                raise ValueError(f"AttentionHeads.induction_len: the model's {limit} positions leave no room for 2 x 2 tokens")
            return n, bos
        if room is not None and self.induction_len > room:
            raise ValueError(
                f"AttentionHeads.induction_len must be at most {room} for this model "
                f"({prefix} + 2 x induction_len <= its {limit} positions); got {self.induction_len}"
            )
        return self.induction_len, bos


def attention_result(
    scores: Mapping[str, np.ndarray],
    induction: np.ndarray | None,
    icl: tuple[float, float] | None,
    threshold: float,
) -> MetricResult:
    """The :class:`AttentionHeads` result from the [L, H] score arrays.

    Args:
        scores: ``entropy``, ``prev_token``, ``bos``, each [L, H].
        induction: [L, H], or ``None`` (encoders).
        icl: ``(loss on the first copy, loss on the second copy)`` or ``None``.
        threshold: the head threshold.

    Returns:
        A :class:`MetricResult` named ``attention``.
    """
    entropy = np.asarray(scores["entropy"], dtype=np.float64)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    scalars: dict[str, float] = {
        "mean_entropy": float(entropy.mean()),
        "bos_fraction": float(arrays["bos"].mean()),
        "n_prev_token_heads": float((arrays["prev_token"] > threshold).sum()),
    }
    for layer in range(entropy.shape[0]):
        scalars[f"layers/{layer}/entropy"] = float(entropy[layer].mean())
    if induction is not None:
        arrays["induction"] = np.asarray(induction, dtype=np.float64)
        scalars["max_induction"] = float(arrays["induction"].max())
        scalars["n_induction_heads"] = float((arrays["induction"] > threshold).sum())
        for layer in range(entropy.shape[0]):
            scalars[f"layers/{layer}/induction"] = float(arrays["induction"][layer].max())
    if icl is not None:
        scalars["icl_loss_first"], scalars["icl_loss_second"] = float(icl[0]), float(icl[1])
        scalars["icl_loss_drop"] = float(icl[0] - icl[1])
    return MetricResult(name="attention", scalars=scalars, arrays=arrays)


# ---------------------------------------------------------------------------- probe pass
def forward_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """The model inputs of a probe batch (``input_ids`` and masks; labels dropped).

    Raises:
        ValueError: the batch is not a dict holding ``input_ids``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("AttentionHeads needs probe batches as dicts with 'input_ids' (HF token batches)")
    return {k: batch[k] for k in FORWARD_KEYS if k in batch and batch[k] is not None}


@contextlib.contextmanager
def attention_hooks(
    layers: list[AttentionLayer], consume: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``consume(layer index, A [B, H, T, T])`` with each layer's attention probabilities.

    Raises (from the forward): ``RuntimeError`` if a module returns no probabilities.
    """

    def make(index: int, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
                raise RuntimeError(f"attention module {name!r} returned no attention probabilities (eager attention needed)")
            consume(index, probs.detach())

        return hook

    handles = [layer.module.register_forward_hook(make(layer.index, layer.name)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], causal_lm: bool) -> Any:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    extra = {"use_cache": False} if causal_lm else {}
    with torch.no_grad():
        return model(**inputs, **extra)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its head (``model.base_model``): the probe pass needs no logits."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _work_dtype(probs: torch.Tensor) -> torch.Tensor:
    return probs if probs.dtype in (torch.float32, torch.float64) else probs.float()


def probe_sums(
    ctx: ComputeContext, layers: list[AttentionLayer], n_heads: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local sums of the probe scores and their query counts.

    Returns:
        ``sums [3, L, H]`` (entropy, prev_token, bos; float64, CPU) and ``counts [3]``.
    """
    sums = torch.zeros(len(PROBE_SCORES), len(layers), n_heads, dtype=torch.float64)
    counts = torch.zeros(len(PROBE_SCORES), dtype=torch.float64)
    state: dict[str, torch.Tensor] = {}

    def consume(index: int, probs: torch.Tensor) -> None:
        a = _work_dtype(probs)
        w = state["weights"].to(a.device, a.dtype)  # [3, b, T]
        ent = -torch.xlogy(a, a).sum(-1)  # [b, H, T]
        prev = torch.nn.functional.pad(a.diagonal(offset=-1, dim1=-2, dim2=-1), (1, 0))  # [b, H, T]
        first = state["first"].to(a.device)
        bos = a.gather(-1, first.view(-1, 1, 1, 1).expand(*a.shape[:-1], 1)).squeeze(-1)  # [b, H, T]
        for k, values in enumerate((ent, prev, bos)):
            # padding query rows may be NaN (a fully masked row, left padding): weight 0, dropped
            values = torch.where(w[k][:, None, :] > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
            sums[k, index] += torch.einsum("bht,bt->h", values, w[k]).to("cpu", torch.float64)

    with attention_hooks(layers, consume):
        for done, chunk in enumerate(ctx.chunks()):
            inputs = forward_inputs(chunk)
            weights, first = query_weights(inputs, causal)
            state["weights"], state["first"] = weights, first
            counts += (weights > 0).sum(dim=(1, 2)).to(torch.float64)
            _run(backbone(ctx.model), inputs, causal and layers[0].layout != "bert")
            ctx.check_time(chunks_done=done + 1)
    return sums, counts


def query_weights(inputs: Mapping[str, torch.Tensor], causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query weights of the three probe scores, and each sequence's first token.

    Returns:
        ``weights [3, B, T]`` (float64): entropy 1 / log|K_t| (queries with |K_t| >= 2),
        prev_token 1 where t and t - 1 are tokens, bos 1 on tokens other than the first;
        0 elsewhere. ``first [B]``: the first non-padding position.
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    m = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    T = m.shape[1]
    if causal:
        n_keys = torch.cumsum(m.to(torch.float64), dim=1)
    else:
        n_keys = m.to(torch.float64).sum(1, keepdim=True).expand(-1, T)
    ent = torch.where(m & (n_keys >= 2), 1.0 / torch.log(n_keys.clamp(min=2)), torch.zeros((), dtype=torch.float64))
    prev = torch.zeros(m.shape, dtype=torch.float64)
    prev[:, 1:] = (m[:, 1:] & m[:, :-1]).to(torch.float64)
    first = m.to(torch.int64).argmax(dim=1)
    bos = (m & (torch.arange(T)[None, :] != first[:, None])).to(torch.float64)
    return torch.stack([ent, prev, bos]), first


# ---------------------------------------------------------------------------- induction
def _special_ids(model: torch.nn.Module) -> set[int]:
    config = getattr(model, "config", None)
    out: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(config, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                out.add(v)
    return out


def _vocab_size(model: torch.nn.Module) -> int:
    emb = cast(Any, model).get_input_embeddings()
    return int(emb.weight.shape[0])


def _bos_token(model: torch.nn.Module) -> int | None:
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if isinstance(bos, int) and not isinstance(bos, bool) and 0 <= bos < _vocab_size(model):
        return bos
    return None


def repeated_tokens(model: torch.nn.Module, n: int, n_seqs: int, seed: int, bos: int | None) -> torch.Tensor:
    """``[n_seqs, p + 2n]``: [BOS] + r + r with r of n uniform non-special tokens (seeded).

    Raises:
        ValueError: fewer than 2 non-special tokens in the vocabulary.
    """
    vocab = _vocab_size(model)
    allowed = torch.tensor(sorted(set(range(vocab)) - _special_ids(model)), dtype=torch.long)
    if allowed.numel() < 2:
        raise ValueError(f"AttentionHeads: the vocabulary ({vocab}) has fewer than 2 ordinary tokens")
    gen = torch.Generator().manual_seed(seed)
    half = allowed[torch.randint(0, allowed.numel(), (n_seqs, n), generator=gen)]
    parts = [half, half]
    if bos is not None:
        parts.insert(0, torch.full((n_seqs, 1), bos, dtype=torch.long))
    return torch.cat(parts, dim=1)


def induction_scores(
    ctx: ComputeContext,
    layers: list[AttentionLayer],
    n_heads: int,
    tokens: torch.Tensor,
    n: int,
    prefix: int,
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Induction scores [L, H] and the (first copy, second copy) losses on ``tokens [N, p + 2n]``.

    Returns:
        ``(induction [L, H], icl)``; ``icl`` is ``None`` when the model returns no logits.
    """
    stripe = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    losses = torch.zeros(2, dtype=torch.float64)
    have_logits = True

    def consume(index: int, probs: torch.Tensor) -> None:
        diag = probs.diagonal(offset=-(n - 1), dim1=-2, dim2=-1)  # [b, H, S - n + 1]: (j + n - 1, j)
        stripe[index] += diag[..., prefix + 1 : prefix + n + 1].sum(dim=(0, 2), dtype=torch.float64).cpu()

    first = torch.arange(prefix + 1, prefix + n)  # first copy's tokens 1..n-1
    second = first + n
    with attention_hooks(layers, consume):
        for done, start in enumerate(range(0, tokens.shape[0], ctx.chunk_size)):
            ids = tokens[start : start + ctx.chunk_size]
            out = _run(ctx.model, {"input_ids": ids}, True)
            logits = getattr(out, "logits", None)
            if logits is None:
                have_logits = False
            else:
                targets = torch.cat([first, second])
                picked = _work_dtype(logits[:, targets - 1])
                nll = torch.nn.functional.cross_entropy(
                    picked.reshape(-1, picked.shape[-1]), ids[:, targets].reshape(-1).to(picked.device), reduction="none"
                ).view(ids.shape[0], 2, n - 1)
                losses += nll.sum(dim=(0, 2), dtype=torch.float64).cpu()
            ctx.check_time(induction_chunks_done=done + 1)
    count = tokens.shape[0]
    icl = (float(losses[0] / (count * (n - 1))), float(losses[1] / (count * (n - 1)))) if have_logits else None
    return (stripe / (count * n)).numpy(), icl
