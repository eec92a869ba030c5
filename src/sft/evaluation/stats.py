"""The statistics behind every figure ``sft eval`` and ``sft compare`` print: how sure a number is.

- ``wilson``: a 95% interval for a rate k/n (task accuracy, stop rate, refusal ...). Unlike the
  normal approximation it stays inside [0, 1] and is not zero-width at 0/n or n/n.
- ``bootstrap_mean``: a percentile bootstrap interval for the mean of per-example values (held-out
  loss per example, reference NLL per window), seeded so a report is reproducible.
- ``mcnemar``: the exact McNemar test for two rates measured on the SAME rows (before/after, two
  trials): only rows where the two disagree carry information, and under "no difference" each
  of them goes either way with probability 1/2 (a two-sided binomial test).
- ``paired_bootstrap``: the difference of two means over the same examples, its interval, and a
  two-sided p-value (the bootstrap distribution of the paired differences, centred on 0).

Pure functions on Python lists; the only randomness is a ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
BOOTSTRAP_SAMPLES = 2000
ALPHA = 0.05


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials (95% by default); None for n = 0.

    >>> [round(x, 4) for x in wilson(8, 10)]
    [0.4902, 0.9433]
    >>> [round(x, 4) for x in wilson(0, 8)]
    [0.0, 0.3244]
    >>> wilson(0, 0) is None
    True
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} is not between 0 and n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binom_two_sided(k: int, n: int) -> float:
    """Two-sided exact p-value of k successes in n fair coin flips (the doubled smaller tail).

    >>> round(binom_two_sided(1, 10), 6)
    0.021484
    >>> binom_two_sided(5, 10), binom_two_sided(0, 0)
    (1.0, 1.0)
    """
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2.0**n
    return min(1.0, 2 * tail)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test of paired outcomes: (rows only ``a`` got right, rows only ``b`` got right, p).

    >>> mcnemar([True, True, False, False], [True, False, True, True])
    (1, 2, 1.0)
    """
    if len(a) != len(b):
        raise ValueError(f"mcnemar: {len(a)} and {len(b)} outcomes; pair the same rows")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b, binom_two_sided(only_a, only_a + only_b)


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


Stat = Callable[[list[int]], float]  # a figure computed from the examples at these indices


def _resample(n: int, samples: int, seed: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    everything = range(n)
    for _ in range(samples):
        yield rng.choices(everything, k=n)


def bootstrap(stat: Stat, n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
              alpha: float = ALPHA) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``stat`` over ``n`` examples; None for fewer than 2.

    ``stat`` gets a list of example indices (a resample with replacement) and returns the figure:
    a mean, or a ratio of sums such as loss per token (``ratio``).

    >>> xs = [1.0, 2.0, 3.0, 4.0]
    >>> lo, hi = bootstrap(lambda idx: sum(xs[i] for i in idx) / len(idx), len(xs))
    >>> 1.0 <= lo < 2.5 < hi <= 4.0
    True
    """
    if n < 2:
        return None
    values = sorted(stat(idx) for idx in _resample(n, samples, seed))
    return _quantile(values, alpha / 2), _quantile(values, 1 - alpha / 2)


def paired(stat_a: Stat, stat_b: Stat, n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
           alpha: float = ALPHA) -> tuple[float, tuple[float, float] | None, float]:
    """(B - A on all examples, its paired bootstrap interval, two-sided p) for two figures
    computed on the SAME examples: each resample draws one set of indices for both.

    The p-value is the share of bootstrap differences, centred on the observed one, at least as
    far from it as the observed difference is from 0 (+1 in both counts, so never exactly 0).
    """
    everything = list(range(n))
    diff = stat_b(everything) - stat_a(everything) if n else 0.0
    if n < 2:
        return diff, None, 1.0
    diffs = sorted(stat_b(idx) - stat_a(idx) for idx in _resample(n, samples, seed))
    ci = (_quantile(diffs, alpha / 2), _quantile(diffs, 1 - alpha / 2))
    if max(abs(d - diff) for d in diffs) <= 1e-12 * (1 + abs(diff)):  # every example moved by the same amount: no noise
        return diff, ci, 1.0 if diff == 0 else 1.0 / (samples + 1)
    extreme = sum(1 for d in diffs if abs(d - diff) >= abs(diff))
    return diff, ci, (extreme + 1) / (samples + 1)


def mean_of(xs: Sequence[float]) -> Stat:
    """The mean of ``xs`` over a resample."""
    return lambda idx: sum(xs[i] for i in idx) / len(idx)


def ratio(nums: Sequence[float], dens: Sequence[float], transform: Callable[[float], float] = float) -> Stat:
    """``transform(sum(nums) / sum(dens))`` over a resample: loss per token (and perplexity with
    ``transform=math.exp``) where examples have different numbers of tokens.

    >>> ratio([2.0, 6.0], [1, 3])([0, 1]), ratio([2.0, 6.0], [1, 3])([0, 0])
    (2.0, 2.0)
    """
    def stat(idx: list[int]) -> float:
        d = sum(dens[i] for i in idx)
        return transform(sum(nums[i] for i in idx) / d) if d else math.nan
    return stat


def bootstrap_mean(
    xs: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``xs``; None for fewer than 2 values.

    >>> bootstrap_mean([1.0, 1.0, 1.0])
    (1.0, 1.0)
    >>> lo, hi = bootstrap_mean([float(i) for i in range(10)])
    >>> lo < 4.5 < hi
    True
    """
    return bootstrap(mean_of(xs), len(xs), samples, seed, alpha)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, tuple[float, float] | None, float]:
    """(mean of b - a, its bootstrap interval, two-sided p) over paired values of the same examples.

    >>> d, ci, p = paired_bootstrap([2.0, 2.1, 1.9, 2.0], [1.0, 1.1, 0.9, 1.0])
    >>> round(d, 6), [round(x, 6) for x in ci], p < 0.05
    (-1.0, [-1.0, -1.0], True)
    """
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} and {len(b)} values; pair the same examples")
    return paired(mean_of(a), mean_of(b), len(a), samples, seed, alpha)


def verdict(diff: float, p: float, higher_is_better: bool | None, alpha: float = ALPHA) -> str:
    """The plain-words result of a paired test of B against A.

    >>> verdict(0.2, 0.001, True), verdict(0.2, 0.001, False), verdict(0.2, 0.3, True)
    ('better', 'worse', 'no detectable difference at 95%')
    >>> verdict(0.2, 0.001, None)
    'different'
    """
    if p >= alpha or diff == 0:
        return f"no detectable difference at {1 - alpha:.0%}"
    if higher_is_better is None:
        return "different"
    return "better" if (diff > 0) == higher_is_better else "worse"
