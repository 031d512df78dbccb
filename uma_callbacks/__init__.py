"""uma-callbacks: training-geometry diagnostics as Trainer callbacks and Accelerate hooks."""

from .metrics import METRICS, Metric, MetricResult
from .probe import Probe

__version__ = "0.1.0"

__all__ = ["METRICS", "Metric", "MetricResult", "Probe", "__version__"]
