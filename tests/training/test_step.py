"""THE step (sft.training.step): how a step's micro-batches are split over ranks, with exact
expected outputs, and what each rank feeds forward/backward.

The split is the pure function ``sft.runtime.share(n, rank, world)``: rank r takes micro-batches
r, r + world, ...; a rank short of them repeats one with weight 0 so every rank runs the same
number of forward/backward passes (their collectives must pair up).
"""

from __future__ import annotations

import pytest

from sft.config import load_config
from sft.data.types import IGNORE, Example
from sft.runtime import Runtime, share
from sft.training.step import step_batches


@pytest.mark.parametrize(
    ("n", "world", "expected"),
    [
        (4, 1, [[(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]]),  # one process: everything, in order
        (4, 2, [[(0, 1.0), (2, 1.0)], [(1, 1.0), (3, 1.0)]]),
        (3, 2, [[(0, 1.0), (2, 1.0)], [(1, 1.0), (1, 0.0)]]),  # 3 micro-batches on 2 ranks: [1,1] and [1,0]
        (1, 2, [[(0, 1.0)], [(0, 0.0)]]),  # 1 on 2 (a short last step): rank 1 repeats micro-batch 0, weight 0
        (5, 3, [[(0, 1.0), (3, 1.0)], [(1, 1.0), (4, 1.0)], [(2, 1.0), (2, 0.0)]]),
        (2, 4, [[(0, 1.0)], [(1, 1.0)], [(0, 0.0)], [(0, 0.0)]]),
        (0, 2, [[], []]),
    ],
)
def test_share_gives_exact_micro_batches_and_weights(n, world, expected):
    assert [share(n, r, world) for r in range(world)] == expected


def test_share_trains_every_micro_batch_once_and_balances_the_ranks():
    for world in range(1, 6):
        for n in range(0, 13):
            parts = [share(n, r, world) for r in range(world)]
            trained = sorted(i for p in parts for i, w in p if w == 1.0)
            assert trained == list(range(n)), (n, world)  # each once, with weight 1
            assert len({len(p) for p in parts}) == 1, (n, world)  # same number of passes on every rank
            fillers = [w for p in parts for _, w in p if w != 1.0]
            assert fillers == [0.0] * (world * -(-n // world) - n), (n, world)  # only the padding has weight 0


def example(ids: list[int], trained_from: int) -> Example:
    return Example(ids, [IGNORE] * trained_from + ids[trained_from:])


def test_rank_one_of_two_takes_its_micro_batch_and_a_weight_zero_repeat(monkeypatch):
    """A step of 3 micro-batches seen by rank 1 of 2: micro-batch 1, then micro-batch 1 again with
    weight 0; the token counts are its own (the all-reduce, patched out here, adds rank 0's)."""
    monkeypatch.setattr(Runtime, "all_reduce", lambda self, t: t)
    cfg = load_config(None, ["--data.packing=false"])
    examples = [example([1, 2, 3, 4], 2), example([5, 6, 7], 1), example([8, 9], 0), example([10, 11, 12], 3)]
    step = [[[0]], [[1], [2]], [[3]]]  # micro-batches -> rows -> example indices
    batches, n_trained, n_tokens, weights = step_batches(step, examples, cfg, 0, Runtime(rank=1, world=2))
    assert weights == [1.0, 0.0]
    assert batches[0] is batches[1]  # the repeat is the same tensors, not another micro-batch
    assert batches[0]["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    # trained targets (labels[:, 1:] != IGNORE): [6, 7] of example 1 and [9] of example 2
    assert (n_trained, n_tokens) == (3, 5)
    # control: rank 0 of the same step gets micro-batches 0 and 2, both with weight 1
    b0, t0, k0, w0 = step_batches(step, examples, cfg, 0, Runtime(rank=0, world=2))
    assert w0 == [1.0, 1.0] and [b["input_ids"].tolist() for b in b0] == [[[1, 2, 3, 4]], [[10, 11, 12]]]
    assert (t0, k0) == (2, 7)
