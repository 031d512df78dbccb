r"""The per-sample rule of ``nn.Embedding``: g_{i,E} = sum_t e_{id_{it}} d_{it}^T.

Only the rows of the sample's tokens are held; tokens equal to ``padding_idx`` add
nothing, as in PyTorch's backward.

Embeddings with ``max_norm`` (the forward renormalises the table in place) or
``scale_grad_by_freq`` (the gradient depends on the whole batch's counts) get no rule.
Ids shared by the batch (dim 0 of 1, such as BERT's ``position_ids [1, T]``) are expanded
to the batch before the call (when the plan allows it), so that their per-sample output
gradients exist; the broadcast they feed gives the same values.
"""

from __future__ import annotations

from typing import Any

import torch

from uma_callbacks.linalg.layers.factors import Factor, Rows
from uma_callbacks.linalg.layers.registry import register_layer_rule


def _plain(module: torch.nn.Module) -> bool:
    return module.max_norm is None and not module.scale_grad_by_freq


def _expand_shared_ids(module: torch.nn.Module, inputs: tuple[Any, ...], n: int) -> tuple[Any, ...] | None:
    """Ids ``[1, ...]`` expanded to ``[n, ...]`` (``None``: the inputs as they are)."""
    if n > 1 and inputs and inputs[0].dim() >= 1 and inputs[0].shape[0] == 1:
        return (inputs[0].expand(n, *inputs[0].shape[1:]), *inputs[1:])
    return None


@register_layer_rule(torch.nn.Embedding, name="embedding", params=("weight",), accepts=_plain, batch_inputs=_expand_shared_ids)
def embedding_rule(module: torch.nn.Embedding, x: torch.Tensor, d: torch.Tensor, n: int) -> dict[str, Factor]:
    """``{"weight": Rows}`` of one call (x: ids ``[n, ...]``, padding ids as -1)."""
    ids = x.reshape(n, -1).long()
    if module.padding_idx is not None:
        ids = ids.masked_fill(ids == module.padding_idx, -1)
    return {"weight": Rows(ids, d.reshape(n, -1, d.shape[-1]), module.num_embeddings, n)}
