"""PyTorch's CPU linear on a strided 3-D input with a frozen weight, against the same input made
contiguous (issue 20: why ``sft.evaluation.generate.contiguous_head_input`` exists).

    .venv/bin/python bench/frozen_head_linear.py [--vocab 262144] [--hidden 640] [--rows 16]

transformers computes the prefill's logits from ``hidden[:, -1:, :]`` (not contiguous when the
batch has several rows). Prints ms per call for each dtype x weight.requires_grad x input layout,
under ``torch.no_grad()`` as in generation. Shapes default to Gemma-3-270m's head.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def ms_per_call(x: torch.Tensor, w: torch.Tensor, n: int) -> float:
    with torch.no_grad():
        F.linear(x, w)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            F.linear(x, w)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=60, help="prompt length the last position is sliced from")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, head {a.vocab} x {a.hidden}, "
          f"input {a.rows} x 1 x {a.hidden}")
    print("| dtype | weight.requires_grad | input | ms per call |\n|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(a.vocab, a.hidden, dtype=dtype) * 0.02
        hidden = torch.randn(a.rows, a.prompt, a.hidden, dtype=dtype)
        for grad in (False, True):
            w = weight.clone().requires_grad_(grad)
            for name, x in (("hidden[:, -1:, :] (strided)", hidden[:, -1:, :]),
                            ("the same, .contiguous()", hidden[:, -1:, :].contiguous())):
                print(f"| {str(dtype).removeprefix('torch.')} | {grad} | {name} | {ms_per_call(x, w, a.calls):.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
