"""The process a command runs in: rank, world size, device, precision. Built once, passed down.

``start(cfg)`` (``sft train``, ``sft eval``) joins torchrun's process group when there is one;
``local(cfg)`` is the one-process runtime (``sft bench``, ``sft lr-find``, tests). Everything that
depends on where it runs takes the ``Runtime`` as an argument, so no function asks a global
"am I rank 0?" and a test can hand in any rank it likes.

One process (no ``WORLD_SIZE``, or 1) is rank 0 of 1 and the collectives here do nothing. Under
``torchrun`` the group is joined from its environment (NCCL on CUDA, gloo on CPU); a process that
sees ``WORLD_SIZE > 1`` but has no process group stops with an error instead of training alone as
"rank 0 of 1".

A leaf module: it imports nothing of ``sft.training``, ``sft.evaluation`` or ``sft.models``, so
all of them can use it.
"""

from __future__ import annotations

import gc
import importlib
import math
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from sft.config import Config
from sft.errors import SftError

Precision = Literal["bf16", "fp32"]

# Rank 0 may work alone for a while (the "before" evaluation, saving final/) while the others
# wait in a barrier; NCCL's 10-minute default would abort them.
TIMEOUT = timedelta(minutes=int(os.environ.get("SFT_DIST_TIMEOUT_MIN", "120")))


def bf16_supported() -> bool:
    """A GPU with bf16, or a CPU with native bf16 matmuls (avx512_bf16 or AMX)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: Config) -> Precision:
    """``bf16`` or ``fp32``: ``auto`` picks bf16 only where the hardware computes it natively
    (an avx2-only CPU runs bf16 matmuls ~40x slower than fp32)."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return "bf16" if p == "bf16" else "fp32"


def this_device() -> torch.device:
    """This process's device: its local GPU under torchrun, the only GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def share(n: int, rank: int, world: int) -> list[tuple[int, float]]:
    """Rank ``rank``'s items of ``n`` (items r, r + world, ...) with their weights, padded so that
    every rank gets ``ceil(n / world)``: collectives inside a forward pass (FSDP2's all-gathers,
    DDP's gradient sync) must pair up, so a rank short of items repeats one with weight 0 (its
    own last, else item 0).

    3 micro-batches on 2 ranks, and 1 on 2:

    >>> share(3, 0, 2), share(3, 1, 2)
    ([(0, 1.0), (2, 1.0)], [(1, 1.0), (1, 0.0)])
    >>> share(1, 0, 2), share(1, 1, 2)
    ([(0, 1.0)], [(0, 0.0)])
    """
    mine = [(i, 1.0) for i in range(rank, n, world)]
    per_rank = math.ceil(n / world)
    if len(mine) < per_rank:
        filler = mine[-1][0] if mine else 0
        mine += [(filler, 0.0)] * (per_rank - len(mine))
    return mine


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank ``rank`` of ``world``, on ``device``, in ``precision``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = "fp32"
    # FSDP2's DeviceMeshes (sft.training.distributed.wrap): each keeps the process group in a
    # registry that shutdown() empties, so the group does not outlive destroy_process_group
    meshes: list[Any] = field(default_factory=list, compare=False, repr=False)

    @property
    def main(self) -> bool:
        """True on the one process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def alone(self) -> Runtime:
        """This process seen as rank 0 of 1: for work rank 0 does while the others wait (the
        before/after evaluation), which must not wait for them in a collective."""
        return replace(self, rank=0, world=1)

    def share(self, n: int) -> list[tuple[int, float]]:
        """This rank's items of ``n`` and their weights (see ``share``)."""
        return share(n, self.rank, self.world)

    def autocast(self) -> AbstractContextManager[None]:
        """The autocast context of a forward pass in this precision.

        Pure-bf16 weights need no autocast; it stays on for bf16 so that a model that still has fp32
        weights (a LoRA adapter, an fp32 head) computes its matmuls in bf16 too. Disabled for fp32.
        """
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process)."""
        if self.world > 1:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    @property
    def node_main(self) -> bool:
        """True on the first process of its machine (``LOCAL_RANK`` 0)."""
        return self.local_rank == 0

    @contextmanager
    def rank_zero_first(self, per_node: bool = False) -> Iterator[None]:
        """Rank 0 runs the block first (fills a cache, writes a file); the others run it after.
        ``per_node``: the first process of each machine goes first (one data cache per node, not
        per process), the machine's others after.

        >>> with Runtime().rank_zero_first(): print("one process: just runs")
        one process: just runs
        """
        first = self.node_main if per_node else self.main
        if not first:
            self.barrier()
        yield
        if first:
            self.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (a no-op for one process); returns ``t``."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64, so sums of losses stay exact enough)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()  # type: ignore[no-any-return]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one (e.g. a signal seen by one rank)."""
        return self.all_sum([float(flag)])[0] > 0

    def shutdown(self) -> None:
        """Leave the process group, and free it while Python still runs. Call it after dropping
        the wrapped model (FSDP2's state holds the group too).

        The barrier first: a rank that destroys the group while another still talks to it makes
        both abort at exit. Then the group itself must go: a gloo worker thread may still hold the
        barrier's work, which holds the tensors of earlier collectives; if the group survives into
        interpreter shutdown, that thread drops them there, needs the GIL that is gone, and the
        process aborts ("terminate called without an active exception": 1 of 20, then 1 of 50 runs
        of the FSDP2 packing test's job next to two busy-loop processes on the 2-core machine).
        Freed here, the group's destructor joins its threads with the GIL released: no gloo thread
        is left afterwards (tests/training/test_distributed.py).
        """
        if self.world > 1 and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()
            for mesh in self.meshes:
                getattr(mesh, "_pg_registry", {}).clear()  # where torch 2.13 keeps the mesh's groups
            self.meshes.clear()
            gc.collect()  # the model's reference cycles, which reach the group through FSDP2's state


def env_world() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SftError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def local(cfg: Config) -> Runtime:
    """The runtime of a one-process command: rank 0 of 1 on this machine's device, ``cfg``'s precision."""
    if env_world() > 1:
        raise SftError(f"WORLD_SIZE={env_world()}: this command runs on one process; start it without torchrun")
    return Runtime(device=this_device(), precision=resolve_precision(cfg))


def start(cfg: Config) -> Runtime:
    """The runtime of a command that may run under torchrun (``sft train``, ``sft eval``): joins
    the process group (NCCL on CUDA, gloo on CPU) when ``WORLD_SIZE > 1``, else ``local(cfg)``."""
    world = env_world()
    if world <= 1:
        return local(cfg)
    if not dist.is_available():
        raise SftError(f"WORLD_SIZE={world}: this PyTorch build has no torch.distributed; run one process")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # imported before the group exists: its functions bind ``group=group.WORLD`` as a default
        # argument, and imported later (transformers' lazy imports reach it through FSDP1) they keep
        # the group alive past destroy_process_group (see Runtime.shutdown)
        importlib.import_module("torch.distributed.nn")

        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError, KeyError) as e:
            raise SftError(
                f"WORLD_SIZE={world}: could not join the {backend} process group ({e}); start with "
                "`torchrun --nproc_per_node N -m sft train CONFIG` or `sft train CONFIG --nproc N`"
            ) from None
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, this_device(), resolve_precision(cfg))
