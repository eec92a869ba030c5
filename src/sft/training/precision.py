"""``train.precision``: the dtype weights load and train in.

``bf16`` is *pure* bf16: weights, activations and gradients are bf16 (no per-matmul casts, half
the memory traffic) and the optimizer keeps an fp32 master copy of every bf16 weight
(``sft.training.optim.MasterAdamW``), so updates far below bf16's resolution (lr 2e-5 on a
weight of 0.05 is 1/2500 of it; bf16 resolves 1/256) still accumulate. ``fp32`` is unchanged:
fp32 weights, no autocast.

``train.compile`` (``use_compile``) is decided here too: whether compiling pays depends on the
precision and the device.

What ``auto`` means here (``resolve_precision``) and the autocast of a forward pass
(``Runtime.autocast``) are in ``sft.runtime``: evaluation needs them too.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.config import Config
from sft.lm.attention import use_padding_free
from sft.runtime import Runtime, resolve_precision

# ``train.compile: auto`` compiles runs of at least this many optimizer steps: compiling SmolLM2's
# block and loss took 22.7 s with a cold inductor cache (2 s warm) on the 2-core AMD EPYC, and
# saves ~0.5 s of a ~4.2 s 4 x 512 step there (bench/RESULTS.md, issue 21): a few steps do not
# pay it back (a warm cache would), 50 do.
AUTO_COMPILE_MIN_STEPS = 50


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


def use_compile(cfg: Config, rt: Runtime, steps: int | None) -> bool:
    """``train.compile``: true/false as given; ``auto`` compiles one-process runs of at least
    AUTO_COMPILE_MIN_STEPS steps on CUDA or in bf16 on a CPU (fp32 on a CPU gains little: its
    time is in matmuls, not in the elementwise work that compilation fuses). ``auto`` stays off
    for qlora (bitsandbytes' 4-bit layers), under torchrun (compiled blocks inside DDP/FSDP2 are
    not tested here) and with varlen attention on CUDA: its document boundaries (``cu_seqlens``,
    one entry per document, and the longest document) reach every block, so each batch would
    compile anew. None of the CUDA cases has been measured (no GPU was lent to issue 21)."""
    choice = cfg.train.compile
    if choice != "auto":
        return bool(choice)
    if rt.world > 1 or cfg.train.method == "qlora" or (steps is not None and steps < AUTO_COMPILE_MIN_STEPS):
        return False
    if rt.device.type == "cuda":
        return not use_padding_free(cfg, rt.device)
    return resolve_precision(cfg) == "bf16"
