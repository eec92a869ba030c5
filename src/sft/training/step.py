"""THE optimizer step: `sft train`, `sft bench` and `sft lr-find` all call ``train_step``.

Loss of a step = sum of token cross-entropy over all its micro-batches (on all ranks) / trained
tokens in the whole step, so the batch/accumulation split never changes it. Each micro-batch's
summed loss is divided by that global count before ``backward``.

Under torchrun rank r takes micro-batches r, r + world, ... of the step. DDP and FSDP2 *average*
gradients over ranks, so each rank multiplies its loss by ``world``: the average of
``world * sum_r_loss / n`` over ranks is ``sum_all_loss / n``, the one-process gradient. Every rank
runs the same number of forward/backward passes (their collectives must pair up): a rank short of
micro-batches (fewer micro-batches than ranks, a short last step) repeats one with weight 0
(``sft.runtime.share``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sft.config import Config
from sft.data.batching import Step
from sft.data.collate import collate_packed_rows, collate_padded
from sft.data.types import IGNORE, Example
from sft.lm.compiled import compile_errors, compile_failed, is_compiled
from sft.lm.loss import forward_loss
from sft.runtime import Runtime
from sft.training.distributed import grad_sync

# Profiler ranges (``sft bench --profile`` groups a step's time by them)
PROFILE_DATA, PROFILE_OPTIMIZER = "sft.data", "sft.optimizer"


@dataclass
class StepResult:
    loss: float  # token-mean CE of the step over all ranks
    grad_norm: float  # before clipping
    tokens: int  # real (non-padding) tokens of the step, all ranks
    trained_tokens: int  # tokens with a target, all ranks
    tensor_tokens: int  # positions this rank pushed through the model, padding included
    applied: bool  # False: the loss or the gradient norm was not finite; gradients dropped, weights unchanged


def to_batch(
    rows: list[list[Example]], packing: bool, pad_id: int, device: torch.device, shape: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """One micro-batch on ``device``: packed rows or padded sequences, ``[rows, longest]`` or ``shape``."""
    if packing:
        b = collate_packed_rows(rows, pad_id, shape)
    else:
        b = collate_padded([ex for row in rows for ex in row], pad_id, shape)
    return {k: v.to(device) for k, v in b.items()}


def static_shape(cfg: Config) -> tuple[int, int]:
    """The one micro-batch shape of compiled training: ``[batch_size, max_length]``."""
    return cfg.train.batch_size, cfg.data.max_length


def step_batches(
    step: Step, examples: Sequence[Example], cfg: Config, pad_id: int, rt: Runtime,
    shape: tuple[int, int] | None = None,
) -> tuple[list[dict[str, torch.Tensor]], int, int, list[float]]:
    """This rank's micro-batches of one optimizer step, the step's trained and real token counts
    summed over all ranks (the loss divides by the global trained count), and each batch's weight:
    1, or 0 for a repeat that only keeps this rank's collectives in step with the others.
    ``shape``: every micro-batch padded to it (compiled training)."""
    mine = rt.share(len(step))
    built: dict[int, dict[str, torch.Tensor]] = {}
    for i, _ in mine:
        if i not in built:
            rows = [[examples[j] for j in row] for row in step[i]]
            built[i] = to_batch(rows, cfg.data.packing, pad_id, rt.device, shape)
    batches = [built[i] for i, _ in mine]
    weights = [w for _, w in mine]
    own = [i for i, w in mine if w]
    counts = torch.tensor(
        [sum(int((built[i]["labels"][:, 1:] != IGNORE).sum()) for i in own),
         sum(len(examples[j]) for i in own for row in step[i] for j in row)], device=rt.device,
    )
    rt.all_reduce(counts)
    return batches, int(counts[0]), int(counts[1]), weights


def forward_backward(
    model: Any, batches: list[dict[str, torch.Tensor]], n_trained: int, rt: Runtime,
    weights: list[float] | None = None,
) -> float:
    """Accumulate the gradients of one optimizer step; return its loss (token-mean over all ranks).

    ``model`` is the plain model (one process) or the DDP / FSDP2 module (``distributed.wrap``).
    """
    world = rt.world
    weights = weights or [1.0] * len(batches)
    step_loss = torch.zeros((), device=batches[0]["input_ids"].device)
    for k, (b, w) in enumerate(zip(batches, weights)):
        with grad_sync(model, sync=k == len(batches) - 1):  # DDP: one all-reduce per step
            with rt.autocast():
                loss_sum, _ = forward_loss(model, b)
            (loss_sum * (w * world / max(1, n_trained))).backward()
        step_loss += loss_sum.detach() * w
    rt.all_reduce(step_loss)
    return float(step_loss) / max(1, n_trained)


def train_step(
    model: Any, optimizer: torch.optim.Optimizer, step: Step, examples: Sequence[Example], cfg: Config,
    pad_id: int, rt: Runtime, lr: float,
) -> StepResult:
    """One optimizer step at learning rate ``lr``: forward/backward over the step's micro-batches,
    clip, update. A non-finite loss or gradient norm drops the gradients and leaves the weights as they were."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    compiled = is_compiled(model)
    with torch.profiler.record_function(PROFILE_DATA):
        batches, n_trained, n_tokens, weights = step_batches(
            step, examples, cfg, pad_id, rt, static_shape(cfg) if compiled else None)
    try:
        loss = forward_backward(model, batches, n_trained, rt, weights)
    except compile_errors() as e:
        if not compiled:
            raise
        compile_failed(model, e)  # warns, naming the error; the modules run eagerly from now on
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, batches, n_trained, rt, weights)
    tensor_tokens = sum(b["input_ids"].numel() for b, w in zip(batches, weights) if w)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, math.nan, n_tokens, n_trained, tensor_tokens, applied=False)
    # The norm is always taken (an infinite max_norm clips nothing): a finite loss can still come with
    # NaN/inf gradients (e.g. an overflow in backward), and such a step must not touch the weights.
    with torch.profiler.record_function(PROFILE_OPTIMIZER):
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, n_tokens, n_trained, tensor_tokens, applied=False)
    with torch.profiler.record_function(PROFILE_OPTIMIZER):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, n_tokens, n_trained, tensor_tokens, applied=True)
