"""Packing: group examples into rows of at most ``max_length`` tokens (best-fit-decreasing).

Pure functions on lengths; collate.py turns a bin of examples into one row whose position_ids
restart at 0 per example, which makes attention block-diagonal (no cross-example attention).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from sft.data.progress import Progress
from sft.errors import SftError


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Group indices into bins whose total length is <= capacity.

    Longest first (ties: lower index first); each goes to the fullest bin it fits in (ties: the
    older bin), else a new bin. Deterministic; O(n log n) searches over the bins that can still
    take an example (a bin with less space than the shortest example is set aside: it could never
    be chosen, and keeping it would make every insertion O(bins)). Progress on stderr as ``pack``.

    >>> best_fit_decreasing([5, 2, 3, 1], capacity=6)
    [[0, 3], [2, 1]]
    >>> best_fit_decreasing([], capacity=4)
    []
    """
    if capacity <= 0:
        raise SftError(f"data.max_length: {capacity} must be positive; set data.max_length to e.g. 2048")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    too_long = np.flatnonzero(lens > capacity)
    if len(too_long):
        first = int(too_long[0])
        raise SftError(
            f"packing: {len(too_long)} examples are longer than max_length={capacity} (first: index "
            f"{first}, {int(lens[first])} tokens); truncate or drop them before packing"
        )
    order = np.argsort(-lens, kind="stable").tolist()  # longest first, ties by index
    sizes = lens.tolist()
    shortest = min(sizes, default=0)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted; only bins that fit `shortest`
    progress = Progress("pack", len(order), unit="examples")
    for k, i in enumerate(order):
        n = sizes[i]
        j = bisect.bisect_left(free, (n, -1))  # the smallest space >= n, oldest bin among equals
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n >= shortest:
            bisect.insort(free, (space - n, b))
        if k % 65536 == 65535:
            progress.update(65536)
    progress.update(len(order) % 65536)
    progress.close()
    return bins


def packing_efficiency(lengths: Sequence[int] | np.ndarray, bins: list[list[int]], capacity: int) -> float:
    """Fraction of the bins' token slots that hold real tokens (1.0 = no padding at all).

    >>> packing_efficiency([5, 2, 3, 1], [[0, 3], [2, 1]], capacity=6)
    0.9166666666666666
    """
    if not bins:
        return 0.0
    return int(sum(lengths[i] for b in bins for i in b)) / (len(bins) * capacity)
