"""Metrics: pure computations on ``(model, batches, loss_fn)``, one family per module.

``METRICS`` maps each string name (as used in ``UMACallback(metrics=[...])``) to its class.
"""

from .base import Cost, Metric, MetricResult
from .fisher import FisherInformation
from .gradient_flow import GradientFlow

METRICS: dict[str, type[Metric]] = {
    GradientFlow.name: GradientFlow,
    FisherInformation.name: FisherInformation,
}

__all__ = ["METRICS", "Cost", "FisherInformation", "GradientFlow", "Metric", "MetricResult"]
