"""QK/OV circuits from the weights alone: OV copying and composition scores (Elhage et al. 2021)."""

from __future__ import annotations

import numpy as np
import torch

from uma_callbacks.core.attention_weights import embedding_matrices, find_attention_layers, head_factors
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult
from uma_callbacks.metrics.time_cost import UnitCosts

#: composition modes, in the order of the result's arrays.
MODES = ("q", "k", "v")
#: vocabulary rows per block when forming W_U W_E (bounds the cast copies).
VOCAB_BLOCK = 8192


class Circuits(Metric):
    r"""OV copying and Q/K/V composition scores per head, from the weights (no probe).

    Row-vector convention (see :mod:`uma_callbacks.core.attention_weights`): per head,
    W_Q, W_K, W_V [d, d_h], W_O [d_h, d], OV = W_V W_O and QK = W_Q W_K^T (each [d, d]);
    grouped-query heads use their key/value head; biases, layer norms and rotary position
    embeddings are left out. W_E [V, d] is the token embedding, W_U [d, V] the unembedding
    (W_E^T for a model without one; ``meta["tied_fallback"]``).

    - ``ov_copying`` [L, H] = sum_i Re(lambda_i) / sum_i |lambda_i| over the eigenvalues of
      W_E OV W_U [V, V]. Its non-zero eigenvalues are those of the d_h x d_h matrix
      W_O (W_U W_E) W_V (AB and BA share them), which is what is computed; W_U W_E [d, d]
      is formed once for the model. 1: the head copies the tokens it attends to.
    - composition of head h1 (layer l1) into head h2 (layer l2 > l1):
      ||M1 M2||_F / (||M1||_F ||M2||_F) with M1 = OV of h1 and M2 = QK (``q``: h1's output
      feeds h2's queries, logits x_q OV1 QK x_k^T), QK^T (``k``: it feeds the keys,
      x_q QK OV1^T x_k^T) or OV (``v``) of h2, as TransformerLens computes them.
      Factored: for A [d, d_h] with QR factor R_A [d_h, d_h], ||A X||_F = ||R_A X||_F, so
      with M1 = W_V1 W_O1 and M2 = A2 B2^T, ||M1 M2||_F = ||(R_V1 W_O1) (A2 R_B2^T)||_F, a
      d_h x d_h product per pair of heads (one [l2 H d_h, d] x [d, H d_h] product per
      layer l2 for all earlier heads at once). For ``k`` and ``v`` the product with A2
      (W_K or W_V) is taken once per key/value head, then each query head of the group
      applies its own d_h x d_h R_B2^T: grouped-query models pay H_kv / H of it. Arrays [L H, L H], rows the writing head
      h1 = l1 H + h, columns the reading head; 0 where l1 >= l2 (or a zero-norm head).

    Scalars: ``mean_ov_copying``, ``max_q_composition``, ``max_k_composition``,
    ``max_v_composition`` (the latter three need 2 layers or more).

    Memory and time (d = H d_h, L layers): W_U W_E costs d^2 V multiply-adds in blocks of
    ``VOCAB_BLOCK`` rows; the left factors of all layers are L d^2 entries; the products
    about (1 + 2 H_kv / H) L^2 d^3 / 2 multiply-adds (the exact all-pairs floor in factored
    form: d d_h^2 per pair of heads and mode). Work dtype: float64 for float64 weights, else float32;
    eigenvalues in float64.

    Args:
        chunk_size: unused (weights only); accepted for the common interface.
        timeout_seconds: stop between layers past this time.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16))
        >>> r = Circuits().compute(m, [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}])
        >>> r.arrays["ov_copying"].shape, r.arrays["k_composition"].shape
        ((2, 2), (4, 4))
    """

    name = "circuits"
    cost = Cost(forward_only=True, param_copies=0.5)
    needs_grad = False

    def time_cost(self, units: UnitCosts) -> float:
        """Weights only, no pass over the probe: a tenth of a forward."""
        return 0.1 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        layers = find_attention_layers(ctx.model)
        if not layers:
            raise ValueError(f"Circuits: no attention module recognised in {type(ctx.model).__name__}")
        heads = {layer.n_heads for layer in layers}
        if len(heads) != 1:
            raise ValueError(f"Circuits: layers with different head counts {sorted(heads)}")
        n_heads = heads.pop()
        first = next(ctx.model.parameters())
        work = torch.float64 if first.dtype == torch.float64 else torch.float32
        w_e, w_u, fallback = embedding_matrices(ctx.model)
        gram = unembed_embed(w_e, w_u, work)
        n_all = len(layers) * n_heads
        ov = np.zeros((len(layers), n_heads))
        lefts: torch.Tensor | None = None  # [L H, d_h, d]: R_V1 W_O1 of every head measured so far
        left_norms = torch.zeros(n_all, dtype=work, device=first.device)
        comps = {m: torch.zeros(n_all, n_all, dtype=torch.float64) for m in MODES}
        for layer in layers:
            f = head_factors(layer, work)
            ov[layer.index] = ov_copying(f.W_V, f.W_O, gram)
            r_q, r_k, r_v, r_o = (_r_factor(w) for w in (f.W_Q, f.W_K, f.W_V, f.W_O.transpose(1, 2)))
            qk_norm, ov_norm = _fro(r_q @ r_k.transpose(1, 2)), _fro(r_v @ r_o.transpose(1, 2))
            shared = [h * (layer.n_heads // layer.n_kv_heads) for h in range(layer.n_kv_heads)]
            group = torch.tensor([layer.kv_head(h) for h in range(n_heads)])
            every = torch.arange(n_heads)
            rights = {  # M2 = A2 B2^T -> (A2 per distinct head, R_B2 per head, which A2 each head uses, ||M2||)
                "q": (f.W_Q, r_k, every, qk_norm),
                "k": (f.W_K[shared], r_q, group, qk_norm),
                "v": (f.W_V[shared], r_o, group, ov_norm),
            }
            rows = layer.index * n_heads
            if rows:
                assert lefts is not None  # layers are numbered 0, 1, ...: every earlier one set it
                for mode, (a2, r_b2, which, norm) in rights.items():
                    block = composition_block(lefts[:rows], left_norms[:rows], a2, r_b2, which, norm)
                    comps[mode][:rows, rows : rows + n_heads] = block.to("cpu", torch.float64)
            left = r_v @ f.W_O
            if lefts is None:
                lefts = torch.empty(n_all, *left.shape[1:], dtype=work, device=left.device)
            lefts[rows : rows + n_heads] = left
            left_norms[rows : rows + n_heads] = ov_norm
            del f, rights, left
            ctx.check_time(layers_done=layer.index + 1)
        ctx.meta.update(n_layers=len(layers), n_heads=n_heads, tied_fallback=fallback, work_dtype=str(work))
        return circuits_result(ov, {m: c.numpy() for m, c in comps.items()}, n_heads)


def _r_factor(w: torch.Tensor) -> torch.Tensor:
    """R [.., d_h, d_h] of the reduced QR of ``w [.., d, d_h]`` (so ||w X||_F = ||R X||_F)."""
    return torch.linalg.qr(w, mode="r").R


def _fro(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(m)


def unembed_embed(w_e: torch.Tensor, w_u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_U W_E [d, d] in ``dtype``, summed over blocks of the vocabulary.

    Args:
        w_e: [V, d].
        w_u: [d, V].
        dtype: the work dtype.
    """
    d = w_e.shape[1]
    out = torch.zeros(d, d, dtype=dtype, device=w_e.device)
    for start in range(0, w_e.shape[0], VOCAB_BLOCK):
        stop = start + VOCAB_BLOCK
        out += w_u[:, start:stop].to(dtype) @ w_e[start:stop].to(dtype)
    return out


def ov_copying(w_v: torch.Tensor, w_o: torch.Tensor, gram: torch.Tensor) -> np.ndarray:
    """Per head sum Re(lambda) / sum |lambda| of W_O W_U W_E W_V [H, d_h, d_h].

    Args:
        w_v: [H, d, d_h].
        w_o: [H, d_h, d].
        gram: W_U W_E [d, d].

    Returns:
        ``[H]`` (NaN for a head whose matrix is zero).
    """
    small = (w_o @ gram @ w_v).to(torch.float64).cpu()
    eig = torch.linalg.eigvals(small)  # [H, d_h]
    return (eig.real.sum(-1) / eig.abs().sum(-1)).numpy()


def composition_block(
    left: torch.Tensor,
    left_norm: torch.Tensor,
    a2: torch.Tensor,
    r_b2: torch.Tensor,
    which: torch.Tensor,
    right_norm: torch.Tensor,
) -> torch.Tensor:
    """Composition scores of the heads of ``left`` into the heads of one later layer.

    With M2 = A2 B2^T and B2 = Q R_B2: ||M1 M2||_F = ||(R_V1 W_O1) A2 R_B2^T||_F. The
    product with A2 is taken once per distinct A2 (a grouped-query key/value head serves
    several query heads), then each reading head applies its own R_B2^T (d_h x d_h).

    Args:
        left: R_V1 W_O1 per writing head, [H1, d_h, d].
        left_norm: ||OV1||_F [H1].
        a2: the distinct A2 factors, [Ha, d, d_h].
        r_b2: R_B2 per reading head, [H2, d_h, d_h].
        which: [H2], the A2 each reading head uses.
        right_norm: ||M2||_F [H2].

    Returns:
        ``[H1, H2]``: ||M1 M2||_F / (||M1||_F ||M2||_F), 0 where a norm is 0.
    """
    h1, dh, d = left.shape
    ha, h2 = a2.shape[0], r_b2.shape[0]
    flat = left.reshape(h1 * dh, d)
    if ha == h2 and torch.equal(which, torch.arange(h2)):  # nothing shared: fold R_B2 into A2 first
        right = (a2 @ r_b2.transpose(1, 2)).permute(1, 0, 2).reshape(d, h2 * dh)
        sq = torch.linalg.vector_norm((flat @ right).view(h1, dh, h2, dh), dim=(1, 3)).square()
    else:
        prod = flat @ a2.permute(1, 0, 2).reshape(d, ha * dh)  # [H1 d_h, Ha d_h], once per shared A2
        sq = torch.empty(h1, h2, dtype=left.dtype, device=left.device)
        for g in range(ha):
            heads = (which == g).nonzero().flatten().tolist()
            if not heads:
                continue
            r_cat = r_b2[heads].reshape(len(heads) * dh, dh)
            out = (prod[:, g * dh : (g + 1) * dh] @ r_cat.T).view(h1, dh, len(heads), dh)
            sq[:, heads] = torch.linalg.vector_norm(out, dim=(1, 3)).square()
    denom = left_norm[:, None] * right_norm[None, :]
    return torch.where(denom > 0, sq.sqrt() / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(sq))


def circuits_result(ov: np.ndarray, comps: dict[str, np.ndarray], n_heads: int) -> MetricResult:
    """The :class:`Circuits` result from ``ov [L, H]`` and the ``[L H, L H]`` composition arrays."""
    ov = np.asarray(ov, dtype=np.float64)
    scalars = {"mean_ov_copying": float(np.nanmean(ov))}
    arrays = {"ov_copying": ov}
    n_layers = ov.shape[0]
    later = np.kron(np.triu(np.ones((n_layers, n_layers)), k=1), np.ones((n_heads, n_heads))).astype(bool)
    for mode in MODES:
        arrays[f"{mode}_composition"] = np.asarray(comps[mode], dtype=np.float64)
        if later.any():
            scalars[f"max_{mode}_composition"] = float(arrays[f"{mode}_composition"][later].max())
    return MetricResult(name="circuits", scalars=scalars, arrays=arrays)
