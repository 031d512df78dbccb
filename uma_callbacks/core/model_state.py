"""Leave the model exactly as it was found.

:func:`preserved_model_state` records, and restores on exit (also after an exception):

- every module's ``training`` flag;
- every parameter's ``requires_grad`` flag and ``.grad`` (the same tensor object, so a
  trainer's accumulated gradients survive; metrics take gradients functionally anyway);
- the attention implementation of HF models (``config._attn_implementation``), which
  curvature metrics may switch to ``"eager"`` for a double backward;
- the global RNG state of CPU and every CUDA device (``torch.random.fork_rng``).

Weights are not copied here (that would double the memory); the only metric that
moves weights (the landscape) restores them from its own saved copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _attn_configs(model: torch.nn.Module) -> list[object]:
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and config not in configs:
            configs.append(config)
    return configs


@contextlib.contextmanager
def preserved_model_state(model: torch.nn.Module) -> Iterator[None]:
    """Context manager restoring flags, grads, attention implementation and RNG state."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    attn = [(c, c._attn_implementation) for c in _attn_configs(model)]
    devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices, enabled=True):
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode
            for p, requires_grad, grad in params:
                p.requires_grad_(requires_grad)
                p.grad = grad
            for config, impl in attn:
                if config._attn_implementation != impl:
                    set_attn_implementation(config, impl)


def set_attn_implementation(config: object, impl: str | None) -> None:
    """Set an HF config's attention implementation (the private field; no reload)."""
    try:
        config._attn_implementation = impl  # type: ignore[attr-defined]
    except AttributeError:  # older configs keep it in a private slot only
        config._attn_implementation_internal = impl  # type: ignore[attr-defined]


#: Attention implementations with a double backward and vmap support.
_VMAP_SAFE_ATTENTION = ("eager", None)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module, meta: dict | None = None) -> Iterator[bool]:
    """Switch HF attention to ``"eager"`` for the block, and back after.

    SDPA/flash kernels have no double backward, and their mask preparation takes
    data-dependent branches that ``torch.func.vmap`` refuses; eager attention computes
    the same function. Yields whether anything was switched, and records
    ``meta["attn_implementation"] = "<old> -> eager"`` when it was.
    """
    configs = [(c, c._attn_implementation) for c in _attn_configs(model)]
    switched = [(c, impl) for c, impl in configs if impl not in _VMAP_SAFE_ATTENTION]
    for config, _ in switched:
        set_attn_implementation(config, "eager")
    if switched and meta is not None:
        meta["attn_implementation"] = f"{switched[0][1]} -> eager"
    try:
        yield bool(switched)
    finally:
        for config, impl in switched:
            set_attn_implementation(config, impl)
