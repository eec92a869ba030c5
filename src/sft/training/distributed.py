"""Many processes under ``torchrun``: the DDP / FSDP2 wrapper of the model.

The process group, rank, device and collectives are ``sft.runtime.Runtime`` (built once per
command and passed in). One process is rank 0 of 1 and nothing here does anything. Under
``torchrun`` the model is wrapped with PyTorch's own ``DistributedDataParallel`` or FSDP2
``fully_shard``; there is no home-made launcher, rendezvous or all-reduce.

Both wrappers average gradients over ranks, so the step multiplies each micro-batch's loss by
``world_size / trained tokens of the whole step`` (see ``sft.training.step``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from sft.config import Config
from sft.errors import SftError
from sft.lm.loss import LossModule, unwrap
from sft.runtime import Runtime
from sft.training.optim import rebuilt

# train.parallel: auto -> DDP below this many parameters, FSDP2 at or above. DDP keeps the whole
# model, its gradients and AdamW's two moments on every GPU: 16 bytes a parameter in fp32, so
# 1B parameters already need 16 GB per GPU before activations; FSDP2 divides that by the ranks.
FSDP_FROM_PARAMS = 1_000_000_000


# ---------------------------------------------------------------------------------------------
# wrapping


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


def wrap(cfg: Config, rt: Runtime, model: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, torch.optim.Optimizer]:
    """The module the step calls (``LossModule`` under DDP or FSDP2) and the optimizer over the
    parameters it trains. One process: ``(model, optimizer)`` unchanged.

    DDP keeps ``model``'s parameters (and broadcasts rank 0's values); FSDP2 replaces them with
    sharded DTensors, so the optimizer is rebuilt over the new parameters with the same groups.
    """
    parallel = choose_parallel(cfg, model) if rt.world > 1 else "one process"
    check_offload(cfg, parallel, rt.device.type)
    if rt.world == 1:
        return model, optimizer
    dev = rt.device
    if parallel == "ddp":
        module = DistributedDataParallel(LossModule(model), device_ids=[dev.index] if dev.type == "cuda" else None)
        return module, optimizer

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    mesh = init_device_mesh(dev.type, (rt.world,))
    rt.meshes.append(mesh)  # rt.shutdown() frees the process group it holds
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if rt.precision == "bf16" else MixedPrecisionPolicy())
    # train.offload: FSDP2 keeps the sharded parameters, gradients and optimizer state in CPU RAM
    # and runs the optimizer step there (torch's CPUOffloadPolicy)
    offload = CPUOffloadPolicy() if cfg.train.offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    root = LossModule(model)
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload)
    params = dict(model.named_parameters())
    new_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in names_]}
                  for g, names_ in zip(optimizer.param_groups, groups)]
    return root, rebuilt(optimizer, new_groups)


def check_offload(cfg: Config, parallel: str, device: str) -> None:
    """``train.offload`` is FSDP2's CPU offload: GPUs only, under torchrun with FSDP2. Anywhere else
    it stops with an error rather than training without the offload the user asked for."""
    if not getattr(cfg.train, "offload", False):
        return
    if device != "cuda":
        raise SftError("train.offload: FSDP2's CPU offload moves GPU memory to RAM; this run is on the CPU, where "
                       "everything is in RAM already. Remove train.offload (see `sft plan` for what fits)")
    if parallel != "fsdp":
        raise SftError(f"train.offload: FSDP2's CPU offload needs train.parallel: fsdp under torchrun (--nproc N); "
                       f"this run is {parallel}. Set train.parallel: fsdp and start with --nproc, or remove train.offload")


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
