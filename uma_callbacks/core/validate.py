"""Bounds checks of constructor arguments: one ``ValueError`` naming the field and the range.

Every numeric setting a metric takes is checked at construction against a range wide
enough for any real use and narrow enough that a typo (``top_k=2**63``, a seed past what
the generators take) is refused instead of running to the time limit at every save or
wrapping to another seed. Booleans are refused where a number is asked for, and NaN or an
infinity wherever a finite number is (an infinite upper bound still asks for a finite
number).

Example:
    >>> check_int("HessianSpectrum.top_k", 10, 1, MAX_TOP_K)
    >>> check_int("HessianSpectrum.top_k", 2**63, 1, MAX_TOP_K)
    Traceback (most recent call last):
    ...
    ValueError: HessianSpectrum.top_k must be an integer in [1, 10000]; got 9223372036854775808
"""

from __future__ import annotations

import math
from typing import Any

#: The largest seed: ``torch.Generator.manual_seed`` reads a seed as 64 bits (2**64 raises,
#: a negative one wraps), numpy's ``default_rng`` takes any non-negative integer, and the
#: metrics derive further seeds by adding a few (``seed + 1``): [0, 2**63 - 1] keeps every
#: derived seed distinct and unwrapped.
MAX_SEED = 2**63 - 1
#: The most eigenpairs a spectrum metric computes (Lanczos never finds more than the
#: parameter count anyway; its basis grows with this).
MAX_TOP_K = 10_000
#: The most matrix-vector products / iterations of an iterative method.
MAX_ITERATIONS = 1_000_000
#: The most samples per chunk.
MAX_CHUNK = 2**31 - 1
#: The longest time limit of one metric, in seconds (about 116 days).
MAX_SECONDS = 1e7
#: The most points of a 1-D grid (a 2-D landscape evaluates the square of it).
MAX_GRID_POINTS = 1001
#: The most probe batches a metric can be asked to use.
MAX_BATCHES = 10**7
#: The most tokens an activation metric samples.
MAX_TOKENS = 10**8
#: The most random draws (Monte Carlo samples, Hutchinson probes, k-means restarts).
MAX_DRAWS = 100_000
#: The largest relative tolerance of an iterative method.
MAX_TOLERANCE = 100.0


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 80 characters (a hostile value never makes a huge message)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> str:
    def fmt(x: float) -> str:
        return (
            "inf" if math.isinf(x) else (str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}")
        )

    return f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"


def check_int(field_name: str, value: Any, lo: int, hi: int, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer in [lo, hi] (or ``None`` when allowed).

    Args:
        field_name: ``"<Class>.<argument>"``, named in the message.
        value: what was passed (a ``bool`` is refused).
        lo: the smallest allowed value.
        hi: the largest allowed value.
        allow_none: ``None`` is accepted too.

    Raises:
        ValueError: ``value`` is not such an integer; the message names ``field_name``, the range and the value.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        none = " or None" if allow_none else ""
        raise ValueError(f"{field_name} must be an integer in {_range(lo, hi)}{none}; got {_shown(value)}")


def check_number(
    field_name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in the range.

    Args:
        field_name: ``"<Class>.<argument>"``, named in the message.
        value: what was passed (a ``bool``, NaN and infinities are refused).
        lo: the lower bound.
        hi: the upper bound (``math.inf``: any finite number above ``lo``).
        lo_open: ``lo`` itself is excluded.
        hi_open: ``hi`` itself is excluded.
        allow_none: ``None`` is accepted too.

    Raises:
        ValueError: ``value`` is not such a number; the message names ``field_name``, the range and the value.
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            x = float(value)
        except OverflowError:  # an int too large for a float
            ok = False
        else:
            ok = math.isfinite(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
    if not ok:
        none = " or None" if allow_none else ""
        raise ValueError(
            f"{field_name} must be a finite number in {_range(lo, hi, lo_open, hi_open)}{none}; got {_shown(value)}"
        )


def check_seed(field_name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer seed in [0, :data:`MAX_SEED`].

    Raises:
        ValueError: ``value`` is not such an integer (``field_name`` is named in the message).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{field_name} must be an integer in [0, 2**63 - 1]; got {_shown(value)}")
