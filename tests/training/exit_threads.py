"""`sft train` under torchrun, then the gloo threads this process still has: the check of
tests/training/test_distributed.py that the process group is gone before Python shuts down
(run by torchrun, not collected as a test).

    python -m torch.distributed.run --standalone --nproc_per_node 2 exit_threads.py MODE train CONFIG ...

Prints ``rank R: gloo threads after sft: N (names)``. A gloo worker thread alive at interpreter
shutdown can drop the last tensors of a collective there and abort the process (see
``sft.runtime.Runtime.shutdown``); N == 0 rules that out.

MODE ``plain``: ``sft train`` as it is. MODE ``hold``: the control, which keeps a reference to
the group taken right after ``init_process_group`` (as a module that binds ``group.WORLD`` as a
default argument does when imported late): the gloo threads then survive ``sft``'s shutdown.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (``gloo_tcp_loop``, ``pt_gloo_runloop``)."""
    names = [(Path("/proc/self/task") / t / "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)


def main() -> int:
    import torch.distributed as dist

    import sft.runtime
    from sft.cli import main as sft_main

    mode, args = sys.argv[1], sys.argv[2:]
    held: list[Any] = []
    if mode == "hold":
        real_init = dist.init_process_group

        def init_and_hold(*a: Any, **k: Any) -> None:
            real_init(*a, **k)
            held.append(dist.group.WORLD)

        sft.runtime.dist.init_process_group = init_and_hold  # type: ignore[attr-defined]
    elif mode != "plain":
        raise SystemExit(f"unknown mode {mode}")
    rc = sft_main(args)
    threads = gloo_threads()
    print(f"rank {os.environ['RANK']}: gloo threads after sft: {len(threads)} ({' '.join(threads)})", flush=True)
    held.clear()  # the control's group goes now, while Python runs, not at its shutdown
    return rc


if __name__ == "__main__":
    sys.exit(main())
