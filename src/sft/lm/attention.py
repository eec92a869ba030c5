"""Padding-free attention for packed rows: documents given as ``cu_seqlens``, never a dense mask.

On a GPU, packed micro-batches ``[B, T]`` are flattened to one sequence ``[1, B*T]`` whose
documents are delimited by ``cu_seqlens`` (where ``position_ids`` restart at 0), and attention
runs per document with PyTorch's own FlashAttention varlen kernel
(``torch.nn.attention.varlen.varlen_attn``: bf16/fp16 on CUDA, no extra package). Without it,
transformers' sdpa path turns packed rows into a dense ``[B, 1, T, T]`` mask, which rules out
the flash kernels, and its FlashAttention-2 path infers documents from ``position_ids`` only when
the batch has one row (more rows would see each other's documents).

Anywhere else (CPU, fp32) the same function runs each document through SDPA with
``is_causal=True``, so the packed-equals-separate property is tested on CPU through this very
code (tests/training/test_attention.py). The CPU training path itself keeps transformers' sdpa
with the block-diagonal mask it builds from ``position_ids``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "sft_varlen"


def cu_seqlens(position_ids: Tensor) -> tuple[Tensor, int]:
    """Document boundaries of flattened packed rows: where positions restart at 0, and the end.

    >>> cu, longest = cu_seqlens(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]))
    >>> cu.tolist(), longest
    ([0, 3, 5, 9, 10], 4)
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())  # one host sync per micro-batch


def flatten_packed(batch: dict[str, Tensor]) -> dict[str, Any]:
    """Model inputs of a packed ``[B, T]`` batch as one ``[1, B*T]`` sequence with its documents."""
    cu, longest = cu_seqlens(batch["position_ids"])
    return {
        "input_ids": batch["input_ids"].reshape(1, -1),
        "position_ids": batch["position_ids"].reshape(1, -1),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
    }


def _per_document(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float | None, window: int | None) -> Tensor:
    """Reference path: SDPA document by document. q [Hq, N, D], k/v [Hkv, N, D] -> [Hq, N, D]."""
    outs = []
    bounds = cu.tolist()
    for s, e in itertools.pairwise(bounds):
        mask = None
        if window:  # causal and at most ``window`` keys back, the query included
            i = torch.arange(e - s, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        outs.append(F.scaled_dot_product_attention(
            q[:, s:e], k[:, s:e], v[:, s:e], attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=q.shape[0] != k.shape[0]))
    return torch.cat(outs, dim=1)


def varlen_attention(
    module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
    cu_seq_lens_q: Tensor | None = None, max_length_q: int | None = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, T, Hq, D]."""
    if getattr(module.config, "attn_logit_softcapping", None):
        raise NotImplementedError(f"{NAME}: attention logit softcapping (Gemma 2) is not supported")
    if cu_seq_lens_q is None:  # not a flattened packed batch (held-out loss, generation): causal SDPA
        mask = None
        if attention_mask is not None:  # 2-D padding mask [B, T] (see mask_function)
            t = query.shape[2]
            causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None,
                                             scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError(f"{NAME}: cu_seq_lens needs the packed rows flattened to one sequence")
    q, k, v = query[0], key[0], value[0]  # [H, N, D]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        flat: Any = varlen_attn(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_seq_lens_q, cu_seq_lens_q,
            int(max_length_q or 0), int(max_length_q or 0), scale=scaling,
            window_size=(sliding_window - 1, 0) if sliding_window else (-1, 0),
            enable_gqa=q.shape[0] != k.shape[0],
        )  # [N, Hq, D]
        return flat[None], None
    return _per_document(q, k, v, cu_seq_lens_q, scaling, sliding_window).transpose(0, 1)[None], None


def mask_function(*args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """No 4-D mask: documents come as cu_seqlens; a padded batch keeps its 2-D padding mask."""
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask
    return None


def use_padding_free(cfg: Any, device: torch.device) -> bool:
    """``train.attention``: ``auto`` is varlen for packed rows on CUDA (the CPU keeps sdpa)."""
    choice = cfg.train.attention
    if choice == "auto":
        return device.type == "cuda" and cfg.data.packing
    return choice == "varlen" and cfg.data.packing


def use_varlen(model: Any) -> Any:
    """Switch ``model`` (a transformers causal LM) to the padding-free attention above."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, mask_function)
    model.set_attn_implementation(NAME)
    return model


def is_varlen(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME
