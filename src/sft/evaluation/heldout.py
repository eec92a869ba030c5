"""Held-out loss: mean token cross-entropy over exactly the tokens training would train.

The one implementation used during training (``eval.every``), at its end, and by ``sft eval``;
it runs under the training precision so before/during/after figures are comparable.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.config import Config
from sft.data.collate import collate_padded
from sft.data.types import Example
from sft.training.loss import token_loss_sum
from sft.training.precision import autocast


def heldout_loss(model: Any, examples: list[Example], pad_id: int, cfg: Config) -> tuple[float | None, int]:
    """(mean CE over the trained tokens of ``examples``, their count); None when nothing is trained.

    Examples are batched by similar length (``eval.batch_size`` at a time) and padded.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # similar lengths together
    bs = max(1, cfg.eval.batch_size)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), autocast(cfg):
            for k in range(0, len(order), bs):
                batch = collate_padded([examples[i] for i in order[k : k + bs]], pad_id)
                loss_sum, n = token_loss_sum(model, {key: v.to(device) for key, v in batch.items()})
                total += float(loss_sum)
                count += n
    finally:
        model.train(was_training)
    return (total / count if count else None), count
