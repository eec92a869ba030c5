"""AdamW with no weight decay on norms and biases (with an fp32 master copy of bf16 weights),
and the learning-rate schedule as a pure function."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch

from sft.config import TrainConfig
from sft.lm.rounding import Noise, stochastic_round_


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of an FSDP2 DTensor, else ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``train.warmup`` is a fraction of the run when below 1, else a number of steps.

    >>> from sft.config import TrainConfig
    >>> warmup_steps(TrainConfig(warmup=0.1), 50), warmup_steps(TrainConfig(warmup=3), 50)
    (5, 3)
    """
    return round(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    >>> from sft.config import TrainConfig
    >>> c = TrainConfig(lr=1.0, warmup=2, schedule="cosine")
    >>> [round(lr_at(s, 6, c), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - warm)
    progress = (step - warm) / span
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; 1-D tensors (norm weights, biases) get no weight decay.

    All-fp32 parameters get torch's AdamW; any bf16 one gets ``MasterAdamW`` (same update, on an
    fp32 master copy)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": ps, "weight_decay": wd} for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps
    ]
    if cfg.optimizer != "adamw":
        return eight_bit_adamw(groups, cfg, bf16=any(p.dtype == torch.bfloat16 for p in decay + no_decay))
    if any(p.dtype != torch.float32 for p in decay + no_decay):
        return MasterAdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                           rounding=cfg.bf16_rounding, seed=cfg.seed)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        foreach=True,
    )


class MasterAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: the update runs on an fp32 master copy with fp32 moments, and the
    bf16 weight is the master rounded to bf16 after each step. Without the master, an update
    below half a bf16 step of the weight (2^-9 of it) rounds away and training stalls
    (``bench/bf16_quality.py`` shows that curve). fp32 parameters (a LoRA adapter) are their own
    master. Memory per bf16 weight: 2 (weight) + 2 (grad) + 4 (master) + 8 (moments) bytes, the
    same 16 as fp32 AdamW. The update is torch's fused AdamW kernel.

    ``rounding`` (``train.bf16_rounding``) is how the bf16 weight follows its master: ``stochastic``
    (``sft.lm.rounding``: the bf16 weight is the master on average, so updates smaller than half a
    bf16 step still reach the forward pass) or ``nearest`` (such updates wait in the master until
    they add up to half a step). The random bits of step ``s`` come from a generator seeded with
    ``(seed, s)``: a resume, and every DDP replica, draws the same ones.

    The master lives in the optimizer state (``state[p]["master"]``), so checkpoints save it and a
    bf16 resume is exact too.
    """

    FP32_STATE = ("master", "exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.0, rounding: Literal["stochastic", "nearest"] = "nearest",
                 seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.rounding, self.seed = rounding, seed

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        from torch.optim.adamw import adamw

        for group in self.param_groups:
            masters, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            low: list[torch.Tensor] = []
            low_masters: list[torch.Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.dtype != torch.float32:
                        st["master"] = p.detach().float()
                master = st.get("master", p)
                if master is not p:
                    low.append(p)
                    low_masters.append(master)
                masters.append(master)
                grads.append(p.grad.float())
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                steps.append(st["step"])
            if not masters:
                continue
            beta1, beta2 = group["betas"]
            # fused: one pass over each tensor (foreach makes ~10; on a loaded 2-core CPU, 80M
            # parameters took 13-16 s with foreach and 1.6-3.6 s fused)
            adamw(masters, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False, beta1=beta1,
                  beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                  maximize=False)
            if low and self.rounding == "nearest":
                torch._foreach_copy_([local(p) for p in low], [local(m) for m in low_masters])  # FSDP2: the shards
            elif low:
                step = int(steps[0])  # this step's number (1-based; the same for every weight)
                noise = Noise(torch.Generator().manual_seed(self.seed * 1_000_003 + step), low[0].device)
                for p, m in zip(low, low_masters, strict=True):
                    stochastic_round_(local(p), local(m), noise)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the master and moments stay fp32 (torch casts state to the weight's dtype)."""
        saved = {pid: {k: v for k, v in st.items() if k in self.FP32_STATE} for pid, st in state_dict["state"].items()}
        # the saved groups' ids in order, as torch maps them: ints, or parameter names from
        # torch.distributed.checkpoint (an FSDP2 resume)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        by_id = dict(zip(ids, (p for g in self.param_groups for p in g["params"]), strict=True))
        for pid, tensors in saved.items():
            p = by_id[pid]
            for k, v in tensors.items():
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32)


def rebuilt(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The same optimizer, class and settings, over new parameter groups (FSDP2 replaces the
    parameters with sharded ones). Settings are its ``defaults`` and the constructor arguments it
    keeps as attributes of the same name (``MasterAdamW``'s ``rounding`` and ``seed``).

    >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    >>> opt = MasterAdamW([{"params": [w]}], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, rounding="stochastic", seed=7)
    >>> new = rebuilt(opt, [{"params": [w]}])
    >>> type(new).__name__, new.rounding, new.seed, new.defaults["lr"]
    ('MasterAdamW', 'stochastic', 7, 0.001)
    """
    accepted = [k for k in inspect.signature(type(optimizer)).parameters if k != "params"]
    settings = {k: optimizer.defaults[k] if k in optimizer.defaults else getattr(optimizer, k)
                for k in accepted if k in optimizer.defaults or hasattr(optimizer, k)}
    return type(optimizer)(groups, **settings)


def master_weights(optimizer: torch.optim.Optimizer, model: Any) -> dict[str, torch.Tensor]:
    """The fp32 masters of ``model``'s bf16 weights in ``optimizer`` (``MasterAdamW``), by parameter
    name; empty for any other optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: st["master"] for p, st in optimizer.state.items() if "master" in st and id(p) in names}


def eight_bit_adamw(groups: list[dict[str, Any]], cfg: TrainConfig, bf16: bool) -> torch.optim.Optimizer:
    """``train.optimizer: adamw_8bit | paged_adamw_8bit``: bitsandbytes' AdamW with 8-bit
    block-quantized moments (2 bytes a parameter instead of 8; tensors under 4096 elements keep
    fp32 moments). ``paged``: the moments live in CUDA unified memory and page out to RAM under
    pressure (on a CPU the two are the same). There is no fp32 master copy: with bf16 weights
    (full fine-tuning in bf16) updates below bf16's resolution round away; LoRA/QLoRA adapters
    are fp32 and unaffected."""
    import importlib.util

    from sft.errors import SftError

    if importlib.util.find_spec("bitsandbytes") is None:
        raise SftError(f"train.optimizer: {cfg.optimizer} needs the bitsandbytes package; install it with "
                       "pip install 'bitsandbytes>=0.46' (or `pip install -e '.[qlora]'`), or use train.optimizer: adamw")
    from sft.models.quantize import quiet_bitsandbytes

    with quiet_bitsandbytes():
        import bitsandbytes as bnb

    if bf16:
        import sys

        print(f"warning: train.optimizer: {cfg.optimizer} updates bf16 weights without an fp32 master copy, so "
              "updates below bf16's resolution are lost; use train.optimizer: adamw, train.precision: fp32, "
              "or train.method: lora/qlora (fp32 adapters)", file=sys.stderr)
    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,  # type: ignore[no-any-return]
               weight_decay=cfg.weight_decay)
