"""Best-fit-decreasing: capacity, completeness, determinism."""

from __future__ import annotations

import random

import pytest

from sft.data.packing import best_fit_decreasing, packing_efficiency
from sft.errors import SftError


def test_doctest_example_and_ties():
    assert best_fit_decreasing([5, 2, 3, 1], capacity=6) == [[0, 3], [2, 1]]
    # equal lengths keep index order; equal free space goes to the older bin
    assert best_fit_decreasing([2, 2, 2, 2], capacity=4) == [[0, 1], [2, 3]]
    assert best_fit_decreasing([3, 3, 1], capacity=4) == [[0, 2], [1]]
    assert best_fit_decreasing([4], capacity=4) == [[0]]


@pytest.mark.parametrize("seed", range(5))
def test_properties_on_random_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, capacity=128)
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)  # no bin over capacity
    assert sorted(i for b in bins for i in b) == list(range(500))  # every index exactly once
    assert bins == best_fit_decreasing(list(lengths), capacity=128)  # deterministic
    eff = packing_efficiency(lengths, bins, 128)
    assert sum(lengths) / (len(bins) * 128) == eff
    assert eff > 0.9  # BFD on uniform lengths wastes little
    # the lower bound on bins: no packing can use fewer than ceil(total / capacity)
    assert len(bins) >= -(-sum(lengths) // 128)


def test_errors_and_empty():
    assert best_fit_decreasing([], capacity=8) == []
    assert packing_efficiency([], [], 8) == 0.0
    with pytest.raises(SftError, match="longer than max_length=4"):
        best_fit_decreasing([1, 5], capacity=4)
    with pytest.raises(SftError, match="max_length"):
        best_fit_decreasing([1], capacity=0)


def _reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best fit decreasing as written before bins too full to take anything were set aside."""
    import bisect

    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))
        space, b = free.pop(j) if j < len(free) else (capacity, len(bins))
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - lengths[i], b))
    return bins


@pytest.mark.parametrize("seed", range(6))
def test_setting_full_bins_aside_changes_no_bin(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(rng.choice([1, 5]), rng.choice([8, 600, 2048])) for _ in range(rng.choice([50, 3000]))]
    assert best_fit_decreasing(lengths, 2048) == _reference_bfd(lengths, 2048)
    assert best_fit_decreasing(lengths, 2048) != _reference_bfd(lengths, 4096)  # control: the comparison can fail


def test_pack_progress_names_the_stage(monkeypatch, capsys):
    import sft.data.packing as packing

    class Now:
        t = 0.0

    def tick() -> float:
        Now.t += 5.0  # every reading of the clock is 5 s later: progress speaks at once
        return Now.t

    monkeypatch.setattr("sft.data.progress.time.monotonic", tick)
    packing.best_fit_decreasing([3] * 70_000, capacity=6)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("pack | 65536/70000 examples | ") and "eta" in err[0]
    assert err[-1].startswith("pack | 70000/70000 examples | ") and "done in" in err[-1]
