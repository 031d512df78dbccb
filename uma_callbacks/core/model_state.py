"""Leave the model exactly as it was found.

:func:`preserved_model_state` records, and restores on exit (also after an exception):

- every module's ``training`` flag;
- every module's ``_parameters`` and ``_buffers`` entries **by identity** (see
  :func:`restored_tensors`): a module reachable under two names, one ``Parameter`` held by
  two modules, tied embeddings -- whatever swapped an entry (``torch.func.functional_call``
  leaves a shared module's entries as the detached plain tensors it was given, torch 2.13),
  the very same ``nn.Parameter`` objects are put back, so an optimizer keeps updating them;
- every parameter's ``requires_grad`` flag and ``.grad`` (the same tensor object, so a
  trainer's accumulated gradients survive; metrics take gradients functionally anyway);
- the attention implementation of HF models (``config._attn_implementation``), which
  curvature metrics may switch to ``"eager"`` for a double backward;
- HF activation (gradient) checkpointing, switched off for the block by
  :func:`no_activation_checkpointing` and switched back after;
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
def restored_tensors(model: torch.nn.Module) -> Iterator[None]:
    """Put every module's ``_parameters`` / ``_buffers`` entries back, by identity, on exit.

    Each module (``model.modules()``, every shared module once) keeps its two dicts; on
    exit an entry that is not the very object recorded (a plain tensor left by
    ``functional_call``, a ``GradTrackingTensor`` of ``vmap``) is replaced by the
    recorded one, entries added are removed and entries removed come back, in the
    original order. Values are not copied: a recorded ``Parameter`` holds whatever its
    storage holds.
    """
    saved = [(m, list(m._parameters.items()), list(m._buffers.items())) for m in model.modules()]
    fsdp_groups, managed = fsdp_managed(model)
    try:
        yield
    finally:
        fsdp_reshard(fsdp_groups)
        for module, params, buffers in saved:
            for live, recorded in ((module._parameters, params), (module._buffers, buffers)):
                if list(live.keys()) != [k for k, _ in recorded] or any(
                    live[k] is not v for k, v in recorded if (id(module), k) not in managed
                ):
                    keep = {k: live[k] for k, _ in recorded if (id(module), k) in managed and k in live}
                    live.clear()
                    live.update((k, keep.get(k, v)) for k, v in recorded)


def fsdp_managed(model: torch.nn.Module) -> tuple[list[object], set[tuple[int, str]]]:
    """FSDP2's parameter groups that are sharded now, and the ``(id(module), name)`` entries FSDP2 swaps itself.

    FSDP2 swaps those entries between a sharded ``DTensor`` and an all-gathered tensor.
    They are FSDP's to manage: a root module keeps its all-gathered parameters registered
    after a forward without backward, so putting the recorded sharded objects back would
    leave FSDP believing them unsharded, and the next forward would skip the all-gather
    ("mixed torch.Tensor and DTensor"). They are left to :func:`fsdp_reshard`.
    """
    groups: list[object] = []
    managed: set[tuple[int, str]] = set()
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState
    except ImportError:  # torch without FSDP2
        return groups, managed
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in getattr(module._get_fsdp_state(), "_fsdp_param_groups", []):
            params = list(getattr(group, "fsdp_params", []))
            for fp in params:
                info = fp._module_info
                managed.add((id(info.module), info.param_name))
                managed.update((id(m), n) for m, n in zip(info.shared_modules, info.shared_param_names))
            if params and all(fp.sharded_state == ShardedState.SHARDED for fp in params):
                groups.append(group)
    return groups, managed


def fsdp_reshard(groups: list[object]) -> None:
    """Reshard FSDP2 parameter ``groups`` (found sharded on entry): the model goes back to its shards only.

    Also clears the root-forward marker that a forward that raised leaves set.
    """
    if not groups:
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    from uma_callbacks.core.sharding import reset_fsdp_forward

    for group in groups:
        # a forward that raised leaves the group in FORWARD, where reshard() of a root
        # (kept unsharded after forward) does nothing: back to IDLE, then to the shards
        group._training_state = TrainingState.IDLE  # type: ignore[attr-defined]
        group._to_sharded()  # type: ignore[attr-defined]
    for group in groups:
        for fp in group.fsdp_params:  # type: ignore[attr-defined]
            reset_fsdp_forward(fp._module_info.module)


def _require_grads_handles(model: torch.nn.Module) -> list[object]:
    handles: list[object] = []
    for module in model.modules():
        for handle in list(getattr(module, "_require_grads_hooks", None) or []) + [
            getattr(module, "_require_grads_hook", None)
        ]:
            if handle is not None and hasattr(handle, "hooks_dict_ref") and handle not in handles:
                handles.append(handle)
    return handles


@contextlib.contextmanager
def no_activation_checkpointing(model: torch.nn.Module) -> Iterator[bool]:
    """Switch HF activation (gradient) checkpointing off for the block, and back on after.

    With ``gradient_checkpointing=True`` the Trainer sets ``gradient_checkpointing`` on
    the decoder layers and registers a forward hook on the input embeddings that calls
    ``output.requires_grad_(True)`` -- which ``torch.func.vmap`` refuses. For the block,
    every ``module.gradient_checkpointing`` that is true is set false and those hooks are
    taken out of their module's hook dict; on exit both come back (the hooks under their
    own ids, in their original order). The function computed is the same: checkpointing
    only trades memory for recomputation. Yields whether anything was switched.
    """
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    hook_dicts: list[tuple[dict, list]] = []
    for handle in _require_grads_handles(model):
        hooks = handle.hooks_dict_ref()  # type: ignore[attr-defined]
        if hooks is not None and handle.id in hooks:  # type: ignore[attr-defined]
            if all(hooks is not d for d, _ in hook_dicts):
                hook_dicts.append((hooks, list(hooks.items())))
            del hooks[handle.id]  # type: ignore[attr-defined]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield bool(flagged or hook_dicts)
    finally:
        for module in flagged:
            module.gradient_checkpointing = True
        for hooks, items in hook_dicts:
            hooks.clear()
            hooks.update(items)


@contextlib.contextmanager
def preserved_model_state(model: torch.nn.Module) -> Iterator[None]:
    """Context manager restoring tensors by identity, flags, grads, attention, checkpointing, RNG.

    Example:
        >>> blk = torch.nn.Linear(2, 2)
        >>> model = torch.nn.Sequential(blk, blk)
        >>> before = blk.weight
        >>> with preserved_model_state(model):
        ...     blk._parameters["weight"] = before.detach()
        >>> blk.weight is before
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    attn = [(c, c._attn_implementation) for c in _attn_configs(model)]
    devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices, enabled=True), restored_tensors(model):
        try:
            with no_activation_checkpointing(model):
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
