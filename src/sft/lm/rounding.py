"""Stochastic rounding of fp32 values to bf16: up with a probability equal to the fraction of a bf16
step that the value lies above the lower neighbour, so the rounded value is the fp32 one on average.

Why it matters here (``bench/bf16_quality.py``, bench/RESULTS.md): a fine-tune at lr 2e-5 moves
most weights by less than half a bf16 step (2^-9 of the weight) in 60 steps. Rounding to nearest
snaps every such weight back to where it started, so a bf16 copy of the trained weights loses most
of the fine-tune: on SmolLM2-135M, the fp32 master of a bf16 run scored 1.5970 held-out, its
nearest bf16 rounding 1.6176, its stochastic rounding as well as the master. It is used for the
bf16 weights a bf16 run computes with (``MasterAdamW``) and for a ``final/`` saved in bf16.

The rounding adds 16 random bits below a bf16 mantissa and truncates: an fp32 whose low 16 bits are
``f`` (of 65536) rounds away from zero with probability ``f / 65536``. The random bits come from a
seeded generator (a resume draws the same bits): one block of ``CHUNK`` values reused for every
block of a tensor, and, for the many tensors of one optimizer step, one ``Noise`` drawn once per
step from which each tensor reads its block at an offset of its own (drawing a block per tensor
took 93 of the 132 ms that rounding SmolLM2-135M's 272 tensors cost). Each value's own draw is
uniform, which is all unbiasedness needs; within a block, neighbouring values (a row of a weight)
get independent bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 18  # values per pass: the int32 temporary (1 MiB) stays in cache (3x faster than whole tensors)
SPREAD = 1 << 16  # offsets a tensor's block may start at, within one step's Noise


class Noise:
    """The random bits of one rounding pass over many tensors: ``CHUNK + SPREAD`` values drawn once
    from ``generator``; ``block(n)`` hands each tensor ``min(n, CHUNK)`` of them from a random offset."""

    def __init__(self, generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        self.generator = generator
        self.bits = torch.randint(0, 1 << 16, (CHUNK + SPREAD,), dtype=torch.int32, generator=generator).to(device)

    def block(self, n: int) -> Tensor:
        start = int(torch.randint(0, SPREAD, (1,), generator=self.generator))
        return self.bits[start : start + min(n, CHUNK)]


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | Noise) -> Tensor:
    """Write ``src`` (fp32) into ``dst`` (bf16, same shape) rounded stochastically; returns ``dst``.
    ``generator``: a seeded generator (a block of bits drawn for this tensor) or a ``Noise`` shared
    by the tensors of one pass.

    Exactly representable values stay as they are; others go to one of their two bf16 neighbours:

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.tensor([1.0, -2.5, 1.0 + 2**-8])  # 1 + 2**-8 is half-way between 1 and 1 + 2**-7
    >>> [sorted({float(stochastic_round_(torch.empty(3, dtype=torch.bfloat16), x, g)[2]) for _ in range(50)})]
    [[1.0, 1.0078125]]
    >>> stochastic_round_(torch.empty(3, dtype=torch.bfloat16), x, g)[:2].tolist()
    [1.0, -2.5]
    """
    if src.dtype != torch.float32 or dst.dtype != torch.bfloat16 or src.shape != dst.shape:
        raise ValueError(f"stochastic_round_ takes an fp32 source and a bf16 destination of one shape, "
                         f"got {src.dtype} {tuple(src.shape)} -> {dst.dtype} {tuple(dst.shape)}")
    bits = src.detach().contiguous().view(-1).view(torch.int32)
    out = dst.view(-1) if dst.is_contiguous() else torch.empty(dst.numel(), dtype=torch.bfloat16, device=dst.device)
    n = bits.numel()
    if isinstance(generator, Noise):
        noise = generator.block(n)
    else:
        noise = torch.randint(0, 1 << 16, (min(n, CHUNK),), dtype=torch.int32, generator=generator).to(src.device)
    tmp = torch.empty_like(noise)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        t = tmp[: e - s]
        torch.add(bits[s:e], noise[: e - s], out=t)  # carries into the bf16 mantissa (or exponent) when it rounds up
        t.bitwise_and_(-65536)  # drop the low 16 bits: t is now exactly a bf16 value
        out[s:e].copy_(t.view(torch.float32))
    if out.data_ptr() != dst.data_ptr():
        dst.copy_(out.view_as(dst))
    return dst
