"""``sft train --nproc N``: PyTorch's own torchrun (``torch.distributed.run``) on this machine.

Two things differ from ``python -m torch.distributed.run``, neither in how the ranks run:

- When a rank fails, each rank has already printed its own ``error: ...`` line; the agent's
  traceback, its ``ChildFailedError`` box and its log lines would bury it, so they become one line
  naming the first rank that failed and how (``sft: rank 0 exited with code 1 ...``), and the exit
  status is that rank's (128 + N for signal N, as a shell reports it).
- On a CPU-only machine each rank gets ``usable cores // N`` OpenMP threads rather than torchrun's
  one, unless ``OMP_NUM_THREADS`` is set.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``sft train CONFIG --nproc N ...`` as the torchrun command it stands for (this machine only).

    >>> torchrun_command(2, ["train", "c.yaml", "--nproc", "2", "--resume"])[1:]
    ['-m', 'sft.launch', '--standalone', '--nproc_per_node', '2', '-m', 'sft', 'train', 'c.yaml', '--resume']
    """
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [sys.executable, "-m", "sft.launch", "--standalone", "--nproc_per_node", str(nproc), "-m", "sft", *rest]


def threads_per_rank(cores: int, nproc: int) -> int:
    """OpenMP threads for each of ``nproc`` ranks sharing ``cores`` CPU cores.

    >>> threads_per_rank(2, 2), threads_per_rank(64, 2), threads_per_rank(3, 8)
    (1, 32, 1)
    """
    return max(1, cores // max(1, nproc))


def failure_line(rank: int, exitcode: int) -> tuple[str, int]:
    """The one line a failed run ends with, and the exit status to return.

    >>> failure_line(1, 1)
    ('sft: rank 1 exited with code 1; its error is above (the other ranks were stopped)', 1)
    >>> failure_line(0, -9)[0]
    'sft: rank 0 was killed by SIGKILL (often: out of memory); its output is above (the other ranks were stopped)'
    """
    if exitcode >= 0:
        return f"sft: rank {rank} exited with code {exitcode}; its error is above (the other ranks were stopped)", exitcode
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hint = " (often: out of memory)" if -exitcode == signal.SIGKILL else ""
    return (f"sft: rank {rank} was killed by {name}{hint}; its output is above (the other ranks were stopped)",
            128 - exitcode)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if "OMP_NUM_THREADS" not in os.environ and str(args.nproc_per_node).isdigit():
        import torch

        if not torch.cuda.is_available():
            affinity = getattr(os, "sched_getaffinity", None)
            cores = len(affinity(0)) if affinity else (os.cpu_count() or 1)
            os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(cores, int(args.nproc_per_node)))
    # "Sending process ... closing signal SIGTERM" and "failed (exitcode: 1) local_rank: 0 ...": the
    # line below says it once
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        line, code = failure_line(rank, failure.exitcode)
        sys.stderr.write(line + "\n")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
