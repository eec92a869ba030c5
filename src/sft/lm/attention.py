"""Padding-free attention for packed rows: each document attends to itself only, never a dense mask.

transformers' sdpa path turns packed rows into a dense ``[B, 1, T, T]`` block-diagonal mask and
computes all ``T x T`` scores, most of them masked; its FlashAttention-2 path infers documents from
``position_ids`` only when the batch has one row (more rows would see each other's documents).
``train.attention: varlen`` (``auto`` with packing) replaces it:

- On a GPU, packed micro-batches ``[B, T]`` are flattened to one sequence ``[1, B*T]`` whose
  documents are delimited by ``cu_seqlens`` (where ``position_ids`` restart at 0), and attention
  runs per document with PyTorch's own FlashAttention varlen kernel
  (``torch.nn.attention.varlen.varlen_attn``: bf16/fp16 on CUDA, no extra package; ``call_varlen_attn``
  follows its signature from torch 2.10 on, where a version cannot window or scale, SDPA per document).
- On a CPU the rows keep their ``[B, T]`` shape and ``sft.lm.doc_attention`` runs PyTorch's CPU
  flash kernel on each document (found from ``position_ids``, a fixed-shape tensor, inside one
  opaque operator, so compiled blocks never recompile).

Anything else (held-out batches with padding, generation with a KV cache) goes to transformers'
own sdpa attention with the mask transformers builds for it. The flattened ``cu_seqlens`` path
also runs on a CPU (SDPA document by document) so that it is tested here
(tests/lm/test_attention.py).
"""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sft.lm.doc_attention import doc_attention

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


def flattens(lm: Any, batch: dict[str, Tensor]) -> bool:
    """Whether a packed batch goes to ``lm`` flattened with ``cu_seqlens`` (varlen on a GPU; a CPU
    keeps ``[B, T]`` rows and finds the documents from ``position_ids``)."""
    return (is_varlen(lm) and batch.get("attention_mask") is None and "position_ids" in batch
            and batch["input_ids"].device.type != "cpu")


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
) -> tuple[Tensor, Any]:
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, T, Hq, D]."""
    if getattr(module.config, "attn_logit_softcapping", None):
        raise NotImplementedError(f"{NAME}: attention logit softcapping (Gemma 2) is not supported")
    position_ids = kwargs.get("position_ids")
    if cu_seq_lens_q is None:
        if (attention_mask is None and position_ids is not None and query.device.type == "cpu"
                and query.shape[2] == key.shape[2]):  # packed rows [B, T] (or plain causal rows) on a CPU
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return doc_attention(query, key, value, position_ids.expand(query.shape[0], -1), float(scale),
                                 int(sliding_window or 0))[0], None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        # padded held-out batches, generation: transformers' sdpa with transformers' mask (see mask_function)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,  # type: ignore[no-any-return]
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{NAME}: cu_seq_lens needs the packed rows flattened to one sequence")
    q, k, v = query[0], key[0], value[0]  # [H, N, D]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        flat = call_varlen_attn(varlen_attn, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                cu_seq_lens_q, int(max_length_q or 0), scaling, sliding_window)
        if flat is not None:
            return flat[None], None
    return _per_document(q, k, v, cu_seq_lens_q, scaling, sliding_window).transpose(0, 1)[None], None


@functools.cache
def _parameters(fn: Any) -> frozenset[str]:
    """Names of ``fn``'s parameters, read once per function (the attention call runs per layer)."""
    return frozenset(inspect.signature(fn).parameters)


def call_varlen_attn(fn: Any, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, longest: int, scale: float | None,
                     window: int | None) -> Tensor | None:
    """Causal ``torch.nn.attention.varlen.varlen_attn`` (q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D])
    across its versions, or ``None`` where this version cannot do it (the caller then runs SDPA per
    document): torch 2.10 has ``is_causal`` and no ``scale``/window; later versions have ``scale``
    and ``window_size``; ``enable_gqa`` came later still (without it the key/value heads are repeated).
    """
    params = _parameters(fn)
    if q.shape[1] != k.shape[1] and "enable_gqa" not in params:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    kwargs: dict[str, Any] = {}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    if "window_size" in params:  # causal is a window of (left, 0)
        kwargs["window_size"] = (window - 1, 0) if window else (-1, 0)
    elif window or "is_causal" not in params:
        return None
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12 * scale:
        return None  # this version only scales by 1/sqrt(head_dim)
    return fn(q, k, v, cu, cu, longest, longest, **kwargs)  # type: ignore[no-any-return]


def mask_function(*args: Any, **kwargs: Any) -> Tensor | None:
    """No mask for rows without padding whose queries are their keys (training: documents come
    from position_ids or cu_seqlens); anything else (padding, a KV cache) gets sdpa's own mask."""
    from transformers.masking_utils import sdpa_mask

    attention_mask = kwargs.get("attention_mask")
    if (kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("kv_offset")
            and (attention_mask is None or bool(attention_mask.all()))):
        return None
    return sdpa_mask(*args, **kwargs)


def use_padding_free(cfg: Any, device: torch.device) -> bool:
    """``train.attention``: ``auto`` is varlen for packed rows (CUDA and CPU), sdpa otherwise."""
    return cfg.train.attention in ("auto", "varlen") and bool(cfg.data.packing)


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
