"""``train.precision``: what ``auto`` means on this machine, the dtype weights train in, and the
autocast context of a forward pass.

``bf16`` is *pure* bf16: weights, activations and gradients are bf16 (no per-matmul casts, half
the memory traffic) and the optimizer keeps an fp32 master copy of every bf16 weight
(``sft.training.optim.MasterAdamW``), so updates far below bf16's resolution (lr 2e-5 on a
weight of 0.05 is 1/2500 of it; bf16 resolves 1/256) still accumulate. ``fp32`` is unchanged:
fp32 weights, no autocast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sft.config import Config
from sft.training.distributed import device


def bf16_supported() -> bool:
    """A GPU with bf16, or a CPU with native bf16 matmuls (avx512_bf16 or AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: Config) -> str:
    """``bf16`` or ``fp32``: ``auto`` picks bf16 only where the hardware computes it natively
    (an avx2-only CPU runs bf16 matmuls ~40x slower than fp32)."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return p


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


def autocast(cfg: Config) -> Any:
    """The autocast context of a forward pass under ``cfg``'s precision.

    Pure-bf16 weights need no autocast; it stays on for bf16 so that a model that still has fp32
    weights (a LoRA adapter, an fp32 head) computes its matmuls in bf16 too. Disabled for fp32.
    """
    if resolve_precision(cfg) == "bf16":
        return torch.autocast(device_type=device().type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device().type, enabled=False)
