"""AdamW with no weight decay on norms and biases, and the learning-rate schedule as a pure function."""

from __future__ import annotations

import math
from typing import Any

import torch

from sft.config import TrainConfig


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``train.warmup`` is a fraction of the run when below 1, else a number of steps.

    >>> from sft.config import TrainConfig
    >>> warmup_steps(TrainConfig(warmup=0.1), 50), warmup_steps(TrainConfig(warmup=3), 50)
    (5, 3)
    """
    return round(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    >>> from sft.config import TrainConfig
    >>> c = TrainConfig(lr=1.0, warmup=2, schedule="cosine")
    >>> [round(lr_at(s, 6, c), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - warm)
    progress = (step - warm) / span
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; 1-D tensors (norm weights, biases) get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        foreach=True,
    )
