"""uma-callbacks: training-geometry diagnostics as Trainer callbacks and Accelerate hooks.

Fisher information, gradient flow, curvature and loss-landscape slices, computed on a
frozen probe when a checkpoint is saved, journalled locally and logged to W&B or MLflow.
"""

from typing import TYPE_CHECKING, Any

from uma_callbacks.checkpoints import load_weights as _load_checkpoint_weights
from uma_callbacks.config import UMAConfig
from uma_callbacks.core.records import Record
from uma_callbacks.core.spike import SpikeTrigger
from uma_callbacks.engine.budget import MemoryBudget
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import METRICS, Metric, MetricResult
from uma_callbacks.metrics.weights_source import register_folder_loader

# metrics that compare with weights named by a folder (TaskVectors(base="ckpt/")) read it
# through the checkpoint loader: metrics themselves never read checkpoints from disk
register_folder_loader(_load_checkpoint_weights)

if TYPE_CHECKING:  # the lazy names below, seen by type checkers and linters; loaded on first use
    from uma_callbacks.legacy.analyze import AnalysisResults, ResultCache, analyze_models
    from uma_callbacks.legacy.unified_config import UnifiedConfig
    from uma_callbacks.session import Session
    from uma_callbacks.triggers.accelerate import attach
    from uma_callbacks.triggers.backfill import backfill
    from uma_callbacks.triggers.trainer import UMACallback

__version__ = "0.1.0"

_LAZY = {
    "UMACallback": ("triggers.trainer", "UMACallback"),
    "attach": ("triggers.accelerate", "attach"),
    "backfill": ("triggers.backfill", "backfill"),
    "Session": ("session", "Session"),
    "analyze_models": ("legacy.analyze", "analyze_models"),
    "AnalysisResults": ("legacy.analyze", "AnalysisResults"),
    "ResultCache": ("legacy.analyze", "ResultCache"),
    "UnifiedConfig": ("legacy.unified_config", "UnifiedConfig"),
}


def __getattr__(name: str) -> Any:
    # the callback imports transformers: load it when first asked for
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METRICS",
    "AnalysisResults",
    "ResultCache",
    "UnifiedConfig",
    "analyze_models",
    "MemoryBudget",
    "Metric",
    "MetricResult",
    "MetricSuite",
    "Probe",
    "Record",
    "SpikeTrigger",
    "UMACallback",
    "UMAConfig",
    "__version__",
    "attach",
    "backfill",
    "Session",
]
