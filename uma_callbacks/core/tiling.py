"""Do boxes tile a tensor exactly? An O(n log n) check, for the chunks of a sharded checkpoint.

A chunk is a half-open box ``[offsets, offsets + sizes)`` in the index space of its tensor.
The chunks of a tensor must cover each of its entries exactly once. Comparing every pair
of chunks is O(n^2) (100,000 chunks: about an hour); this module decides the same thing
with one sort of the chunks' corners.

Why corners decide it. In one dimension ``1[o <= x < o + s] = H(x - o) - H(x - o - s)``
with ``H(t) = 1[t >= 0]``; a box's indicator is the product over its dimensions, which
expands into a signed sum over its ``2^d`` corners ``c``: ``sign(c) * prod_k H(x_k - c_k)``,
``sign(c) = (-1)^(number of upper coordinates in c)``. The functions
``x -> prod_k H(x_k - c_k)`` of distinct points ``c`` are linearly independent, so the sum of
the chunks' indicators equals the tensor's indicator (every entry covered exactly once) if
and only if, point by point, the chunks' signed corner weights add up to the tensor's own.
That is exact for any layout (grids, uneven splits, pinwheels), needs no volume argument,
and costs one sort of ``n 2^d`` corner points (:func:`numpy.unique`).

When it fails, the lexicographically first point ``p`` whose weight is off is an entry
whose coverage is wrong (every other point ``c <= p`` is lexicographically smaller, so its
weight matches): covered twice or more (the two chunks holding it are named) or by none.

Dimensions that every chunk spans whole are dropped first (they factor out of every
indicator), and empty chunks too (their corner weights cancel). The work is bounded:
more than :data:`MAX_CORNERS` corner points is refused rather than checked slowly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: The most corner points (chunks x 2^split dimensions) checked; more is refused.
MAX_CORNERS = 2**23


def tiling_fault(
    size: Sequence[int], boxes: Sequence[tuple[Sequence[int], Sequence[int]]], what: str = "chunks"
) -> str | None:
    """Why ``boxes`` (``(offsets, sizes)`` pairs) do not tile a tensor of ``size`` exactly; None when they do.

    Each box must already lie inside ``size`` with one offset and one size per dimension
    (non-negative ints below 2**62), as :func:`uma_callbacks.core.dcp.plan_dcp` checks first.

    Returns:
        None, or a sentence naming the boxes ``what``: the volumes differ; ``two <what>
        overlap at <entry>`` (with both boxes' offsets); ``two <what> overlap somewhere: the
        entry <p> lies in none``; or the check would be too large (:data:`MAX_CORNERS`).

    Example:
        >>> tiling_fault((4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))]) is None
        True
        >>> tiling_fault((4,), [((0,), (3,)), ((2,), (1,))])
        'two chunks overlap at (2,): offsets (0,) and (2,)'
    """
    size = tuple(int(n) for n in size)
    volume = sum(math.prod(s) for _, s in boxes)
    if volume != math.prod(size):
        return f"the {what} hold {volume} entries, its size {size} has {math.prod(size)}"
    if volume == 0:
        return None  # an empty tensor: every chunk is empty too
    solid = [(tuple(o), tuple(s)) for o, s in boxes if math.prod(s) > 0]
    split = [k for k in range(len(size)) if any(o[k] != 0 or s[k] != size[k] for o, s in solid)]
    if not split:  # every box is the whole tensor, and the volumes match: there is exactly one
        return None
    d = len(split)
    if (len(solid) + 1) << d > MAX_CORNERS:
        return (
            f"{len(solid)} {what} split along {d} dimension(s) are too many to check "
            f"(more than {MAX_CORNERS} corner points)"
        )
    lower = np.array([o for o, _ in solid], dtype=np.int64).reshape(len(solid), -1)[:, split]
    extent = np.array([s for _, s in solid], dtype=np.int64).reshape(len(solid), -1)[:, split]
    whole = np.array([[size[k] for k in split]], dtype=np.int64)
    points, weights = [], []
    for mask in range(1 << d):
        upper = np.array([(mask >> k) & 1 for k in range(d)], dtype=np.int64)
        sign = -1 if mask.bit_count() % 2 else 1
        points += [lower + upper * extent, upper * whole]
        weights += [np.full(len(solid), sign, dtype=np.int64), np.array([-sign], dtype=np.int64)]
    unique, residual = _summed(np.concatenate(points), np.concatenate(weights), [size[k] for k in split])
    off = np.flatnonzero(residual)
    if off.size == 0:
        return None
    p = unique[off[0]]
    covered = int(residual[off[0]]) + 1  # the coverage of p (p lies inside the tensor: see the module note)
    entry = _full_entry(p, split, len(size))
    if covered <= 0:
        return f"two {what} overlap somewhere: the entry {entry} lies in none of them"
    holders = np.flatnonzero(np.all((lower <= p) & (p < lower + extent), axis=1))[:2]
    names = " and ".join(str(solid[i][0]) for i in holders)
    return f"two {what} overlap at {entry}: offsets {names}"


def _full_entry(p: np.ndarray, split: list[int], ndim: int) -> tuple[int, ...]:
    """The entry ``p`` (given in the split dimensions) in all ``ndim`` dimensions (0 elsewhere)."""
    full = [0] * ndim
    for k, value in zip(split, p.tolist()):
        full[k] = int(value)
    return tuple(full)


def _summed(points: np.ndarray, weights: np.ndarray, size: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct points in lexicographic order, the summed weight of each)``.

    Points (coordinates in ``[0, size_k]``) are sorted as one mixed-radix int64 key when
    the key fits (a 1-d sort, several times faster than sorting rows), else as rows.
    """
    if math.prod(n + 1 for n in size) < 2**62:
        radix = np.array([math.prod(n + 1 for n in size[k + 1 :]) for k in range(len(size))], dtype=np.int64)
        keys, inverse = np.unique(points @ radix, return_inverse=True)
        first = np.zeros(len(keys), dtype=np.int64)
        first[inverse] = np.arange(len(points))
        unique = points[first]
    else:
        unique, inverse = np.unique(points, axis=0, return_inverse=True)
    return unique, np.bincount(inverse.reshape(-1), weights=weights, minlength=len(unique))
