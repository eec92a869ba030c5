"""Causal attention of packed rows on a CPU, document by document, as one opaque operator.

A packed row ``[T]`` holds several documents (``position_ids`` restart at 0 at each); each token
may attend to the earlier tokens of its own document only. transformers' sdpa path builds a dense
``[B, 1, T, T]`` block-diagonal mask for it and computes every one of the ``T x T`` scores; with
~150-token documents in 512-token rows most of them are masked. ``doc_attention`` instead runs
PyTorch's CPU flash-attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and
its backward) on each document with ``is_causal``, so only each document's lower triangle is
computed.

Two details make it fast and compile-friendly:
- It is a ``torch.library.custom_op`` whose inputs have fixed shapes (q/k/v ``[B, H, T, D]`` and
  ``position_ids`` ``[B, T]``): ``torch.compile``'s regional graphs treat it as one opaque call,
  so documents of any lengths never change a shape a graph depends on (nothing recompiles).
- The kernels run in fp32 whatever the input dtype: PyTorch 2.13's bf16 flash backward on this CPU
  costs ~30 ms per call even for a 64-token document (``/tmp``-free microbenchmark in
  bench/RESULTS.md, issue 21), while the fp32 kernels plus the casts cost less than the bf16
  dense-mask path as a whole.

The output is ``[B, T, H, D]`` (the layout transformers' attention functions return); a key/value
head serves ``H / Hkv`` query heads (grouped-query attention), as in transformers' ``repeat_kv``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def documents(position_ids: Tensor) -> list[list[tuple[int, int]]]:
    """``(start, end)`` of each document of each row: where the positions restart at 0.

    >>> documents(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]))
    [[(0, 3), (3, 5)], [(0, 5)]]
    """
    out = []
    for row in position_ids.tolist():  # one host sync per call: a CPU tensor, nothing to wait for
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)  # a row that starts mid-document (no 0 first) is one more document
        out.append(list(zip(starts, [*starts[1:], len(row)], strict=True)))
    return out


def _window_mask(n: int, window: int, dtype: torch.dtype) -> Tensor | None:
    """Additive mask of a document of ``n`` tokens under a sliding window (``None``: causal is enough)."""
    if not window or n <= window:
        return None
    i = torch.arange(n)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return torch.zeros(n, n, dtype=dtype).masked_fill_(~keep, float("-inf"))[None, None]


def _kv(t: Tensor, b: int, s: int, e: int, groups: int) -> Tensor:
    part = t[b : b + 1, :, s:e]
    return part.repeat_interleave(groups, dim=1) if groups > 1 else part


@torch.library.custom_op("sft::doc_attention", mutates_args=())
def doc_attention(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, scale: float,
                  window: int) -> tuple[Tensor, Tensor]:
    """Attention output ``[B, T, H, D]`` (q's dtype) and its log-sum-exp ``[B, H, T]`` (fp32)."""
    b_, h, t, d = q.shape
    groups = h // k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()  # no copy when they are fp32 already
    out = torch.empty(b_, t, h, d, dtype=q.dtype)  # every position lies in one document: all written
    lse = torch.empty(b_, h, t, dtype=torch.float32)
    for b, docs in enumerate(documents(position_ids)):
        for s, e in docs:
            mask = _window_mask(e - s, window, torch.float32)
            o, lo = _FORWARD(qf[b : b + 1, :, s:e], _kv(kf, b, s, e, groups), _kv(vf, b, s, e, groups), 0.0,
                             mask is None, attn_mask=mask, scale=scale)
            out[b, s:e] = o[0].transpose(0, 1)  # cast to q's dtype on the way
            lse[b, :, s:e] = lo[0]
    return out, lse


@doc_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, scale: float, window: int) -> tuple[Tensor, Tensor]:
    b_, h, t, d = q.shape
    return q.new_empty(b_, t, h, d), q.new_empty(b_, h, t, dtype=torch.float32)


@torch.library.custom_op("sft::doc_attention_backward", mutates_args=())
def doc_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           position_ids: Tensor, scale: float, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``doc_attention`` for q, k and v, each in its input's dtype and shape."""
    _, h, _, d = q.shape
    hk = k.shape[1]
    groups = h // hk
    gf, of = grad.float(), out.float()
    qf, kf, vf = q.float(), k.float(), v.float()
    # empty_like keeps each input's strides and dtype, as the fake promises a compiled graph; every
    # position lies in one document, so all of it is written
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    for b, docs in enumerate(documents(position_ids)):
        for s, e in docs:
            mask = _window_mask(e - s, window, torch.float32)
            gq, gk, gv = _BACKWARD(
                gf[b : b + 1, s:e].transpose(1, 2), qf[b : b + 1, :, s:e], _kv(kf, b, s, e, groups),
                _kv(vf, b, s, e, groups), of[b : b + 1, s:e].transpose(1, 2), lse[b : b + 1, :, s:e], 0.0,
                mask is None, attn_mask=mask, scale=scale)
            if groups > 1:  # each key/value head served `groups` query heads: sum their gradients
                gk = gk.reshape(1, hk, groups, e - s, d).sum(2)
                gv = gv.reshape(1, hk, groups, e - s, d).sum(2)
            dq[b : b + 1, :, s:e] = gq
            dk[b : b + 1, :, s:e] = gk
            dv[b : b + 1, :, s:e] = gv
    return dq, dk, dv


@doc_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, position_ids: Tensor,
      scale: float, window: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[object, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, position_ids, scale, window = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], position_ids)  # type: ignore[arg-type]
    ctx.scale, ctx.window = scale, window  # type: ignore[attr-defined]


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _lse_grad: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, position_ids = ctx.saved_tensors  # type: ignore[attr-defined]
    dq, dk, dv = doc_attention_backward(grad.contiguous(), q, k, v, out, lse, position_ids,
                                        ctx.scale, ctx.window)  # type: ignore[attr-defined]
    return dq, dk, dv, None, None, None


doc_attention.register_autograd(_backward, setup_context=_save)
