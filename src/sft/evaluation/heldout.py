"""Held-out loss: mean token cross-entropy over exactly the tokens training would train.

The one implementation used during training (``eval.every``), at its end, and by ``sft eval``;
it runs under the training precision so before/during/after figures are comparable. Under
torchrun the batches are split over the ranks and the sums all-reduced, so every rank gets the
one-process result (up to the order of a float64 sum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sft.config import Config
from sft.data.collate import collate_padded
from sft.data.types import Example
from sft.training.distributed import all_sum, forward_loss, rank_and_world
from sft.training.precision import autocast


def heldout_loss(model: Any, examples: Sequence[Example], pad_id: int, cfg: Config) -> tuple[float | None, int]:
    """(mean CE over the trained tokens of ``examples``, their count); None when nothing is trained.

    Examples are batched by similar length (``eval.batch_size`` at a time) and padded; rank r
    scores batches r, r + world, ... ``model`` is the plain model or the DDP / FSDP2 module.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # similar lengths together
    bs = max(1, cfg.eval.batch_size)
    batches = [order[k : k + bs] for k in range(0, len(order), bs)]
    rank, world = rank_and_world()
    mine = batches[rank::world]
    # FSDP2 all-gathers weights in every forward: each rank runs the same number of them
    weights = [1.0] * len(mine) + [0.0] * (math.ceil(len(batches) / world) - len(mine))
    mine += [batches[0]] * (len(weights) - len(mine))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), autocast(cfg):
            for idx, w in zip(mine, weights):
                batch = collate_padded([examples[i] for i in idx], pad_id)
                loss_sum, n = forward_loss(model, {key: v.to(device) for key, v in batch.items()})
                if w:
                    total += float(loss_sum)
                    count += n
    finally:
        model.train(was_training)
    total, n_all = all_sum([total, float(count)], device)
    count = int(n_all)
    return (total / count if count else None), count


def heldout_losses(model: Any, examples: Sequence[Example], pad_id: int, cfg: Config) -> list[tuple[float, int]]:
    """(CE sum, trained tokens) of each example, in the order of ``examples``: what the intervals
    and paired tests of ``eval_loss`` resample (``sft.evaluation.stats``). Their totals give the
    same mean as ``heldout_loss``. One example per forward pass (no padding); rank r scores
    examples r, r + world, ... and the per-example sums are all-reduced."""
    device = next(model.parameters()).device
    rank, world = rank_and_world()
    sums, counts = [0.0] * len(examples), [0.0] * len(examples)
    mine = list(range(rank, len(examples), world))
    # FSDP2 all-gathers weights in every forward: each rank runs the same number of them
    mine += [-1] * (math.ceil(len(examples) / world) - len(mine))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(cfg):
            for i in mine:
                batch = collate_padded([examples[max(i, 0)]], pad_id)
                loss_sum, n = forward_loss(model, {key: v.to(device) for key, v in batch.items()})
                if i >= 0:
                    sums[i], counts[i] = float(loss_sum), float(n)
    finally:
        model.train(was_training)
    both = all_sum(sums + counts, device)
    return [(both[i], int(both[len(examples) + i])) for i in range(len(examples))]
