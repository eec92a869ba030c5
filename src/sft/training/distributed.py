"""Many processes under ``torchrun``: the process group, the DDP / FSDP2 wrapper, rank-0 I/O.

One process (no ``WORLD_SIZE``, or 1) is rank 0 of 1 and nothing here does anything. Under
``torchrun`` the process group is joined from its environment (NCCL on CUDA, gloo on CPU) and
the model is wrapped with PyTorch's own ``DistributedDataParallel`` or FSDP2 ``fully_shard``;
there is no home-made launcher, rendezvous or all-reduce. A process that sees ``WORLD_SIZE > 1``
but has no process group stops with an error instead of training alone as "rank 0 of 1".

Both wrappers average gradients over ranks, so the step multiplies each micro-batch's loss by
``world_size / trained tokens of the whole step`` (see ``sft.training.step``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sft.config import Config
from sft.errors import SftError
from sft.training.loss import token_loss_sum, unwrap

# train.parallel: auto -> DDP below this many parameters, FSDP2 at or above. DDP keeps the whole
# model, its gradients and AdamW's two moments on every GPU: 16 bytes a parameter in fp32, so
# 1B parameters already need 16 GB per GPU before activations; FSDP2 divides that by the ranks.
FSDP_FROM_PARAMS = 1_000_000_000

# Rank 0 may work alone for a while (the "before" evaluation, saving final/) while the others
# wait in a barrier; NCCL's 10-minute default would abort them.
TIMEOUT = timedelta(minutes=int(os.environ.get("SFT_DIST_TIMEOUT_MIN", "120")))


def env_world() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SftError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def init() -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); nothing for one process."""
    if env_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise SftError(f"WORLD_SIZE={env_world()}: this PyTorch build has no torch.distributed; run one process")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError, KeyError) as e:
        raise SftError(
            f"WORLD_SIZE={env_world()}: could not join the {backend} process group ({e}); start with "
            "`torchrun --nproc_per_node N -m sft train CONFIG` or `sft train CONFIG --nproc N`"
        ) from None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if env_world() > 1:
        raise SftError(
            f"WORLD_SIZE={env_world()} but no process group is initialised; this command runs on one "
            "process (start it without torchrun), or call sft.training.distributed.init() first"
        )
    return 0, 1


def is_main() -> bool:
    """True on the one process that writes files (rank 0)."""
    return rank_and_world()[0] == 0


def is_node_main() -> bool:
    """True on the first process of each machine (``LOCAL_RANK`` 0): it fills that machine's data
    cache while the machine's other processes wait (one tokenization per node, not per process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def device() -> torch.device:
    """This process's device: its local GPU under torchrun, the only GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if rank_and_world()[1] > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device().index or 0])
        else:
            dist.barrier()


def shutdown() -> None:
    """Leave the process group. The barrier first: a rank that destroys the group while another
    still talks to it makes both abort at exit."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def all_sum(values: list[float], dev: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64, so sums of losses stay exact enough)."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()  # type: ignore[no-any-return]


def any_rank(flag: bool, dev: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (e.g. a signal seen by one rank)."""
    return all_sum([float(flag)], dev)[0] > 0


# ---------------------------------------------------------------------------------------------
# wrapping


class LossModule(torch.nn.Module):
    """The causal LM with the training loss as its ``forward(batch) -> (CE sum, trained tokens)``.

    The chunked cross-entropy calls the decoder and the output head directly, so DDP and FSDP2
    wrap this module: their forward hooks (DDP's gradient-sync bookkeeping, FSDP2's all-gather
    of the root's embeddings, norm and head) then cover the whole loss computation.
    """

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss_sum(self.lm, batch)


def forward_loss(module: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(CE sum, trained tokens) of ``batch`` through the wrapper when there is one."""
    if isinstance(module, (LossModule, DistributedDataParallel)):
        return module(batch)  # type: ignore[no-any-return]
    return token_loss_sum(module, batch)


def choose_parallel(cfg: Config, model: Any) -> str:
    """``train.parallel`` resolved: ``auto`` is DDP below FSDP_FROM_PARAMS parameters, else FSDP2."""
    choice: str = getattr(cfg.train, "parallel", "auto")
    if choice != "auto":
        return choice
    n = sum(p.numel() for p in model.parameters())
    return "fsdp" if n >= FSDP_FROM_PARAMS else "ddp"


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one (``model.model.layers`` in transformers)."""
    lm = unwrap(model)
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is not None:
        return list(layers)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    found = [m for m in lm.modules() if type(m).__name__ in names]
    if not found:
        raise SftError(f"train.parallel: fsdp: cannot find the decoder layers of {type(lm).__name__}; "
                       "use train.parallel: ddp")
    return found


def wrap(cfg: Config, model: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, torch.optim.Optimizer]:
    """The module the step calls (``LossModule`` under DDP or FSDP2) and the optimizer over the
    parameters it trains. One process: ``(model, optimizer)`` unchanged.

    DDP keeps ``model``'s parameters (and broadcasts rank 0's values); FSDP2 replaces them with
    sharded DTensors, so the optimizer is rebuilt over the new parameters with the same groups.
    """
    if rank_and_world()[1] == 1:
        return model, optimizer
    parallel = choose_parallel(cfg, model)
    dev = device()
    if parallel == "ddp":
        module = DistributedDataParallel(LossModule(model), device_ids=[dev.index] if dev.type == "cuda" else None)
        return module, optimizer

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from sft.training.precision import resolve_precision

    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    mesh = init_device_mesh(dev.type, (rank_and_world()[1],))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if resolve_precision(cfg) == "bf16" else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    root = LossModule(model)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    params = dict(model.named_parameters())
    new_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in names_]}
                  for g, names_ in zip(optimizer.param_groups, groups)]
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return root, type(optimizer)(new_groups, **defaults)


def is_sharded(model: Any) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def grad_sync(module: Any, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch; under DDP gradients are all-reduced only when
    ``sync`` (the step's last micro-batch), the others accumulate locally (``no_sync``).
    FSDP2 reduce-scatters every micro-batch, so its gradients stay sharded in memory."""
    if isinstance(module, DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield
