"""Per-layer per-sample gradient rules, one file per layer type, registered by module type.

- :mod:`.registry`: :func:`register_layer_rule` (by type, MRO lookup),
  :func:`register_layer_rule_matching` (by structure), :func:`find_layer_rule`;
- :mod:`.factors`: the forms a rule gives per-sample gradients in (:class:`Dense`,
  :class:`Outer`, :class:`Rows`) and their reductions;
- the built-in rules: :mod:`.linear` (``nn.Linear``), :mod:`.conv1d` (GPT-2 ``Conv1D``),
  :mod:`.embedding` (``nn.Embedding``), :mod:`.layer_norm` (``nn.LayerNorm``),
  :mod:`.rms_norm` (HF RMSNorm);
- :mod:`.vmap_fallback`: ``vmap(grad)`` for the parameters no rule covers.

The hooks that run the rules during one ordinary backward are in
:mod:`uma_callbacks.linalg.layer_grads`. A rule for another layer type is one new file that
calls :func:`register_layer_rule` when imported (a built-in one is also listed below).
"""

from __future__ import annotations

from uma_callbacks.linalg.layers.factors import Dense, Factor, Outer, Rows, Zero, merge_factors
from uma_callbacks.linalg.layers.registry import (
    LayerRule,
    find_layer_rule,
    register_layer_rule,
    register_layer_rule_matching,
)

# the built-in rules register themselves on import; for type rules the order does not matter,
# structure-matching rules (conv1d, rms_norm) are tried in this order
from uma_callbacks.linalg.layers import linear, conv1d, embedding, layer_norm, rms_norm  # noqa: E402,F401  isort: skip

__all__ = [
    "Dense",
    "Factor",
    "LayerRule",
    "Outer",
    "Rows",
    "Zero",
    "find_layer_rule",
    "merge_factors",
    "register_layer_rule",
    "register_layer_rule_matching",
]
