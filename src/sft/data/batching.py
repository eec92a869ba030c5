"""The run's plan of optimizer steps: which examples go into which micro-batch, for every step.

A pure function of the example lengths, the config and the seed, so resuming at step N is
just "start at plan[N]": no batch is replayed or skipped. Under torchrun each rank takes every
world_size-th micro-batch of a step.
"""

from __future__ import annotations

import math
import random

from sft.data.packing import best_fit_decreasing

Row = list[int]  # example indices packed into one sequence (one index when not packing)
Step = list[list[Row]]  # the micro-batches of one optimizer step, each a list of rows


def plan_steps(
    lengths: list[int],
    batch_size: int,
    grad_accum: int,
    packing: bool,
    max_length: int,
    epochs: float,
    max_steps: int | None,
    seed: int,
) -> list[Step]:
    """Every optimizer step of the run, each a list of ``grad_accum`` micro-batches.

    With packing a micro-batch is ``batch_size`` bins of at most ``max_length`` tokens, one row
    each; without, ``batch_size`` rows of one sequence each. Each epoch is reshuffled with
    ``seed + epoch``; the last step of an epoch may hold fewer micro-batches.

    >>> plan_steps([3, 3, 3, 3], 1, 2, False, 8, 1.0, None, seed=0)
    [[[[2]], [[0]]], [[[1]], [[3]]]]
    """
    if not lengths:
        return []
    units: list[list[int]] = (
        best_fit_decreasing(lengths, max_length) if packing else [[i] for i in range(len(lengths))]
    )
    micro_per_epoch = math.ceil(len(units) / batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / grad_accum)
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    plan: list[Step] = []
    epoch = 0
    while len(plan) < total:
        order = list(range(len(units)))
        random.Random(seed + epoch).shuffle(order)
        micro: list[list[Row]] = [
            [units[u] for u in order[k : k + batch_size]] for k in range(0, len(order), batch_size)
        ]
        for k in range(0, len(micro), grad_accum):
            plan.append(micro[k : k + grad_accum])
            if len(plan) == total:
                break
        epoch += 1
    return plan
