"""The plan of steps as flat arrays (sft.data.batching.StepPlan) gives the steps the nested-list
plan gave: the same order, so a run resumed at step N trains the same batches."""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest

from sft.data.batching import StepPlan, plan_steps
from sft.data.packing import best_fit_decreasing


def reference(lengths, batch_size, grad_accum, packing, max_length, epochs, max_steps, seed):
    """The nested-list plan as sft built it before the arrays (kept here as the oracle)."""
    units = best_fit_decreasing(lengths, max_length) if packing else [[i] for i in range(len(lengths))]
    micro_per_epoch = math.ceil(len(units) / batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / grad_accum)
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    plan, epoch = [], 0
    while len(plan) < total:
        order = list(range(len(units)))
        random.Random(seed + epoch).shuffle(order)
        micro = [[units[u] for u in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
        for k in range(0, len(micro), grad_accum):
            plan.append(micro[k : k + grad_accum])
            if len(plan) == total:
                break
        epoch += 1
    return plan


@pytest.mark.parametrize("packing,batch,accum,epochs,max_steps", [
    (True, 2, 3, 1.0, None), (False, 3, 2, 2.5, None), (True, 1, 4, 1.0, 11), (False, 4, 1, 1.0, 1),
    (True, 3, 2, 0.3, None),
])
def test_array_plan_equals_the_nested_list_plan(packing, batch, accum, epochs, max_steps):
    lengths = np.random.default_rng(0).integers(1, 60, size=97).tolist()
    got = plan_steps(lengths, batch, accum, packing, 64, epochs, max_steps, seed=7)
    want = reference(lengths, batch, accum, packing, 64, epochs, max_steps, seed=7)
    assert isinstance(got, StepPlan) and len(got) == len(want)
    assert [got[i] for i in range(len(got))] == want
    assert got[-1] == want[-1] and got[1:3] == want[1:3]
    other = reference(lengths, batch, accum, packing, 64, epochs, max_steps, seed=8)
    assert list(got) != other  # control: the comparison sees a different order


def test_plan_holds_arrays_not_lists():
    lengths = [100] * 200_000
    plan = plan_steps(lengths, 4, 2, True, 2048, 1.0, None, seed=0)
    held = sum(a.nbytes for a in (plan.members, plan.row_starts, plan.micro_starts, plan.step_starts))
    assert held < 8 * 200_000 * 1.2  # ~8 bytes an example
    nested = reference(lengths[:20_000], 4, 2, True, 2048, 1.0, None, seed=0)  # control: a tenth as lists
    assert sys.getsizeof(nested) + sum(sys.getsizeof(r) for st in nested for m in st for r in m) > held / 10
    assert plan_steps([], 1, 1, True, 8, 1.0, None, seed=0) == [] and len(plan_steps([], 1, 1, True, 8, 1.0, None, 0)) == 0
