"""Which process this is and which device it trains on.

Under ``torchrun`` each process has a rank; without a process group there is exactly one process
(rank 0 of 1). Nothing here invents its own launcher or collective.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the one process that writes files (rank 0)."""
    return rank_and_world()[0] == 0


def device() -> torch.device:
    """This process's device: its local GPU under torchrun, the only GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
