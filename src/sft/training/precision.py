"""``train.precision``: what ``auto`` means on this machine, and the autocast context for a step."""

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
    """``bf16`` or ``fp32``: ``auto`` picks bf16 only where the hardware computes it natively."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return p


def autocast(cfg: Config) -> Any:
    """The autocast context of a forward pass under ``cfg``'s precision (disabled for fp32)."""
    if resolve_precision(cfg) == "bf16":
        return torch.autocast(device_type=device().type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device().type, enabled=False)
