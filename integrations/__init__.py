"""Tracker sinks, installed as ``uma_callbacks.integrations``.

Each tracker lives in its own module and imports its package only when used:
``MLflowSink`` (``uma_callbacks.integrations.mlflow``), ``WandbSink``
(``uma_callbacks.integrations.wandb``). The protocol is :class:`~.base.Sink`; the registry of tracker names
(:func:`register_sink`, :func:`make_sink`, :func:`resolve_sinks`) is in ``registry.py``.
"""

from uma_callbacks.integrations.base import MemorySink, Sink
from uma_callbacks.integrations.registry import make_sink, register_sink, resolve_sinks, tracker_names

__all__ = ["MemorySink", "Sink", "make_sink", "register_sink", "resolve_sinks", "tracker_names"]
