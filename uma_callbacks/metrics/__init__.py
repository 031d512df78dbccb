"""Metrics: pure computations on ``(model, batches, loss_fn)``, one family per module.

``METRICS`` maps each string name (as used in ``UMACallback(metrics=[...])``) to its class.
"""

from .base import Cost, Metric, MetricResult
from .fisher import FisherInformation
from .gradient_flow import GradientFlow
from .hessian import HessianSpectrum
from .interpolation import CheckpointInterpolation
from .landscape import LossLandscape

METRICS: dict[str, type[Metric]] = {
    GradientFlow.name: GradientFlow,
    HessianSpectrum.name: HessianSpectrum,
    LossLandscape.name: LossLandscape,
    CheckpointInterpolation.name: CheckpointInterpolation,
    FisherInformation.name: FisherInformation,
}

__all__ = [
    "METRICS",
    "CheckpointInterpolation",
    "Cost",
    "FisherInformation",
    "GradientFlow",
    "HessianSpectrum",
    "LossLandscape",
    "Metric",
    "MetricResult",
]
