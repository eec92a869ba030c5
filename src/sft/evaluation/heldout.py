"""Held-out loss: mean token cross-entropy over exactly the tokens training would train.

The one implementation used during training (``eval.every``), at its end, and by ``sft eval``;
it runs under the training precision so before/during/after figures are comparable. Under
torchrun the batches are split over the ranks and the sums all-reduced, so every rank gets the
one-process result (up to the order of a float64 sum).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sft.config import Config
from sft.data.collate import collate_padded
from sft.data.types import Example
from sft.training.distributed import all_sum, forward_loss, rank_and_world
from sft.training.precision import autocast


def heldout_loss(model: Any, examples: list[Example], pad_id: int, cfg: Config) -> tuple[float | None, int]:
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
