"""`sft train` under torchrun with one piece of the distributed step broken: the controls of
tests/training/test_distributed.py (run by torchrun, not collected as a test).

    python -m torch.distributed.run --standalone --nproc_per_node 2 broken_dist.py MODE train CONFIG ...

MODE ``nosync``: DDP never all-reduces gradients (every micro-batch under ``no_sync``): each
process trains its own replica on its own micro-batches.
MODE ``per_rank``: each process normalises its loss by its own trained tokens (a per-rank mean
that DDP / FSDP2 then average) instead of the whole step's.
"""

from __future__ import annotations

import sys


def main() -> int:
    import sft.training.step as step
    from sft.cli import main as sft_main
    from sft.data.types import IGNORE
    from sft.training import distributed

    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "nosync":
        real_sync = distributed.grad_sync
        step.grad_sync = lambda module, sync: real_sync(module, False)  # type: ignore[assignment]
    elif mode == "per_rank":
        real_batches = step.step_batches

        def per_rank(*a, **k):  # type: ignore[no-untyped-def]
            batches, _, tokens, weights = real_batches(*a, **k)
            local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b, w in zip(batches, weights) if w)
            # forward_backward multiplies by world / n: n = local * world makes it 1 / local
            world = a[4].world  # step_batches(step, examples, cfg, pad_id, rt)
            return batches, max(1, local) * world, tokens, weights

        step.step_batches = per_rank  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown mode {mode}")
    return sft_main(args)


if __name__ == "__main__":
    sys.exit(main())
