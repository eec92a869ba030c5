"""``train.precision``: the dtype weights load and train in.

``bf16`` is *pure* bf16: weights, activations and gradients are bf16 (no per-matmul casts, half
the memory traffic) and the optimizer keeps an fp32 master copy of every bf16 weight
(``sft.training.optim.MasterAdamW``), so updates far below bf16's resolution (lr 2e-5 on a
weight of 0.05 is 1/2500 of it; bf16 resolves 1/256) still accumulate. ``fp32`` is unchanged:
fp32 weights, no autocast.

What ``auto`` means here (``resolve_precision``) and the autocast of a forward pass
(``Runtime.autocast``) are in ``sft.runtime``: evaluation needs them too.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.config import Config
from sft.runtime import resolve_precision


def train_dtype(cfg: Config) -> torch.dtype:
    """The dtype the model's weights are loaded in and trained in."""
    return torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32


def to_train_dtype(model: Any, cfg: Config) -> Any:
    """Cast floating-point weights and buffers to ``train_dtype`` (a no-op when they already are).

    Rotary inverse frequencies stay fp32, as ``from_pretrained(dtype=bf16)`` leaves them:
    rounding them to bf16 would shift the angles of distant positions.
    """
    kept = {name: b for name, b in model.named_buffers() if name.endswith("inv_freq")}
    model.to(train_dtype(cfg))
    for name, b in kept.items():  # .to() replaced the buffers; put the fp32 originals back
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, b)
    return model
