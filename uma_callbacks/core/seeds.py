"""The one seed rule for metrics given by name and metrics given as objects.

A metric's estimators (MC labels, Lanczos start vectors, Hutchinson probes, landscape
directions, token samples, k-means) are seeded by its ``seed``. The rule: a metric takes
the run's seed (``UMAConfig.seed``, ``UnifiedConfig.seed``, the command's ``--seed``; 42
unless set) unless it sets its own, whether it is named (``"fisher"``) or built
(``FisherInformation()``). A metric built without a seed and used on its own takes
:data:`DEFAULT_SEED`, the run's default.

So ``UMACallback(metrics=["fisher"])`` and ``UMACallback(metrics=[FisherInformation()])``
measure the same values under the same cache key, at any run seed; ``FisherInformation(seed=3)``
and ``"fisher:seed=3"`` keep 3. The seed a metric used is in its ``config()``.
"""

from __future__ import annotations

from typing import Any


class DefaultSeed(int):
    """An ``int`` seed a constructor got by default, not from the caller (equal to its value).

    It behaves as the plain integer everywhere (arithmetic, JSON, hashing, comparisons);
    its type only tells :func:`seed_given` that the run's seed may replace it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        """The plain integer's text."""
        return int.__repr__(self)


#: The seed of a metric built without one: the run's default seed (``UMAConfig.seed``).
DEFAULT_SEED = DefaultSeed(42)


def seed_given(value: Any) -> bool:
    """Whether ``value`` is a seed the caller chose (any value but a constructor's default)."""
    return not isinstance(value, DefaultSeed)
