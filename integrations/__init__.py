"""Tracker sinks, installed as ``uma_callbacks.integrations``.

Each tracker lives in its own module and imports its package only when used:
``MLflowSink`` (``uma_callbacks.integrations.mlflow``), ``WandbSink``
(``uma_callbacks.integrations.wandb``). The protocol is :class:`~.base.Sink`.
"""

from uma_callbacks.integrations.base import MemorySink, Sink

__all__ = ["MemorySink", "Sink"]
