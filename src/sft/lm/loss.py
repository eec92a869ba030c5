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
from sft.lm.attention import flatten_packed, is_varlen

# Bytes of fp32 logits allowed per chunk: 256 MiB -> 256 tokens at Gemma's 262k vocabulary.
CHUNK_BYTES = 256 * 1024 * 1024


def chunk_size_for(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's fp32 logits fit in CHUNK_BYTES.

    >>> chunk_size_for(262144), chunk_size_for(49152)
    (256, 1365)
    """
    return max(16, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(hidden_i @ weight.T), target_i), gradients computed chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, softcap: float, grad: bool
    ) -> Tensor:
        # hidden [N, H], weight [V, H], targets [N] (all valid). ``grad``: was grad mode on at the
        # call? (inside forward it is always off, and needs_input_grad ignores no_grad()).
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            t = targets[s : s + chunk]
            logits = (h @ weight.T).float()  # [c, V]
            if softcap > 0:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(t.shape[0], device=g.device), t] -= 1.0
                if softcap > 0:
                    g.mul_(1.0 - capped * capped)
                g_low = g.to(hidden.dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = g_low @ weight
                if grad_w is not None:  # [V, c] @ [c, H] in the weights' dtype, summed in fp32
                    grad_w.add_(g_low.T @ h)
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
        )


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None, chunk: int | None = None
) -> Tensor:
    """Summed CE of ``hidden @ weight.T`` against ``targets`` ([N, H], [V, H], [N] -> scalar fp32)."""
    chunk = chunk or chunk_size_for(weight.shape[0])
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, float(softcap or 0.0), grad)  # type: ignore[no-any-return]


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
    if is_varlen(lm) and batch.get("attention_mask") is None and "position_ids" in batch:
        # padding-free: the packed rows as one sequence, documents delimited by cu_seqlens
        out = lm.model(**flatten_packed(batch), use_cache=False)
    else:
        out = lm.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        )
    hidden = out.last_hidden_state.view(*labels.shape, -1)[:, :-1][keep]  # [N, H]: only positions with a target
    if count == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected for DDP
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    weight = lm.get_output_embeddings().weight
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
