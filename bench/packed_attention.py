"""Attention of packed rows on a CPU: transformers' sdpa path (a dense block-diagonal mask, every
score of the T x T square computed) against ``sft.lm.doc_attention`` (PyTorch's CPU flash kernels
per document, causal), forward + backward of one layer of SmolLM2-135M's shape.

    PYTHONPATH=src .venv/bin/python bench/packed_attention.py [--batch 4] [--length 512] [--layers 30]

Rows of ``--length`` tokens are filled with documents of 40-300 tokens (seeded), as packing fills
them with alpaca conversations (~150 tokens). Prints the best of 5 timed passes per path and
dtype, and that time times ``--layers`` (a training step's share), and the largest difference of
the outputs and gradients between the paths.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sft.lm.doc_attention import doc_attention


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """What transformers' sdpa path computes for packed rows: a dense [B, 1, T, T] mask."""
    t = q.shape[2]
    doc = (pos == 0).cumsum(-1)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          attn_mask=mask[:, None], scale=scale).transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(a.batch):
        row: list[int] = []
        while len(row) < a.length:
            n = int(torch.randint(40, 300, (1,), generator=g))
            row += range(min(n, a.length - len(row)))
        rows.append(row)
    pos = torch.tensor(rows)
    docs = int((pos == 0).sum())
    print(f"{a.batch} rows x {a.length} tokens, {docs} documents (mean {a.batch * a.length / docs:.0f} tokens), "
          f"{a.heads} query / {a.kv_heads} key-value heads of {a.head_dim}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(a.batch, a.length, a.heads, a.head_dim, generator=g).to(dtype).transpose(1, 2)
        k, v = (torch.randn(a.batch, a.length, a.kv_heads, a.head_dim, generator=g).to(dtype).transpose(1, 2)
                for _ in range(2))
        grad = torch.randn(a.batch, a.length, a.heads, a.head_dim, generator=g).to(dtype)
        results = {}
        for name, fn in (("dense mask (sdpa)", dense), ("per document", lambda *x: doc_attention(*x, 0)[0])):
            times = []
            for _ in range(6):
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                start = time.perf_counter()
                out = fn(qq, kk, vv, pos, a.head_dim ** -0.5)
                grads = torch.autograd.grad(out, (qq, kk, vv), grad)
                times.append(time.perf_counter() - start)
            results[name] = (out.detach(), *grads)
            best = min(times[1:])
            print(f"{str(dtype)[6:]:>8}  {name:<18} {best * 1e3:7.1f} ms fwd+bwd per layer, "
                  f"x {a.layers} layers = {best * a.layers:.2f} s")
        diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(*results.values(), strict=True))
        print(f"{'':>8}  largest difference of output and gradients: {diff:.2e}")


if __name__ == "__main__":
    main()
