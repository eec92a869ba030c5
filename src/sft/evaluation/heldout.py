"""Held-out loss: mean token cross-entropy over exactly the tokens training would train.

The one implementation used during training (``eval.every``), at its end, and by ``sft eval``;
it runs under the training precision so before/during/after figures are comparable. Under
torchrun the batches are split over the ranks and the sums all-reduced, so every rank gets the
one-process result (up to the order of a float64 sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sft.config import Config
from sft.data.collate import collate_padded
from sft.data.types import Example
from sft.lm.loss import forward_loss
from sft.runtime import Runtime


def heldout_loss(
    model: Any, examples: Sequence[Example], pad_id: int, cfg: Config, rt: Runtime
) -> tuple[float | None, int]:
    """(mean CE over the trained tokens of ``examples``, their count); None when nothing is trained.

    Examples are batched by similar length (``eval.batch_size`` at a time) and padded; rank r
    scores batches r, r + world, ... ``model`` is the plain model or the DDP / FSDP2 module.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # similar lengths together
    bs = max(1, cfg.eval.batch_size)
    batches = [order[k : k + bs] for k in range(0, len(order), bs)]
    # FSDP2 all-gathers weights in every forward: each rank runs the same number of them
    mine = rt.share(len(batches))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), rt.autocast():
            for k, w in mine:
                batch = collate_padded([examples[i] for i in batches[k]], pad_id)
                loss_sum, n = forward_loss(model, {key: v.to(device) for key, v in batch.items()})
                if w:
                    total += float(loss_sum)
                    count += n
    finally:
        model.train(was_training)
    total, n_all = rt.all_sum([total, float(count)])
    count = int(n_all)
    return (total / count if count else None), count


def heldout_losses(
    model: Any, examples: Sequence[Example], pad_id: int, cfg: Config, rt: Runtime
) -> list[tuple[float, int]]:
    """(CE sum, trained tokens) of each example, in the order of ``examples``: what the intervals
    and paired tests of ``eval_loss`` resample (``sft.evaluation.stats``). Their totals give the
    same mean as ``heldout_loss``. One example per forward pass (no padding); rank r scores
    examples r, r + world, ... and the per-example sums are all-reduced."""
    device = next(model.parameters()).device
    sums, counts = [0.0] * len(examples), [0.0] * len(examples)
    # FSDP2 all-gathers weights in every forward: each rank runs the same number of them
    mine = rt.share(len(examples))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), rt.autocast():
            for i, w in mine:
                batch = collate_padded([examples[i]], pad_id)
                loss_sum, n = forward_loss(model, {key: v.to(device) for key, v in batch.items()})
                if w:
                    sums[i], counts[i] = float(loss_sum), float(n)
    finally:
        model.train(was_training)
    both = rt.all_sum(sums + counts)
    return [(both[i], int(both[len(examples) + i])) for i in range(len(examples))]
