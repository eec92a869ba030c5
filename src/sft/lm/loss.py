"""Token-summed cross-entropy, chunked over tokens so [tokens x vocab] fp32 logits never exist at once.

The loss of an optimizer step is ``sum of token CE over all its micro-batches / trained tokens
in the whole step``: the caller divides by the step's count, so batch 4 x accumulation 1 and
batch 1 x accumulation 4 give the same loss and gradients.

Logits are computed only at positions that have a target (prompt tokens need none), a chunk at
a time, and the gradient of each chunk is formed right away (as Liger's fused linear CE does),
so no chunk's logits are kept for the backward pass. Under ``torch.no_grad()`` (held-out loss)
no gradient piece is computed at all: that would be a second and third vocabulary-sized matmul.

In bf16 (pure-bf16 training) the logits are computed from bf16 operands and taken to fp32 for
the log-sum-exp; the weight gradient is summed over chunks in fp32 and returned in bf16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from sft.data.types import IGNORE
from sft.lm.attention import flatten_packed, flattens

PROFILE_LOSS = "sft.loss"  # the profiler range of the head + cross-entropy (sft bench --profile)

# The attribute of a causal LM that holds its compiled ``ce_chunk`` (sft.lm.compiled sets it).
COMPILED_CE = "_sft_compiled_ce"

# Bytes of bf16 d/dlogits kept for one weight-gradient matmul: 256 MiB -> 512 positions at Gemma's
# 262k vocabulary, 2730 at SmolLM2's 49k (a whole 4 x 512 micro-batch).
GRAD_GROUP_BYTES = 256 * 1024 * 1024

# Bytes of fp32 logits allowed per chunk: 256 MiB -> 256 tokens at Gemma's 262k vocabulary.
CHUNK_BYTES = 256 * 1024 * 1024


def chunk_size_for(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's fp32 logits fit in CHUNK_BYTES.

    >>> chunk_size_for(262144), chunk_size_for(49152)
    (256, 1365)
    """
    return max(16, CHUNK_BYTES // (4 * vocab_size))


def ce_chunk(
    h: Tensor, weight: Tensor, t: Tensor, softcap: float, need_h: bool, need_w: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One chunk of the summed CE and its gradient pieces: h [c, H], weight [V, H], t [c] ->
    (CE sum fp32, d/dh [c, H] | None, d/dlogits [c, V] in the weights' dtype | None). The caller
    forms d/dweight = d/dlogits.T @ h over many chunks at once (one long matmul, fp32 inside).

    Slots whose target is IGNORE count for nothing (the static-shape padding of ``static_chunks``).
    Compiled training compiles this function once (fixed ``c``): the fp32 [c, V] logits, the
    log-sum-exp, the softmax and its scatter then run as a few fused loops instead of ~8 passes.
    """
    valid = t != IGNORE  # [c]
    tt = t.clamp(min=0)
    logits = (h @ weight.T).float()  # [c, V]
    capped = None
    if softcap > 0:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)  # [c]
    total = torch.where(valid, lse - logits.gather(1, tt[:, None]).squeeze(1), 0.0).sum()
    if not (need_h or need_w):
        return total, None, None
    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    g[torch.arange(t.shape[0], device=g.device), tt] -= 1.0
    if capped is not None:
        g.mul_(1.0 - capped * capped)
    g_low = (g * valid[:, None]).to(h.dtype)  # IGNORE slots: zero rows, no part in any gradient
    return total, (g_low @ weight if need_h else None), (g_low if need_w else None)


ChunkFn = Any  # ce_chunk or its compiled version


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(hidden_i @ weight.T), target_i), gradients computed chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, softcap: float, grad: bool,
        fn: ChunkFn,
    ) -> Tensor:
        # hidden [N, H], weight [V, H], targets [N] (IGNORE slots count for nothing). ``grad``: was
        # grad mode on at the call? (inside forward it is always off, and needs_input_grad ignores no_grad()).
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w: Tensor | None = None
        n = hidden.shape[0]
        # d/dlogits of up to ``group`` positions is kept (bf16) and multiplied at once: one long
        # matmul instead of a short one and an fp32 accumulation pass over [V, H] per chunk
        group = max(chunk, GRAD_GROUP_BYTES // (hidden.element_size() * weight.shape[0]) // chunk * chunk)
        for g0 in range(0, n, group):
            g1 = min(n, g0 + group)
            dlogits = torch.empty(g1 - g0, weight.shape[0], dtype=hidden.dtype, device=hidden.device) if need_w else None
            for s in range(g0, g1, chunk):
                loss, gh, gl = fn(hidden[s : s + chunk], weight, targets[s : s + chunk], softcap, need_h, need_w)
                total += loss
                if grad_h is not None:
                    grad_h[s : s + chunk] = gh
                if dlogits is not None:
                    dlogits[s - g0 : s - g0 + chunk] = gl
            if dlogits is not None:
                part = dlogits.T @ hidden[g0:g1]  # [V, H] in the weights' dtype, fp32 accumulation inside
                if g1 - g0 == n:
                    grad_w = part
                else:  # several groups (a large vocabulary): summed in fp32
                    grad_w = part.float() if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w.to(weight.dtype) if grad_w is not None else torch.empty(0),
        )
        ctx.has = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.has
        return (
            grad_h * grad_out.to(grad_h.dtype) if need_h else None,
            grad_w * grad_out.to(grad_w.dtype) if need_w else None,
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None, chunk: int | None = None,
    fn: ChunkFn = ce_chunk,
) -> Tensor:
    """Summed CE of ``hidden @ weight.T`` against ``targets`` ([N, H], [V, H], [N] -> scalar fp32)."""
    chunk = chunk or chunk_size_for(weight.shape[0])
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, float(softcap or 0.0), grad, fn)  # type: ignore[no-any-return]


# Static shapes (compiled training): trained positions are padded to a multiple of this many
# (or of the memory chunk, if smaller), so every chunk has the same shape. On average half a
# chunk of head work is wasted per micro-batch: ~1% of a SmolLM2 4 x 512 micro-batch.
STATIC_CHUNK = 256


def static_chunk(vocab_size: int) -> int:
    """Positions per compiled CE chunk: STATIC_CHUNK, or fewer where the vocabulary is so large
    that STATIC_CHUNK positions' fp32 logits exceed CHUNK_BYTES.

    >>> static_chunk(49152), static_chunk(262144), static_chunk(2_000_000)
    (256, 256, 33)
    """
    return min(STATIC_CHUNK, chunk_size_for(vocab_size))


def static_chunks(keep: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Flat indices of the positions to train, and their targets, padded with IGNORE slots to a
    multiple of ``chunk`` (the number of trained positions then only changes the chunk count).

    >>> idx, t = static_chunks(torch.tensor([[True, False, True]]), torch.tensor([[7, -100, 9]]), chunk=4)
    >>> idx.tolist(), t.tolist()
    ([0, 2, 0, 0], [7, 9, -100, -100])
    """
    idx = keep.reshape(-1).nonzero().squeeze(1)
    pad = -idx.numel() % chunk
    t = targets.reshape(-1)[idx]
    return (torch.cat([idx, idx.new_zeros(pad)]),
            torch.cat([t, t.new_full((pad,), IGNORE)]))


def unwrap(model: Any) -> Any:
    """The underlying ``*ForCausalLM`` of a PEFT or compiled model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def token_loss_sum(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE, and their count.

    ``batch`` holds ``input_ids`` and ``labels`` [B, T] (aligned, not shifted), and either
    ``attention_mask`` (padded) or ``position_ids`` restarting per example (packed).
    """
    lm = unwrap(model)
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE  # [B, T-1]
    count = int(keep.sum())
    if flattens(lm, batch):  # padding-free on a GPU: the packed rows as one sequence, documents by cu_seqlens
        out = lm.model(**flatten_packed(batch), use_cache=False)
    else:
        out = lm.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        )
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    weight = lm.get_output_embeddings().weight
    states = out.last_hidden_state.view(*labels.shape, -1)[:, :-1]  # [B, T-1, H]
    compiled = getattr(lm, COMPILED_CE, None) if torch.is_grad_enabled() else None
    with torch.profiler.record_function(PROFILE_LOSS):
        if compiled is not None:  # static shapes: chunks of one size, IGNORE slots as padding
            chunk = static_chunk(weight.shape[0])
            idx, t = static_chunks(keep, targets, chunk)
            hidden = states.reshape(-1, states.shape[-1]).index_select(0, idx)  # [N rounded up, H]
            return linear_cross_entropy_sum(hidden, weight, t, softcap=softcap, chunk=chunk, fn=compiled), count
        hidden = states[keep]  # [N, H]: only positions with a target
        if count == 0:
            return hidden.sum() * 0.0, 0  # keeps the graph connected for DDP
        return linear_cross_entropy_sum(hidden, weight, targets[keep], softcap=softcap), count


class LossModule(torch.nn.Module):
    """The causal LM with the training loss as its ``forward(batch) -> (CE sum, trained tokens)``.

    The chunked cross-entropy calls the decoder and the output head directly, so DDP and FSDP2
    wrap this module: their forward hooks (DDP's gradient-sync bookkeeping, FSDP2's all-gather
    of the root's embeddings, norm and head) then cover the whole loss computation.
    """

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss_sum(self.lm, batch)


def forward_loss(module: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(CE sum, trained tokens) of ``batch`` through the wrapper when there is one."""
    if isinstance(module, (LossModule, DistributedDataParallel)):
        return module(batch)  # type: ignore[no-any-return]
    return token_loss_sum(module, batch)
