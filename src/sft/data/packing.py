"""Packing: group examples into rows of at most ``max_length`` tokens (best-fit-decreasing).

Pure functions on lengths; collate.py turns a bin of examples into one row whose position_ids
restart at 0 per example, which makes attention block-diagonal (no cross-example attention).
"""

from __future__ import annotations

import bisect

from sft.errors import SftError


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group indices into bins whose total length is <= capacity.

    Longest first (ties: lower index first); each goes to the fullest bin it fits in (ties: the
    older bin), else a new bin. Deterministic; O(n log n) searches.

    >>> best_fit_decreasing([5, 2, 3, 1], capacity=6)
    [[0, 3], [2, 1]]
    >>> best_fit_decreasing([], capacity=4)
    []
    """
    if capacity <= 0:
        raise SftError(f"data.max_length: {capacity} must be positive; set data.max_length to e.g. 2048")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise SftError(
            f"packing: {len(too_long)} examples are longer than max_length={capacity} (first: index "
            f"{too_long[0]}, {lengths[too_long[0]]} tokens); truncate or drop them before packing"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))  # the smallest space >= n, oldest bin among equals
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    return bins


def packing_efficiency(lengths: list[int], bins: list[list[int]], capacity: int) -> float:
    """Fraction of the bins' token slots that hold real tokens (1.0 = no padding at all).

    >>> packing_efficiency([5, 2, 3, 1], [[0, 3], [2, 1]], capacity=6)
    0.9166666666666666
    """
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * capacity)
