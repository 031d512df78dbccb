"""Issue 17: with ``gradient_checkpointing=True`` the per-sample metrics work and checkpointing comes back.

HF's input-embedding hook (``output.requires_grad_(True)``, registered by
``gradient_checkpointing_enable``) fails inside ``vmap``;
:func:`uma_callbacks.core.model_state.no_activation_checkpointing` (entered by
``preserved_model_state``) takes it and the layers' flags out for the measurement.
"""

from __future__ import annotations

import pytest

from tests.trainer_cases import run_trainer, tiny_lm
from uma_callbacks import UMACallback
from uma_callbacks.core.model_state import preserved_model_state
from uma_callbacks.metrics import METRICS


def _hooks(model):
    return {n: list(m._forward_hooks) for n, m in model.named_modules()}


def test_checkpointing_is_switched_off_inside_and_restored_with_its_hooks():
    from uma_callbacks.core.model_state import no_activation_checkpointing

    model = tiny_lm()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    hooks = _hooks(model)
    flags = {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    assert any(flags.values()) and any(hooks.values())
    with preserved_model_state(model):
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert not any(_hooks(model).values())
    assert _hooks(model) == hooks
    assert {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")} == flags
    with no_activation_checkpointing(tiny_lm()) as switched:
        assert not switched


@pytest.mark.slow
def test_trainer_with_gradient_checkpointing_measures_and_trains_as_without(tmp_path):
    kwargs = dict(
        max_steps=4, save_steps=2, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    _, plain = run_trainer(tmp_path / "plain", **kwargs)
    cb = UMACallback(metrics=["gradient_flow", METRICS["fisher"](top_k=2)], probe_size=4, trackers=[], draw_figures=False)
    trainer, measured = run_trainer(tmp_path / "uma", callbacks=[cb], **kwargs)
    assert [(r.metric, r.status) for r in cb.records] == [("gradient_flow", "ok"), ("fisher", "ok")] * 2, [
        r.error for r in cb.records
    ]
    assert measured == plain
    assert trainer.model.is_activation_checkpointing
