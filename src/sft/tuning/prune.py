"""Pruning of `sft sweep` trials: pure decisions over loss curves (``losses[i]`` is the loss of
step ``i + 1``). The rules and why they are not a median pruner: docs/sweep.md, "Pruning"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class PruneRules:
    grace: int = 3  # steps (at least the warm-up) before the divergence and behind rules apply
    diverge_factor: float = 1.5  # smoothed loss above this x the first step's loss: diverged
    behind_margin: float = 0.10  # smoothed loss above the worst finished curve by this fraction: behind
    min_finished: int = 2  # finished trials needed before the behind rule applies
    window: int = 3  # trailing mean used for both rules


# Grid keys that leave a trial's plan of steps and the shape of its schedule as they are: trials
# that differ only in these can be compared step by step (the "behind" rule). Any other key
# (train.epochs, max_steps, batch_size, warmup, data.max_length ...) makes step k a different
# point of another schedule: a 3-epoch trial is still warming up where a 1-epoch one is at its
# full rate, so its loss is higher there without being behind.
SAME_SCHEDULE_KEYS = frozenset({
    "train.lr", "train.seed", "train.weight_decay", "train.max_grad_norm", "train.neftune_alpha",
    "lora.r", "lora.alpha", "lora.dropout",
})


def comparable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Do two trials' grid values leave them on the same plan of steps and schedule?

    >>> comparable({"train.lr": 1e-5, "lora.r": 8}, {"train.lr": 3e-5, "lora.r": 16})
    True
    >>> comparable({"train.epochs": 1}, {"train.epochs": 3})
    False
    """
    return all(a.get(k) == b.get(k) for k in a.keys() | b.keys() if k not in SAME_SCHEDULE_KEYS)


def smooth(losses: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps.

    >>> smooth([4.0, 2.0, 3.0, 1.0], 2)
    [4.0, 3.0, 2.5, 2.0]
    """
    return [sum(losses[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(losses))]


def prune_reason(losses: list[float], finished: list[list[float]], rules: PruneRules) -> str | None:
    """Why a running trial should stop now, or None. ``finished``: loss curves of finished trials.

    >>> r = PruneRules(grace=2, window=1)
    >>> prune_reason([2.0, 1.8, 1.7, 1.6], [], r) is None
    True
    >>> prune_reason([2.0, 1.9, float("nan")], [], r)
    'diverged: loss is nan at step 3'
    >>> prune_reason([2.0, 2.5, 3.5], [], r)
    'diverged: loss 3.5 at step 3 > 1.5 x the first step (2)'
    >>> prune_reason([2.0, 1.9, 1.9], [[2.0, 1.5, 1.2], [2.0, 1.6, 1.4]], r)
    'behind: loss 1.9 at step 3 > 1.4 (worst finished trial) + 10%'
    """
    step = len(losses)
    if step == 0:
        return None
    if not math.isfinite(losses[-1]):
        return f"diverged: loss is {losses[-1]} at step {step}"
    if step <= rules.grace:
        return None
    now = smooth(losses, rules.window)[-1]
    if now > rules.diverge_factor * losses[0]:
        return f"diverged: loss {now:.4g} at step {step} > {rules.diverge_factor:g} x the first step ({losses[0]:.4g})"
    curves = [smooth(c, rules.window) for c in finished if len(c) >= step]
    if len(curves) >= rules.min_finished:
        worst = max(c[step - 1] for c in curves)
        if now > worst * (1 + rules.behind_margin):
            return (f"behind: loss {now:.4g} at step {step} > {worst:.4g} (worst finished trial) "
                    f"+ {rules.behind_margin:.0%}")
    return None
