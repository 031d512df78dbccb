"""Matrix-free linear algebra on the probe loss.

Per-sample gradients, Hessian- and Fisher-vector products, Lanczos and Hutchinson. Pure
functions; no tracker, no trigger.
"""

from uma_callbacks.linalg.per_sample import PerSampleGradients, flatten_params, per_sample_grads

__all__ = ["PerSampleGradients", "flatten_params", "per_sample_grads"]
