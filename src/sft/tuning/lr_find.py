"""`sft lr-find CONFIG`: a short learning-rate range test that proposes a grid for `sft sweep`.

The rate grows geometrically each step; the smoothed loss is recorded until it diverges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sft.atomic import atomic_write_text
from sft.config import Config
from sft.errors import SftError
from sft.tuning.sweep import format_value


def range_lrs(steps: int, start: float, end: float) -> list[float]:
    """Rates growing geometrically from ``start`` to ``end`` over ``steps`` steps.

    >>> [f"{lr:.0e}" for lr in range_lrs(4, 1e-6, 1e-3)]
    ['1e-06', '1e-05', '1e-04', '1e-03']
    """
    return [start * (end / start) ** (i / max(1, steps - 1)) for i in range(steps)]


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (the first value is kept as is).

    >>> [round(v, 3) for v in ema([2.0, 1.0, 1.0], 0.5)]
    [2.0, 1.333, 1.143]
    """
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def nice_rate(lr: float) -> float:
    """The nearest (in log scale) of 1 x 10^k and 3 x 10^k.

    >>> [nice_rate(x) for x in (2.7e-4, 1.2e-5, 6e-5)]
    [0.0003, 1e-05, 0.0001]
    """
    e = math.floor(math.log10(lr))
    candidates = [m * 10.0**k for k in (e - 1, e, e + 1) for m in (1, 3)]
    return float(f"{min(candidates, key=lambda c: abs(math.log(c / lr))):.0e}")


def propose_grid(lrs: list[float], smoothed: list[float], n: int = 4, factor: float = 3.0) -> list[float]:
    """``n`` rates ``factor`` apart around the steepest fall of the smoothed loss, all at least
    ``factor`` below the rate where the loss bottoms out (past it the run diverges).

    >>> lrs = range_lrs(7, 1e-6, 1e-0)
    >>> propose_grid(lrs, [5.0, 4.9, 4.0, 2.5, 2.0, 6.0, 30.0])
    [3e-05, 0.0001, 0.0003, 0.001]
    """
    i_min = min(range(len(smoothed)), key=lambda i: smoothed[i])
    if i_min == 0:
        raise SftError("lr-find: the loss never fell below its first value; check the data (`sft data check`) "
                       "or the model, or lower the starting rate")
    slopes = [(smoothed[i] - smoothed[i - 1]) / math.log(lrs[i] / lrs[i - 1]) for i in range(1, i_min + 1)]
    steep = lrs[min(range(len(slopes)), key=lambda i: slopes[i])]  # the start of the steepest segment
    top = min(steep * factor ** (n - 2), lrs[i_min] / factor)
    return list(dict.fromkeys(nice_rate(top / factor**k) for k in range(n - 1, -1, -1)))


def run_lr_find(cfg: Config, steps: int = 30, start: float = 1e-7, end: float = 1e-1, beta: float = 0.8) -> int:
    """Train ``steps`` steps with the rate rising from ``start`` to ``end``; stop when the smoothed
    loss exceeds 4x its best; write ``output_dir/lr_find.json`` and print a `sft sweep` grid."""
    from sft.runtime import local
    from sft.training.prepare import prepare
    from sft.training.step import train_step

    rt = local(cfg)
    prepared = prepare(cfg, rt, steps)  # the setup of sft train: threads, seeds, data, precision, model, device
    model, optimizer = prepared.model, prepared.optimizer
    lrs = range_lrs(steps, start, end)
    losses: list[float] = []
    smoothed: list[float] = []
    for step, lr in enumerate(lrs):
        r = train_step(model, optimizer, prepared.plan[step], prepared.data.examples, cfg, prepared.pad_id,
                       rt, lr)
        losses.append(r.loss)
        smoothed = ema(losses, beta) if math.isfinite(losses[-1]) else [*smoothed, math.inf]
        print(f"lr-find {step + 1}/{steps} | lr {lr:.1e} | loss {losses[-1]:.4f} | smoothed {smoothed[-1]:.4f}",
              flush=True)
        if smoothed[-1] > 4 * min(smoothed):
            print(f"lr-find: stopped at lr {lr:.1e}: smoothed loss > 4x its best", flush=True)
            break
    grid = propose_grid(lrs[: len(smoothed)], smoothed)
    if min(smoothed) == smoothed[-1]:
        print(f"note: the loss was still falling at the last rate ({lrs[len(smoothed) - 1]:.1e}); "
              "no divergence point was found, so the top of the grid is only capped by the range", flush=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"lrs": lrs[: len(losses)], "losses": losses, "smoothed": smoothed, "proposed_grid": grid}
    atomic_write_text(out / "lr_find.json", json.dumps(record, indent=1))
    print(f"Proposed grid (written to {out / 'lr_find.json'}):")
    print(f"  sft sweep CONFIG --train.lr={','.join(format_value(lr) for lr in grid)}")
    return 0

