"""The run's plan of optimizer steps: which examples go into which micro-batch, for every step.

A pure function of the example lengths, the config and the seed, so resuming at step N is
just "start at plan[N]": no batch is replayed or skipped. Under torchrun each rank takes every
world_size-th micro-batch of a step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, overload

import numpy as np

from sft.data.packing import best_fit_decreasing

Row = list[int]  # example indices packed into one sequence (one index when not packing)
Step = list[list[Row]]  # the micro-batches of one optimizer step, each a list of rows


class StepPlan(Sequence[Step]):
    """The plan as flat arrays (a million examples: ~30 MB, not ~200 MB of nested Python lists):
    ``members`` the example indices of every row of the run in order, ``row_starts`` where each
    row starts in it, ``micro_starts`` where each micro-batch starts in the rows, ``step_starts``
    where each step starts in the micro-batches. ``plan[i]`` is step ``i`` as nested lists.

    >>> p = StepPlan([[[[2]], [[0, 1]]], [[[3]]]])
    >>> len(p), p[1], p == [[[[2]], [[0, 1]]], [[[3]]]]
    (2, [[[3]]], True)
    """

    def __init__(self, steps: Sequence[Step] = (), arrays: tuple[np.ndarray, ...] | None = None) -> None:
        if arrays is None:
            micro = [m for st in steps for m in st]
            rows = [r for m in micro for r in m]
            arrays = (np.asarray([i for r in rows for i in r], np.int64), _starts([len(r) for r in rows]),
                      _starts([len(m) for m in micro]), _starts([len(st) for st in steps]))
        self.members, self.row_starts, self.micro_starts, self.step_starts = arrays

    def __len__(self) -> int:
        return len(self.step_starts) - 1

    @overload
    def __getitem__(self, i: int) -> Step: ...
    @overload
    def __getitem__(self, i: slice) -> list[Step]: ...
    def __getitem__(self, i: int | slice) -> Step | list[Step]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        out: Step = []
        for m in range(int(self.step_starts[i]), int(self.step_starts[i + 1])):
            a, b = int(self.micro_starts[m]), int(self.micro_starts[m + 1])
            out.append([self.members[self.row_starts[r] : self.row_starts[r + 1]].tolist() for r in range(a, b)])
        return out

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return repr(list(self))


def _starts(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))]).astype(np.int64)


def plan_steps(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    grad_accum: int,
    packing: bool,
    max_length: int,
    epochs: float,
    max_steps: int | None,
    seed: int,
) -> StepPlan:
    """Every optimizer step of the run, each a list of ``grad_accum`` micro-batches.

    With packing a micro-batch is ``batch_size`` bins of at most ``max_length`` tokens, one row
    each; without, ``batch_size`` rows of one sequence each. Each epoch is reshuffled with
    ``seed + epoch``; the last step of an epoch may hold fewer micro-batches.

    >>> plan_steps([3, 3, 3, 3], 1, 2, False, 8, 1.0, None, seed=0)
    [[[[2]], [[0]]], [[[1]], [[3]]]]
    """
    n = len(lengths)
    if not n:
        return StepPlan()
    if packing:  # units as flat arrays: the bins' members and where each bin starts
        bins = best_fit_decreasing(lengths, max_length)
        unit_members = np.fromiter((i for b in bins for i in b), np.int64, n)
        unit_starts = _starts([len(b) for b in bins])
        del bins
    else:
        unit_members, unit_starts = np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)
    units = len(unit_starts) - 1
    unit_sizes = np.diff(unit_starts)
    micro_per_epoch = math.ceil(units / batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / grad_accum)
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    orders: list[np.ndarray] = []  # the units of each epoch, in the order they are trained
    micro_sizes: list[np.ndarray] = []  # units per micro-batch
    step_sizes: list[np.ndarray] = []  # micro-batches per step
    steps, epoch = 0, 0
    while steps < total:
        order = list(range(units))
        random.Random(seed + epoch).shuffle(order)  # the same order as ever: resume stays exact
        per_micro = np.full(micro_per_epoch, batch_size, np.int64)
        per_micro[-1] = units - batch_size * (micro_per_epoch - 1)
        per_step = np.full(steps_per_epoch, grad_accum, np.int64)
        per_step[-1] = micro_per_epoch - grad_accum * (steps_per_epoch - 1)
        take = min(steps_per_epoch, total - steps)
        if take < steps_per_epoch:  # the run ends inside this epoch
            per_step = per_step[:take]
            per_micro = per_micro[: int(per_step.sum())]
        orders.append(np.asarray(order[: int(per_micro.sum())], dtype=np.int64))
        del order
        micro_sizes.append(per_micro)
        step_sizes.append(per_step)
        steps += take
        epoch += 1
    unit_order = np.concatenate(orders)
    sizes = unit_sizes[unit_order]
    # members of each planned row: the unit's members, unit after unit
    at = np.repeat(unit_starts[unit_order], sizes) + np.arange(int(sizes.sum())) - np.repeat(_starts(sizes)[:-1], sizes)
    return StepPlan(arrays=(unit_members[at], _starts(sizes), _starts(np.concatenate(micro_sizes)),
                            _starts(np.concatenate(step_sizes))))
