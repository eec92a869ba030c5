"""The run state a checkpoint's ``state.json`` holds besides weights, optimizer and RNG tensors.

``Run.state()`` (loop.py) fills the counters; ``checkpoint.save_checkpoint`` adds ``step``,
``world_size`` and ``python_rng``; ``restore`` reads them back. Older checkpoints may lack keys,
hence ``total=False`` and ``.get`` with a default on reading.
"""

from __future__ import annotations

from typing import Any, TypedDict


class RunState(TypedDict, total=False):
    total_steps: int  # optimizer steps the plan has; a resume with another count is refused
    best_eval: float  # best held-out loss so far (early stopping); inf before the first eval
    bad_evals: int  # evaluations since the best one (early stopping)
    skipped_steps: int  # steps dropped for a non-finite loss (train.on_nan: skip)
    config: dict[str, Any]  # checkpoint.resume_config: the dotted keys a resume must keep
    step: int  # the last optimizer step taken (save_checkpoint)
    world_size: int  # processes that made it (save_checkpoint)
    python_rng: list[Any]  # random.getstate() as JSON (save_checkpoint)
